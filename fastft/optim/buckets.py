"""Flat storage for SparseAdamW's state: one bucket per (group, device, weight dtype, index dtype).

A bucket holds the indices, m and v of all its parameters concatenated (and,
with hooks, their compact gradients), segment j = [offsets[j], offsets[j + 1])
belonging to its j-th parameter; each parameter's state entries are views of
these. So one call of fastft::sparse_adam_step (one Triton launch) updates
every parameter of a bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

KEYS = ("idx", "exp_avg", "exp_avg_sq")


@dataclass
class Bucket:
    group: int
    members: list[int]  # indices of the parameters, in the optimizer's order
    offsets: list[int] = field(default_factory=lambda: [0])
    flat: dict[str, Tensor] = field(default_factory=dict)  # idx, exp_avg, exp_avg_sq
    grad: Tensor | None = None  # compact fp32 gradients (hook mode)


def make(param_groups, masked: list[bool], index: dict) -> list[Bucket]:
    """Buckets of the masked parameters (their state must exist), in parameter order."""
    out: dict[tuple, Bucket] = {}
    for gi, g in enumerate(param_groups):
        for p in g["params"]:
            i = index[p]
            if masked[i]:
                key = (gi, str(p.device), p.dtype, torch.int32 if p.numel() < 2**31 else
                       torch.int64)
                out.setdefault(key, Bucket(group=gi, members=[])).members.append(i)
    return list(out.values())


def pack(bucket: Bucket, params: list[Tensor], state, grad_views: dict[int, Tensor] | None
         ) -> None:
    """Concatenate the members' state (and compact gradients, when ``grad_views`` is given)
    into the bucket's flat tensors; the members' entries become views of them."""
    sts = [state[params[i]] for i in bucket.members]
    sizes = [int(st["idx"].numel()) for st in sts]
    bucket.offsets = [0]
    for n in sizes:
        bucket.offsets.append(bucket.offsets[-1] + n)
    for key in KEYS:
        bucket.flat[key] = torch.cat([st[key] for st in sts])
        for st, a, b in zip(sts, bucket.offsets, bucket.offsets[1:]):
            st[key] = bucket.flat[key][a:b]
    if grad_views is None:
        bucket.grad = None
        return
    dev = bucket.flat["idx"].device
    parts = [grad_views.get(i, torch.zeros(n, device=dev)) for i, n in zip(bucket.members, sizes)]
    bucket.grad = torch.cat(parts)
    for i, a, b in zip(bucket.members, bucket.offsets, bucket.offsets[1:]):
        grad_views[i] = bucket.grad[a:b]
