"""fastft::hadamard: the orthogonal Walsh-Hadamard-type transform over the last dim.

    y = scale (H_K kron H_P) x,   n = K x P,  P = 2^m,  scale = 1 / sqrt(n) by default

H_P is Sylvester's matrix, applied as log2(P) butterfly stages; H_K the factor
of fastft/ops/hadamard_factors.py (a Paley Hadamard matrix or a seeded random
orthogonal one), applied as a small matmul over the K blocks of P. fp32 math,
the output in x's dtype. ``transpose`` applies H_K^T (H_P is symmetric): the
inverse of the normalised transform, and so its backward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import backends
from ..errors import check
from .hadamard_factors import factor, plan

INFO = backends.register(backends.OpInfo(
    name="fastft::hadamard",
    summary="fast Walsh-Hadamard transform (K x 2^m sizes) over the last dim",
    backends=("triton", "cuda", "cpp", "torch", "reference"),
    cpp_extension="hadamard",
))
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
ROWS = 4096  # rows per chunk of the torch path: its temporaries stay chunk-sized

def butterflies(y: Tensor) -> Tensor:
    """Sylvester's transform over the last dim (a power of two) of a fp32 tensor, unscaled."""
    P = y.shape[-1]
    lead = y.shape[:-1]
    h = 1
    while h < P:
        y = y.reshape(*lead, P // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*lead, P)


def transform_f32(x2d: Tensor, scale: float, transpose: bool) -> Tensor:
    """The torch path on [R, n] rows: fp32 result (the fake-quant op quantises it)."""
    R, n = x2d.shape
    K, P = plan(n)
    y = butterflies(x2d.float().reshape(R, K, P))
    if K > 1:
        hk = factor(K, x2d.device)
        y = torch.matmul(hk.t() if transpose else hk, y)  # [K, K] @ [R, K, P]
    return (y * scale).reshape(R, n)


def _forward(x2d: Tensor, scale: float, transpose: bool, backend: str) -> Tensor:
    """Dispatch point of the backends: [R, n] in, [R, n] out in x's dtype."""
    if backend in ("triton", "cpp", "cuda"):  # None: this backend cannot run it, torch does
        from . import hadamard_kernels

        y = hadamard_kernels.hadamard(x2d, scale, transpose, backend)
        if y is not None:
            return y
    out = torch.empty_like(x2d)
    for a in range(0, x2d.shape[0], ROWS):
        out[a:a + ROWS] = transform_f32(x2d[a:a + ROWS], scale, transpose)
    return out


@torch.library.custom_op("fastft::hadamard", mutates_args=())
@backends.no_autocast
def hadamard_op(x: Tensor, scale: float, transpose: bool) -> Tensor:
    """[R, n] -> [R, n]: scale (H_K kron H_P) x per row (H_K^T with ``transpose``)."""
    backend = backends.choose(INFO, x.device)
    return _forward(x.contiguous(), scale, transpose, backend)


@hadamard_op.register_fake
def _(x, scale, transpose):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.scale, ctx.transpose = inputs[1], inputs[2]


def _backward(ctx, g):
    # y = s M x  ->  dx = s M^T g (M^T: the transposed factor, the same butterflies)
    return torch.ops.fastft.hadamard(g.contiguous(), ctx.scale, not ctx.transpose), None, None


hadamard_op.register_autograd(_backward, setup_context=_setup)


@register_flop_formula(torch.ops.fastft.hadamard)
def _flops(x_shape, *args, **kwargs) -> int:
    R, n = x_shape
    K, P = plan(n)
    return R * n * (int(math.log2(P)) + 2 * K)


def check_input(x, name: str = "x") -> None:
    check(isinstance(x, Tensor) and x.is_floating_point() and x.dtype in FLOATS,
          f"{name} must be a float32, float16 or bfloat16 tensor; got "
          f"{getattr(x, 'dtype', type(x).__name__)}")
    check(x.dim() >= 1 and x.shape[-1] >= 1, f"{name} must have a last dim to transform")


def hadamard(x: Tensor, scale: float | None = None, transpose: bool = False) -> Tensor:
    """The normalised transform over the last dim of ``x`` (any leading shape).

    ``scale`` None: 1 / sqrt(n), so that the transform is orthogonal (its inverse is
    ``hadamard(y, transpose=True)``). Differentiable; fp32 math, output in x's dtype.
    Sizes: n = K x 2^m with a shipped factor K (fastft.ops.hadamard_factors.plan).
    """
    check_input(x)
    n = x.shape[-1]
    plan(n)  # a size without a factor fails here
    s = 1.0 / math.sqrt(n) if scale is None else float(scale)
    if backends.choose(INFO, x.device) == "reference":
        from ..reference import quant as ref

        return ref.hadamard(x, s, transpose)
    y = torch.ops.fastft.hadamard(x.reshape(-1, n), s, bool(transpose))
    return y.reshape(x.shape)


__all__ = ["hadamard", "plan"]
