"""fastft.prepare: put fastft's fused kernels into a Hugging Face causal LM, in place.

Patching is by module type and name, with no per-model code: the ``nn.Linear``
children named by ``target_modules`` become LoRA / LoRA-SB layers, and with
``loss_head=True`` a call with ``labels`` computes the loss with the fused
cross-entropy from the final hidden states and the output head's weight (the
[B, S, V] logits never exist); a call without labels returns logits as before.
``merge`` folds the adapters into W0 and returns a plain model; ``unpatch``
restores the original modules and forward.
"""

from __future__ import annotations

import contextlib
import re
import types

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FastftError, check
from .methods.lora import Full, LoRA, LoRALinear, LoRASB, LoRASBLinear, adapter_layers


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def linear_names(model: nn.Module) -> list[str]:
    """Paths of every nn.Linear (or adapted linear) except the output head."""
    head = output_head(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def resolve_targets(model: nn.Module, target_modules) -> list[str]:
    """The module paths that ``target_modules`` names ("all-linear", names, or a regex)."""
    names = linear_names(model)
    if target_modules == "all-linear":
        chosen = names
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise FastftError(f"target_modules {target_modules!r} is not a valid regex: {e}") from e
        chosen = [n for n in names if pattern.fullmatch(n)]
    else:
        wanted = set(target_modules)
        chosen = [n for n in names if n in wanted or n.rsplit(".", 1)[-1] in wanted]
    if not chosen:
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise FastftError(
            f"target_modules={target_modules!r} names no linear layer of this model; its linear "
            f"layers are: {', '.join(short)} (or use 'all-linear', or a regex over full paths "
            f"such as {names[0] if names else 'model.layers.0.self_attn.q_proj'!r})")
    return chosen


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def prepare(model: nn.Module, method=None, *, loss_head: bool = True) -> nn.Module:
    """Patch ``model`` in place for fine-tuning with ``method``; returns it.

    ``method``: ``fastft.LoRA(...)``, ``fastft.LoRASB(...)``, ``fastft.Full()`` (default
    LoRA()), or any object with ``prepare_model`` (fastft.methods.base.Method).
    LoRA and LoRA-SB freeze every other parameter.
    """
    method = LoRA() if method is None else method
    check(isinstance(method, (LoRA, LoRASB, Full)) or hasattr(method, "prepare_model"),
          "method must be fastft.LoRA, fastft.LoRASB, fastft.Full or a sparse method "
          f"(fastft.LIFT, fastft.HFT, fastft.LTSFT); got {type(method).__name__}")
    check(not hasattr(model, "_fastft"), "this model is already prepared by fastft: call "
          "fastft.unpatch(model) (or fastft.merge) first")
    check(isinstance(model, nn.Module), "prepare needs a torch.nn.Module (a transformers model)")
    targets: list[str] = []
    if hasattr(method, "prepare_model"):  # the methods of fastft.methods.base.Method
        targets = list(method.prepare_model(model))
    elif isinstance(method, Full):
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        targets = resolve_targets(model, method.target_modules)
        for p in model.parameters():
            p.requires_grad_(False)
        for path in targets:
            base = model.get_submodule(path)
            layer = LoRASBLinear(base, method.r) if isinstance(method, LoRASB) else \
                LoRALinear(base, method.r, method.alpha, method.dropout, method.rslora)
            _set(model, path, layer)
    model._fastft = types.SimpleNamespace(method=method, targets=targets, forward=None)
    if loss_head:
        _patch_forward(model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original linear layers and forward back (adapters are dropped)."""
    state = getattr(model, "_fastft", None)
    check(state is not None, "this model was not prepared by fastft")
    for path, layer in adapter_layers(model).items():
        _set(model, path, layer.base_layer)
    if state.forward is not None:
        del model.forward  # the instance attribute; the class's forward shows through again
    del model._fastft
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its W0 (W0 += s B R A, in fp32) and unpatch: a plain model."""
    for layer in adapter_layers(model).values():
        w = layer.base_layer.weight
        w.copy_((w.float() + layer.delta_weight()).to(w.dtype))
    return unpatch(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the model as its frozen base (the reference policy of ASFT and GRPO)."""
    layers = list(adapter_layers(model).values())
    old = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, old):
            layer.disabled = was


def logit_transform(config) -> tuple[float | None, float]:
    """(softcap, temperature) that reproduce the model's own logits from h W^T."""
    softcap = getattr(config, "final_logit_softcapping", None) or None
    temperature = 1.0
    if getattr(config, "logits_scaling", None):  # Granite divides
        temperature = float(config.logits_scaling)
    if getattr(config, "logit_scale", None):  # Cohere multiplies
        temperature = 1.0 / float(config.logit_scale)
    return softcap, temperature


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label of each position is the next token, as transformers shifts (-100 at the end)."""
    return F.pad(labels, (0, 1), value=-100)[..., 1:]


def decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    if dec is None or dec is model:
        dec = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    check(isinstance(dec, nn.Module), f"{type(model).__name__} has no decoder to call for "
          "hidden states: use loss_head=False")
    return dec


def _patch_forward(model: nn.Module) -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .losses import cross_entropy

    head = output_head(model)
    check(isinstance(head, nn.Linear) or isinstance(getattr(head, "weight", None), torch.Tensor),
          f"{type(model).__name__} has no output embedding (lm_head): use loss_head=False")
    check(getattr(head, "bias", None) is None,
          "the output head has a bias, which the fused loss does not take: use loss_head=False")
    original = type(model).forward
    decoder(model)  # fails now, not at the first call, if there is none

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:
            return original(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        kwargs.pop("logits_to_keep", None)
        # looked up on self, not captured: a deep copy of the model runs its own modules
        out = decoder(self)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out[0]
        softcap, temperature = logit_transform(self.config)
        if shift_labels is None:
            shift_labels = next_token_labels(labels)
        loss = cross_entropy(hidden, output_head(self).weight, shift_labels.to(hidden.device),
                             num_items_in_batch=num_items, softcap=softcap,
                             temperature=temperature)
        return CausalLMOutputWithPast(loss=loss, logits=None,
                                      past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))

    model.forward = types.MethodType(forward, model)
    model._fastft.forward = forward
