"""Sparse differences: a fine-tuning stored as (indices, values) per parameter, and composed.

A difference holds, for each changed parameter (by its name in
``model.named_parameters()``), the flat indices of the trained entries and the
values theta - theta0 there, in a dtype that holds them exactly (fp64 for fp32
weights, fp32 for bf16/fp16 ones; see ``value_dtype``). On disk: one
safetensors file with tensors ``<name>.indices`` and ``<name>.values`` and the
parameter shapes in its metadata, written atomically. ``compose(model, diffs)``
adds one or several differences to a model's weights: their sum per entry in
fp64, then one rounding to the weight's dtype. So composing one difference onto
theta0 gives the fine-tuned weights bit for bit, and entries no difference
touches stay bit-identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import FastftError, check
from ..safeio import load_safetensors, read_safetensors_metadata, save_safetensors

FORMAT = "fastft.sparse_diff/1"


def value_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype in which theta - theta0 of ``weight_dtype`` weights is exact."""
    return torch.float64 if weight_dtype in (torch.float32, torch.float64) else torch.float32


def save_sparse_diff(diff: dict[str, tuple[torch.Tensor, torch.Tensor]], shapes: dict[str, list],
                     path: str | os.PathLike) -> Path:
    """Write {name: (indices, values)} and {name: shape} to ``path`` (safetensors)."""
    tensors = {}
    for name, (idx, val) in diff.items():
        check(idx.shape == val.shape and idx.dim() == 1,
              f"sparse difference of {name}: indices and values must be 1-d and equal in size")
        tensors[f"{name}.indices"] = idx
        tensors[f"{name}.values"] = val
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata={
        "format": FORMAT, "shapes": json.dumps({k: list(v) for k, v in shapes.items()})})
    return path


def load_sparse_diff(path: str | os.PathLike) -> dict:
    """{"shapes": {name: shape}, "params": {name: (indices, values)}} from a saved file."""
    path = Path(path)
    check(path.is_file(), f"sparse difference {path} not found")
    meta = read_safetensors_metadata(path)
    check(meta.get("format") == FORMAT,
          f"{path} is not a fastft sparse difference (format {meta.get('format')!r})")
    tensors, _ = load_safetensors(path)
    try:
        shapes = json.loads(meta["shapes"])
        params = {n: (tensors[f"{n}.indices"], tensors[f"{n}.values"]) for n in shapes}
    except (KeyError, TypeError, ValueError) as e:
        raise FastftError(f"{path} is damaged (its shapes and tensors disagree: {e})") from e
    return {"shapes": shapes, "params": params}


def _as_diff(d) -> dict:
    if isinstance(d, (str, os.PathLike)):
        return load_sparse_diff(d)
    check(isinstance(d, dict) and "params" in d,
          "compose takes sparse differences as file paths or load_sparse_diff() results")
    return d


@torch.no_grad()
def compose(model: nn.Module, diffs) -> nn.Module:
    """Add the sparse differences ``diffs`` (paths or loaded dicts; one or a list) to ``model``
    in place; returns it."""
    if isinstance(diffs, (str, os.PathLike, dict)):
        diffs = [diffs]
    diffs = [_as_diff(d) for d in diffs]
    check(bool(diffs), "compose needs at least one sparse difference")
    named = dict(model.named_parameters())
    touched: dict[str, list] = {}
    for d in diffs:
        for name, (idx, val) in d["params"].items():
            if name not in named:
                raise FastftError(f"sparse difference names {name!r}, which this model does not "
                                  "have (was it made for another architecture?)")
            p = named[name]
            want = tuple(d["shapes"].get(name, p.shape))
            check(tuple(p.shape) == want, f"sparse difference of {name} is for shape {want}, "
                  f"the model's is {tuple(p.shape)} (another model size?)")
            check(idx.numel() == 0 or int(idx.max()) < p.numel(),
                  f"sparse difference of {name}: an index exceeds the parameter's size")
            touched.setdefault(name, []).append((idx, val))
    for name, parts in touched.items():
        p = named[name]
        delta = torch.zeros(p.numel(), device=p.device, dtype=torch.float64)
        for idx, val in parts:
            delta.index_add_(0, idx.to(p.device, torch.int64), val.to(p.device, torch.float64))
        at = torch.unique(torch.cat([idx.to(p.device, torch.int64) for idx, _ in parts]))
        flat = p.data.view(-1)
        flat[at] = (flat[at].double() + delta[at]).to(p.dtype)
    return model
