"""Processes and devices: one process, or torchrun with DDP (any method) or FSDP2 (full FT).

Under torchrun (WORLD_SIZE > 1) the process group is nccl on CUDA, gloo on the
CPU. Each process takes its share of every global batch; losses are divided
by the global token count times the world size, so that DDP's gradient mean
gives exactly the single-process gradient of the same global batch.

The sparse methods (LIFT, HFT, LT-SFT) are not wrapped in DDP: their
optimizer consumes gradients in post-accumulate hooks, before DDP's all-reduce
would run, and HFT changes the trained set between stages, which DDP's fixed
reducer does not allow. The trainer averages their gradients itself, after the
last micro-batch (:func:`average_`): for SparseAdamW the compact buffers, so
only the trained entries cross the wire and no dense gradient is kept.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, "SUM")

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, "MAX")

    def _all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """``t`` reduced over the processes into a copy (``t`` itself where there is one)."""
        if self.on:
            t = t.clone()
            dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t

    def barrier(self) -> None:
        if self.on:
            dist.barrier()


def setup() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return Dist(rank=rank, world=world, local_rank=local, device=device)


def wrap(module: nn.Module, d: Dist, *, fsdp: bool) -> nn.Module:
    """DDP around ``module`` (or FSDP2 ``fully_shard`` of each decoder layer and the root)."""
    if not d.on:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(module):
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a causal LM: the children of its first ModuleList."""
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            return list(m)
    return []


@torch.no_grad()
def average_(tensors: list[torch.Tensor], d: Dist) -> None:
    """All-reduce ``tensors`` to their mean over the processes, in place (one flat buffer per
    dtype). Every process must pass tensors of the same shapes, in the same order."""
    if not d.on:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= d.world
        at = 0
        for t in group:
            t.copy_(flat[at:at + t.numel()].view_as(t))
            at += t.numel()


def no_sync(engine: nn.Module, last: bool):
    """Skip DDP's gradient all-reduce on every micro-batch but the last."""
    if last or not hasattr(engine, "no_sync"):
        return contextlib.nullcontext()
    return engine.no_sync()
