"""GEMMs with fp32 results from half-precision operands, without upcasting the operands.

On CUDA, ``torch.ops.aten.mm.dtype`` / ``addmm.dtype_out`` let cuBLAS read
bf16/fp16 and write or accumulate fp32; elsewhere (the CPU, older GPUs) the
operands are cast to fp32 first.
"""

from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)
_ok: dict[str, bool] = {}


def mixed_ok(t: torch.Tensor) -> bool:
    """Whether half-precision GEMMs on t's device can produce fp32 directly."""
    if not (t.is_cuda and t.dtype in _HALF):
        return False
    key = f"{t.device}:{t.dtype}"
    if key not in _ok:
        try:
            x = torch.ones(16, 16, device=t.device, dtype=t.dtype)
            acc = torch.zeros(16, 16, device=t.device, dtype=torch.float32)
            torch.ops.aten.addmm.dtype_out(acc, x, x, torch.float32, out=acc)
            _ok[key] = bool(torch.ops.aten.mm.dtype(x, x, torch.float32)[0, 0] == 16)
        except (RuntimeError, NotImplementedError):
            _ok[key] = False
    return _ok[key]


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32."""
    if a.dtype == b.dtype and mixed_ok(a):
        return torch.ops.aten.mm.dtype(a, b, torch.float32)
    return a.float() @ b.float()


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b with acc fp32."""
    if a.dtype == b.dtype and mixed_ok(a):
        return torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())
