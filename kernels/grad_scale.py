"""In-place scaling of a gradient by a device scalar, skipped on the device when it is one.

A fused loss op forms its gradients in the forward for an upstream gradient of one; the
backward multiplies them by the real upstream gradient g (a one-element fp32 tensor on the
GPU). Reading g on the host would be a device sync; multiplying by it unread would be a
pass over the whole gradient (grad_W of a 128256 x 4096 head is 2 GiB in fp32, about a
millisecond of DRAM time) even in the common case of a loss backpropagated as it is
(g = 1). Here each program reads g itself and returns before it touches its block when g
is one: the launch stays, the traffic goes.

``t = t * g`` in fp32 (the product of an fp32 or bf16 entry and fp32 g, rounded once to
t's dtype: round to nearest even). Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_adam import _round_to

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def scale_kernel(t_ptr, g_ptr, n, BLOCK: tl.constexpr):
    g = tl.load(g_ptr)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(t_ptr + offs, _round_to(x * g, t_ptr.dtype.element_ty), mask=mask)


def scale_(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """t *= g in place (t contiguous, fp32/bf16/fp16; g a one-element fp32 tensor on t's
    device); no work past the read of g where g == 1. Returns t."""
    if not t.is_contiguous():
        raise ValueError("grad_scale: the gradient must be contiguous")
    n = t.numel()
    if n:
        scale_kernel[(triton.cdiv(n, BLOCK),)](t, g, n, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return t


def aot_specs():
    return [dict(name="grad_scale", kernel=scale_kernel, matrix=False,
                 signature={"t_ptr": f"*{dt}", "g_ptr": "*fp32", "n": "i64"},
                 constexprs={"BLOCK": BLOCK}, hints={"t_ptr": 16, "g_ptr": 16, "n": 16},
                 options={"num_warps": NUM_WARPS}, config=f"BLOCK={BLOCK} {dt}")
            for dt in ("fp32", "bf16")]
