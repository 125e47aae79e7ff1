"""An optimizer's state dict in one safetensors file: tensors as tensors, the rest as JSON."""

from __future__ import annotations

import json

from torch import Tensor

from ..errors import check


def save(optimizer, path) -> None:
    """Write ``optimizer.state_dict()`` (tensors and JSON-able values) to ``path``, atomically."""
    from ..adapters import save_safetensors

    sd = optimizer.state_dict()
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    rest = {k: v for k, v in sd.items() if not isinstance(v, Tensor)}
    save_safetensors(tensors, path, metadata={"format": "pt", "fastft": json.dumps(rest)})


def load(optimizer, path) -> None:
    """Load a file written by :func:`save` into ``optimizer``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        check("fastft" in meta, f"{path} is not a fastft optimizer state file (no fastft "
              "metadata)")
        sd = json.loads(meta["fastft"])
        for k in f.keys():
            sd[k] = f.get_tensor(k)
    optimizer.load_state_dict(sd)
