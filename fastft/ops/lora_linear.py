"""fastft::lora_linear: a frozen linear layer with a LoRA (or LoRA-SB) adapter, fused.

    y = x W0^T + bias + s (x A^T R^T) B^T        (R = identity for LoRA; s = 1 for LoRA-SB)

Forward: the small xa = x A^T (and xa R^T), then one GEMM over the
concatenated K, [x | s xa R^T] x [W0 | B]^T (kernels/lora_matmul.py).
Backward, for dy: dyb = dy B; dX = [dy | s dyb R] x [W0 ; A] in one GEMM;
dA = s (dyb R)^T x, dB = s dy^T (xa R^T), dR = s dyb^T xa. On the Triton
backend dyb and dB come from one kernel that reads dy once (ranks up to
kernels/lora_matmul.py's MAX_FUSED_RANK). W0 never gets a gradient. A, B and
R may be fp32 beside a bf16 base (as PEFT keeps them): the fused GEMMs read
them in the activations' dtype and their gradients come out in their own
dtype, accumulated in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import backends
from . import gemm

INFO = backends.register(backends.OpInfo(
    name="fastft::lora_linear",
    summary="fused LoRA / LoRA-SB linear: one GEMM over [x | s xA^T] [W0 | B]^T, and its backward",
    backends=("triton", "torch", "reference"),
))


def _dual(a1, b1, a2, b2, bias, backend):
    """a1 @ b1 + a2 @ b2 (+ bias), fp32 accumulation, in a1's dtype."""
    if backend == "triton":
        from ..kernels import lora_matmul

        return lora_matmul.dual_matmul(a1, b1, a2, b2, bias)
    out = torch.mm(a1, b1) if bias is None else torch.addmm(bias.to(a1.dtype), a1, b1)
    return out.addmm_(a2, b2)


def _rows_of(b: Tensor, dtype: torch.dtype) -> Tensor:
    """``b`` [r, N] as a contiguous tensor of ``dtype`` (one pass over r x N entries): B^T is a
    strided view of B [N, r], whose rows of r entries a GEMM tile would read element by element
    (scalar loads, no pipelining) where contiguous rows of N are read in vectors."""
    out = torch.empty(b.shape, device=b.device, dtype=dtype)
    return out.copy_(b)


def _small(x, a, dtype):
    """x @ a for the rank-r products: fp32 math, result in ``dtype``."""
    return gemm.mm_f32(x, a.to(x.dtype)).to(dtype)


@backends.no_autocast
def forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
            lora_r: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """(y [T, out], xa = x A^T [T, r] fp32, kept for the backward)."""
    backend = backends.choose(INFO, x.device)
    x = x.contiguous()
    xa = _small(x, lora_a.t(), torch.float32)
    xr = xa if lora_r is None else xa @ lora_r.float().t()
    y = _dual(x, weight.t(), (xr * scale).to(x.dtype), _rows_of(lora_b.t(), x.dtype), bias,
              backend)
    return y, xa


@torch.library.custom_op("fastft::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                lora_r: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """(y [T, out], xa = x A^T [T, r] fp32, kept for the backward)."""
    return forward(x, weight, bias, lora_a, lora_b, lora_r, scale)


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, lora_r, scale):
    return (x.new_empty(x.shape[0], weight.shape[0]),
            x.new_empty(x.shape[0], lora_a.shape[0], dtype=torch.float32))


@backends.no_autocast
def backward(
    dy: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
    lora_r: Tensor | None, scale: float, need_x: bool, need_a: bool, need_b: bool, need_r: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dR, dbias); those not needed are empty."""
    backend = backends.choose(INFO, dy.device)
    dy = dy.contiguous()
    empty = lambda: dy.new_empty(0)  # noqa: E731
    db = empty()
    xs = None
    if need_b:  # dB = dy^T xs with xs = s xa R^T, in dy's dtype
        xr = xa if lora_r is None else xa @ lora_r.float().t()
        xs = (xr * scale).to(dy.dtype)
    kernel = None
    if xs is not None and backend == "triton":
        from ..kernels import lora_matmul

        kernel = lora_matmul if lora_b.shape[1] <= lora_matmul.MAX_FUSED_RANK else None
    if kernel is not None:  # dy B and dB in one read of dy (the backward's largest operand)
        dyb, db32 = kernel.dy_b_and_db(dy, lora_b.to(dy.dtype).contiguous(), xs)
        db = db32.to(lora_b.dtype)
    else:
        dyb = _small(dy, lora_b, torch.float32)  # dy B, [T, r]
        if xs is not None:
            db = gemm.mm_f32(dy.t(), xs).to(lora_b.dtype)
    dyr = dyb if lora_r is None else dyb @ lora_r.float()  # d(xa R^T) = dy B R
    dx = _dual(dy, weight, (dyr * scale).to(dy.dtype), lora_a.to(dy.dtype), None, backend) \
        if need_x else empty()
    da = (gemm.mm_f32((dyr * scale).to(x.dtype).t(), x)).to(lora_a.dtype) if need_a else empty()
    dr = (scale * dyb.t() @ xa).to(lora_r.dtype) if need_r and lora_r is not None else empty()
    dbias = dy.float().sum(0).to(dy.dtype) if need_bias else empty()
    return dx, da, db, dr, dbias


@torch.library.custom_op("fastft::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    dy: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
    lora_r: Tensor | None, scale: float, need_x: bool, need_a: bool, need_b: bool, need_r: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dR, dbias); those not needed are empty."""
    return backward(dy, x, xa, weight, lora_a, lora_b, lora_r, scale, need_x, need_a, need_b,
                    need_r, need_bias)


@lora_linear_backward.register_fake
def _(dy, x, xa, weight, lora_a, lora_b, lora_r, scale, need_x, need_a, need_b, need_r,
      need_bias):
    empty = lambda: dy.new_empty(0)  # noqa: E731
    return (torch.empty_like(x) if need_x else empty(),
            torch.empty_like(lora_a) if need_a else empty(),
            torch.empty_like(lora_b) if need_b else empty(),
            torch.empty_like(lora_r) if need_r and lora_r is not None else empty(),
            dy.new_empty(dy.shape[1]) if need_bias else empty())


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, lora_r, scale = inputs
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, output[1], weight, lora_a, lora_b, lora_r)


def _grads(ctx, dy, run):
    """The gradients of (x, weight, bias, A, B, R, scale) by ``run``: the backward op, or its
    implementation itself."""
    x, xa, weight, lora_a, lora_b, lora_r = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, da, db, dr, dbias = run(
        dy, x, xa, weight, lora_a, lora_b, lora_r, ctx.scale, need[0], need[3], need[4],
        bool(need[5]), bool(ctx.has_bias and need[2]))
    pick = lambda t, n: t if n else None  # noqa: E731
    return pick(dx, need[0]), None, pick(dbias, ctx.has_bias and need[2]), pick(da, need[3]), \
        pick(db, need[4]), pick(dr, need[5]), None


def _backward(ctx, dy, _dxa):
    return _grads(ctx, dy, torch.ops.fastft.lora_linear_backward)


lora_linear.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The op's forward and backward without the custom-op dispatcher (see
    backends.eager_ok): the same implementations, the same saved tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, lora_r, scale):
        y, xa = forward(x, weight, bias, lora_a, lora_b, lora_r, scale)
        _setup_context(ctx, (x, weight, bias, lora_a, lora_b, lora_r, scale), (y, xa))
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, backward)


def apply(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
          lora_r: Tensor | None, scale: float) -> Tensor:
    """y = x W0^T + bias + s (x A^T R^T) B^T for x [T, in]: the custom op where tracing or
    fake tensors need it, else the same implementation called directly."""
    if backends.eager_ok(x, weight, bias, lora_a, lora_b, lora_r):
        return _Eager.apply(x, weight, bias, lora_a, lora_b, lora_r, scale)
    return torch.ops.fastft.lora_linear(x, weight, bias, lora_a, lora_b, lora_r, scale)[0]


@register_flop_formula(torch.ops.fastft.lora_linear)
def _flops(x_shape, w_shape, bias_shape, a_shape, b_shape, r_shape, *args, **kwargs) -> int:
    T, K = x_shape
    N, r = w_shape[0], a_shape[0]
    extra = 2 * T * r * r if r_shape is not None else 0
    return 2 * T * K * N + 2 * T * K * r + 2 * T * r * N + extra


@register_flop_formula(torch.ops.fastft.lora_linear_backward)
def _flops_bwd(dy_shape, x_shape, xa_shape, w_shape, a_shape, b_shape, r_shape, scale, need_x,
               need_a, need_b, need_r, need_bias, **kwargs) -> int:
    T, N = dy_shape
    K, r = x_shape[1], a_shape[0]
    total = 2 * T * N * r  # dy B
    total += (2 * T * N * K + 2 * T * r * K) if need_x else 0
    total += 2 * r * T * K if need_a else 0
    total += 2 * N * T * r if need_b else 0
    total += 2 * r * T * r if need_r else 0
    return total
