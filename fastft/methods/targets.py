"""The weights the sparse methods choose from: every nn.Linear of a model but its output head.

Paths are module paths (``model.layers.3.self_attn.q_proj``); the layer index of
a path is its last ``.<number>.`` component.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import check

_LAYER = re.compile(r"\.(\d+)\.")


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """{path: module} of every nn.Linear except the model's output embedding (lm_head)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    check(bool(found), f"{type(model).__name__} has no nn.Linear layer (besides its output head) "
          "for a sparse method to train")
    return found


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def layer_index(path: str) -> int | None:
    """The transformer layer a module path lies in (``...layers.3.mlp.up_proj`` -> 3)."""
    found = _LAYER.findall(f".{path}.")
    return int(found[-1]) if found else None


def param_names(model: nn.Module) -> dict[int, str]:
    """{id(parameter): its name in model.named_parameters()}."""
    return {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}


def require_prepared(method, model: nn.Module | None = None) -> None:
    name = type(method).__name__
    check(getattr(method, "_targets", None) is not None,
          f"{name}: call fastft.prepare(model, fastft.{name}(...)) before using the method "
          "(it chooses and freezes the trained weights)")
    if model is not None:
        check(getattr(method, "_model_id", None) == id(model),
              f"{name}: this method object was prepared on another model; make one per model")
