"""An optimizer's state dict in one safetensors file: tensors as tensors, the rest as JSON."""

from __future__ import annotations

import json

from torch import Tensor

from ..errors import check
from ..safeio import damaged, load_safetensors, save_safetensors


def save(optimizer, path) -> None:
    """Write ``optimizer.state_dict()`` (tensors and JSON-able values) to ``path``, atomically."""
    sd = optimizer.state_dict()
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    rest = {k: v for k, v in sd.items() if not isinstance(v, Tensor)}
    save_safetensors(tensors, path, metadata={"format": "pt", "fastft": json.dumps(rest)})


def load(optimizer, path) -> None:
    """Load a file written by :func:`save` into ``optimizer``."""
    tensors, meta = load_safetensors(path)
    check("fastft" in meta, f"{path} is not a fastft optimizer state file (no fastft "
          "metadata)")
    try:
        sd = json.loads(meta["fastft"])
    except ValueError as e:
        raise damaged(path, f"its fastft metadata is not JSON: {e}") from e
    sd.update(tensors)
    optimizer.load_state_dict(sd)
