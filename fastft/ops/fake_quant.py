"""fastft::fake_quant_act and fastft::fake_quant_weight: RoSTE's fake quantizers (METHODS §4).

    q(x) = (clamp(round(x / s) + z, qmin, qmax) - z) s
    asymmetric: s = c (max - min) / (2^b - 1), z = round(-c min / s), [0, 2^b - 1]
    symmetric:  s = c max|x| / (2^(b-1) - 1),  z = 0, [-2^(b-1), 2^(b-1) - 1]

with s = max(s, 1e-8) (a constant row never divides by zero) and round half to
even (torch.round). Activations per token (a row of the last dim), optionally
rotated first (y = q(H x): one read of x and one write in the fused kernels);
weights per output channel (a row of [out, in]) or per group of ``group_size``
inputs. The backward is straight-through: identity, then H^T for a rotated input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends
from ..errors import check
from .hadamard import ROWS, check_input, hadamard, plan, transform_f32

ACT_INFO = backends.register(backends.OpInfo(
    name="fastft::fake_quant_act",
    summary="per-token fake quantization, optionally after the Hadamard rotation (fused)",
    backends=("triton", "cuda", "cpp", "torch", "reference"),
    cpp_extension="hadamard",
))
WEIGHT_INFO = backends.register(backends.OpInfo(
    name="fastft::fake_quant_weight",
    summary="per-channel (or per-group) weight fake quantization",
    backends=("triton", "cuda", "cpp", "torch", "reference"),
    cpp_extension="hadamard",
))


def ieee_div(x: Tensor, d: float) -> Tensor:
    """x / d correctly rounded on every device. CUDA divides a tensor by a Python number as
    x * (1 / d), an ulp off the division the kernels do (div_rn, IEEE '/'): a scale off by an
    ulp made the export reject weights the Triton quantizer had produced."""
    return x / x.new_full((), d)


def row_qparams(x: Tensor, bits: int, symmetric: bool, clip_ratio: float):
    """(s, z) of each row of a fp32 [R, C] tensor, each [R, 1] (z = 0 when symmetric)."""
    if symmetric:
        s = ieee_div(clip_ratio * x.abs().amax(1, keepdim=True), 2 ** (bits - 1) - 1)
        s = s.clamp(min=1e-8)
        return s, torch.zeros_like(s)
    mx, mn = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    s = ieee_div(clip_ratio * (mx - mn), 2**bits - 1).clamp(min=1e-8)
    return s, torch.round(-clip_ratio * mn / s)


def quantize_rows(x: Tensor, bits: int, symmetric: bool, clip_ratio: float) -> Tensor:
    """q(x) of each row of a fp32 [R, C] tensor (the torch path)."""
    s, z = row_qparams(x, bits, symmetric, clip_ratio)
    if symmetric:
        return torch.clamp(torch.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
    return (torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1) - z) * s


def _act_forward(x2d: Tensor, bits: int, symmetric: bool, clip_ratio: float, rotate: bool,
                 backend: str) -> Tensor:
    """Dispatch point of the backends: [R, n] in, [R, n] out in x's dtype."""
    if backend in ("triton", "cpp", "cuda"):  # None: this backend cannot run it, torch does
        from . import hadamard_kernels

        y = hadamard_kernels.fake_quant_act(x2d, bits, symmetric, clip_ratio, rotate, backend)
        if y is not None:
            return y
    out = torch.empty_like(x2d)
    n = x2d.shape[1]
    for a in range(0, x2d.shape[0], ROWS):
        part = x2d[a:a + ROWS]
        y = transform_f32(part, 1.0 / math.sqrt(n), False) if rotate else part.float()
        out[a:a + ROWS] = quantize_rows(y, bits, symmetric, clip_ratio)
    return out


def _weight_forward(w: Tensor, bits: int, symmetric: bool, clip_ratio: float,
                    group_size: int, backend: str) -> Tensor:
    """Dispatch point of the backends: [out, in] in, [out, in] out in w's dtype."""
    if backend in ("triton", "cpp", "cuda"):  # None: this backend cannot run it, torch does
        from . import hadamard_kernels

        y = hadamard_kernels.fake_quant_weight(w, bits, symmetric, clip_ratio, group_size,
                                               backend)
        if y is not None:
            return y
    rows = w.reshape(-1, group_size) if group_size else w
    return quantize_rows(rows.float(), bits, symmetric, clip_ratio).to(w.dtype).reshape(w.shape)


@torch.library.custom_op("fastft::fake_quant_act", mutates_args=())
@backends.no_autocast
def fake_quant_act_op(x: Tensor, bits: int, symmetric: bool, clip_ratio: float,
                      rotate: bool) -> Tensor:
    backend = backends.choose(ACT_INFO, x.device)
    return _act_forward(x.contiguous(), bits, symmetric, clip_ratio, rotate, backend)


@fake_quant_act_op.register_fake
def _(x, bits, symmetric, clip_ratio, rotate):
    return torch.empty_like(x)


def _act_setup(ctx, inputs, output):
    ctx.rotate, ctx.n = inputs[4], inputs[0].shape[1]


def _act_backward(ctx, g):
    # straight through q; then the transposed rotation
    gx = torch.ops.fastft.hadamard(g.contiguous(), 1.0 / math.sqrt(ctx.n), True) \
        if ctx.rotate else g
    return gx, None, None, None, None


fake_quant_act_op.register_autograd(_act_backward, setup_context=_act_setup)


@torch.library.custom_op("fastft::fake_quant_weight", mutates_args=())
@backends.no_autocast
def fake_quant_weight_op(w: Tensor, bits: int, symmetric: bool, clip_ratio: float,
                         group_size: int) -> Tensor:
    backend = backends.choose(WEIGHT_INFO, w.device)
    return _weight_forward(w.contiguous(), bits, symmetric, clip_ratio, group_size, backend)


@fake_quant_weight_op.register_fake
def _(w, bits, symmetric, clip_ratio, group_size):
    return torch.empty_like(w)


fake_quant_weight_op.register_autograd(lambda ctx, g: (g, None, None, None, None),
                                       setup_context=lambda ctx, inputs, output: None)


def check_options(bits, symmetric, clip_ratio) -> None:
    check(isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 8,
          f"bits must be an integer in 2..8; got {bits!r}")
    check(isinstance(symmetric, bool), f"symmetric must be True or False; got {symmetric!r}")
    check(isinstance(clip_ratio, (int, float)) and 0.0 < float(clip_ratio) <= 1.0,
          f"clip_ratio must be in (0, 1]; got {clip_ratio!r}")


def fake_quant_act(x: Tensor, bits: int = 4, symmetric: bool = False, clip_ratio: float = 1.0,
                   rotate: bool = False) -> Tensor:
    """q(x) per token over the last dim (q(H x) with ``rotate``); straight-through gradient."""
    check_input(x)
    check_options(bits, symmetric, clip_ratio)
    n = x.shape[-1]
    if rotate:
        plan(n)
    if backends.choose(ACT_INFO, x.device) == "reference":
        from ..reference import quant as ref

        y = ref.hadamard(x.detach().float()) if rotate else x.detach().float()
        q = ref.fake_quant(y, bits, symmetric, float(clip_ratio)).to(x.dtype)
        through = hadamard(x) if rotate else x
        return through + (q - through).detach()  # straight through
    y = torch.ops.fastft.fake_quant_act(x.reshape(-1, n), bits, symmetric, float(clip_ratio),
                                        bool(rotate))
    return y.reshape(x.shape)


def fake_quant_weight(w: Tensor, bits: int = 4, symmetric: bool = False,
                      clip_ratio: float = 1.0, group_size: int | None = None) -> Tensor:
    """q(w) per output channel (row of [out, in]) or per group of ``group_size`` inputs."""
    check_input(w, "weight")
    check(w.dim() == 2, f"weight must be [out, in]; got shape {tuple(w.shape)}")
    check_options(bits, symmetric, clip_ratio)
    g = int(group_size or 0)
    check(g == 0 or (g >= 1 and w.shape[1] % g == 0),
          f"group_size must divide the input size {w.shape[1]}; got {group_size!r}")
    if backends.choose(WEIGHT_INFO, w.device) == "reference":
        from ..reference import quant as ref

        rows = w.detach().reshape(-1, g) if g else w.detach()
        q = ref.fake_quant(rows, bits, symmetric, float(clip_ratio)).to(w.dtype).reshape(w.shape)
        return w + (q - w).detach()
    return torch.ops.fastft.fake_quant_weight(w, bits, symmetric, float(clip_ratio), g)
