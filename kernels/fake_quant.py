"""Fake quantization (RoSTE, METHODS.md section 4), per row, in one read and one write.

For each row r (a token of an activation, an output channel or a group of a
weight) with min m and max M (after the optional rotation), bits b, clip c:

    asymmetric: s = c (M - m) / (2^b - 1),  z = round(-c m / s),  q in [0, 2^b - 1]
    symmetric:  s = c max(|m|, |M|) / (2^(b-1) - 1),  z = 0,  q in [-2^(b-1), 2^(b-1) - 1]
    s = max(s, 1e-8);   q(x) = (clamp(round(x / s) + z, qmin, qmax) - z) s

round is half to even (torch.round), divisions are IEEE (div_rn), fp32 math,
the output in the input's dtype. Two kernels:

- ``rotate_quant_kernel``: the activation path, y = q(scale (H_K kron H_P) x)
  per row: the transform of kernels/hadamard.py in registers, the row's
  min/max, the quantizer, one store. With K = 1 the row is one register tile;
  with K > 1 its segments are transformed twice (a min/max pass, then the
  quantize pass), the second time from L1/L2, so DRAM still sees one read.
- ``quant_rows_kernel``: rows of any length n without a rotation (weights per
  output channel or per group, activations without R): ROWS rows per program,
  one tile when n <= BLOCK, else a min/max sweep and a quantize sweep.

csrc/quant_math.h holds the same arithmetic for the C++ and CUDA kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hadamard import config, kfactor_arg, segment, split
from .sparse_adam import _round_to

INF = tl.constexpr(float("inf"))
MIN_SCALE = tl.constexpr(1e-8)
MAX_BLOCK = 8192  # quant_rows_kernel: longer rows are swept in chunks of this


@triton.jit
def _rint(x):
    """Round half to even (torch.round), by floor: the same on the GPU and the interpreter."""
    r = tl.floor(x)
    d = x - r  # exact
    h = r * 0.5
    odd = tl.floor(h) != h
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def _qparams(mn, mx, clip, den, SYMMETRIC: tl.constexpr):
    """(s, z) per row from its min and max; den = 2^b - 1 or 2^(b-1) - 1."""
    if SYMMETRIC:
        s = tl.maximum(tl.div_rn(clip * tl.maximum(-mn, mx), den), MIN_SCALE)
        z = tl.zeros_like(s)
    else:
        s = tl.maximum(tl.div_rn(clip * (mx - mn), den), MIN_SCALE)
        z = _rint(tl.div_rn(-clip * mn, s))
    return s, z


@triton.jit
def _quant(y, s, z, qmin, qmax):
    q = tl.minimum(tl.maximum(_rint(tl.div_rn(y, s)) + z, qmin), qmax)
    return (q - z) * s


@triton.jit
def rotate_quant_kernel(
    x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, K, scale, clip, den, qmin, qmax,
    HAS_K: tl.constexpr, TRANSPOSE: tl.constexpr, SYMMETRIC: tl.constexpr, ROWS: tl.constexpr,
    P: tl.constexpr, LOG2P: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, P)
    mask = (rows < n_rows)[:, None] & (cols < P)[None, :]
    src = x_ptr + rows[:, None] * stride_x + cols[None, :]
    dst = y_ptr + rows[:, None] * stride_y + cols[None, :]
    if HAS_K:
        mn = tl.full([ROWS], INF, tl.float32)
        mx = tl.full([ROWS], -INF, tl.float32)
        for ko in range(K):
            y = segment(src, mask, h_ptr, ko, K, scale, HAS_K, TRANSPOSE, ROWS, P, LOG2P)
            mn = tl.minimum(mn, tl.min(y, axis=1))
            mx = tl.maximum(mx, tl.max(y, axis=1))
        s, z = _qparams(mn, mx, clip, den, SYMMETRIC)
        for ko in range(K):
            y = segment(src, mask, h_ptr, ko, K, scale, HAS_K, TRANSPOSE, ROWS, P, LOG2P)
            q = _quant(y, s[:, None], z[:, None], qmin, qmax)
            tl.store(dst + ko * P, _round_to(q, y_ptr.dtype.element_ty), mask=mask)
    else:
        y = segment(src, mask, h_ptr, 0, 1, scale, HAS_K, TRANSPOSE, ROWS, P, LOG2P)
        s, z = _qparams(tl.min(y, axis=1), tl.max(y, axis=1), clip, den, SYMMETRIC)
        q = _quant(y, s[:, None], z[:, None], qmin, qmax)
        tl.store(dst, _round_to(q, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def quant_rows_kernel(
    x_ptr, y_ptr, n_rows, n, stride_x, stride_y, clip, den, qmin, qmax,
    SYMMETRIC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    live = rows < n_rows  # rows past the end: min/max 0, so no inf - inf in their (s, z)
    rmask = live[:, None]
    src = x_ptr + rows[:, None] * stride_x + cols[None, :]
    dst = y_ptr + rows[:, None] * stride_y + cols[None, :]
    if ONE_TILE:
        mask = rmask & (cols < n)[None, :]
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        mn = tl.min(tl.where(mask, x, INF), axis=1)
        mx = tl.max(tl.where(mask, x, -INF), axis=1)
        s, z = _qparams(tl.where(live, mn, 0.0), tl.where(live, mx, 0.0), clip, den, SYMMETRIC)
        q = _quant(x, s[:, None], z[:, None], qmin, qmax)
        tl.store(dst, _round_to(q, y_ptr.dtype.element_ty), mask=mask)
    else:
        mn = tl.full([ROWS], INF, tl.float32)
        mx = tl.full([ROWS], -INF, tl.float32)
        for start in range(0, n, BLOCK):
            mask = rmask & (start + cols < n)[None, :]
            x = tl.load(src + start, mask=mask, other=0.0).to(tl.float32)
            mn = tl.minimum(mn, tl.min(tl.where(mask, x, INF), axis=1))
            mx = tl.maximum(mx, tl.max(tl.where(mask, x, -INF), axis=1))
        s, z = _qparams(tl.where(live, mn, 0.0), tl.where(live, mx, 0.0), clip, den, SYMMETRIC)
        for start in range(0, n, BLOCK):
            mask = rmask & (start + cols < n)[None, :]
            x = tl.load(src + start, mask=mask, other=0.0).to(tl.float32)
            q = _quant(x, s[:, None], z[:, None], qmin, qmax)
            tl.store(dst + start, _round_to(q, y_ptr.dtype.element_ty), mask=mask)


def qrange(bits: int, symmetric: bool) -> tuple[float, float, float]:
    """(den, qmin, qmax) of the quantizer: den divides the range (or max |x|) into s."""
    if not 1 <= bits <= 16 or symmetric and bits < 2:
        raise ValueError(f"fake quant: bits must be in [1, 16] ([2, 16] symmetric); got {bits}")
    if symmetric:
        half = 2 ** (bits - 1)
        return float(half - 1), float(-half), float(half - 1)
    return float(2**bits - 1), 0.0, float(2**bits - 1)


def rows_config(n: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps) of quant_rows_kernel for rows of n."""
    block = min(MAX_BLOCK, triton.next_power_of_2(max(n, 1)))
    rows = max(1, 2048 // block)
    return rows, block, min(16, max(1, rows * block // 512))


def fake_quant_rows(x2d: torch.Tensor, bits: int, symmetric: bool,
                    clip_ratio: float) -> torch.Tensor:
    """q(x) per row of x2d [R, n] (unit column stride), in x2d's dtype."""
    R, n = x2d.shape
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    y = torch.empty((R, n), device=x2d.device, dtype=x2d.dtype)
    if R == 0 or n == 0:
        return y
    den, qmin, qmax = qrange(bits, symmetric)
    rows, block, warps = rows_config(n)
    quant_rows_kernel[(triton.cdiv(R, rows),)](
        x2d, y, R, n, x2d.stride(0), y.stride(0), float(clip_ratio), den, qmin, qmax,
        SYMMETRIC=bool(symmetric), ROWS=rows, BLOCK=block, ONE_TILE=n <= block,
        num_warps=warps)
    return y


def fake_quant_act(x2d: torch.Tensor, kfactor: torch.Tensor | None, scale: float, bits: int,
                   symmetric: bool, clip_ratio: float, *, rotate: bool = True,
                   transpose: bool = False) -> torch.Tensor:
    """Per-row (token) q(scale (H_K kron H_P) x) of x2d [R, n]; ``rotate=False`` quantizes x
    itself (then ``kfactor`` and ``scale`` are unused and n is any length)."""
    if not rotate:
        return fake_quant_rows(x2d, bits, symmetric, clip_ratio)
    R, n = x2d.shape
    K, P = split(n, kfactor)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    y = torch.empty((R, n), device=x2d.device, dtype=x2d.dtype)
    if R == 0 or n == 0:
        return y
    den, qmin, qmax = qrange(bits, symmetric)
    h, has_k = kfactor_arg(kfactor, x2d)
    rows, warps = config(P)
    rotate_quant_kernel[(triton.cdiv(R, rows),)](
        x2d, h, y, R, x2d.stride(0), y.stride(0), K, float(scale), float(clip_ratio), den,
        qmin, qmax, HAS_K=has_k, TRANSPOSE=bool(transpose), SYMMETRIC=bool(symmetric),
        ROWS=rows, P=P, LOG2P=P.bit_length() - 1, num_warps=warps)
    return y


def fake_quant_weight(w: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float,
                      group_size: int = 0) -> torch.Tensor:
    """q(w) per output row of w [out, in] (per group of ``group_size`` consecutive inputs
    when 0 < group_size < in; group_size must divide in); w's dtype and shape."""
    out_f, in_f = w.shape
    g = in_f if group_size <= 0 or group_size >= in_f else group_size
    if in_f % g:
        raise ValueError(f"fake_quant_weight: group_size {g} does not divide in_features {in_f}")
    w = w.contiguous()
    return fake_quant_rows(w.view(out_f * (in_f // g), g), bits, symmetric,
                           clip_ratio).view(out_f, in_f)


def aot_specs():
    """rotate_quant: P = 64..32768 in bf16 (fp16 and fp32 at 4096), with and without a K
    factor, asymmetric (the symmetric variant at P = 4096); quant_rows: bf16/fp16/fp32."""
    specs, hints = [], {"x_ptr": 16, "h_ptr": 16, "y_ptr": 16, "stride_x": 16, "stride_y": 16}
    scalars = {s: "fp32" for s in ("scale", "clip", "den", "qmin", "qmax")}
    cases = [(P, "bf16", has_k, False) for P in (1 << m for m in range(6, 16))
             for has_k in (False, True)]
    cases += [(4096, "fp16", True, False), (4096, "fp32", True, False),
              (4096, "bf16", False, True), (4096, "bf16", True, True)]
    for P, dt, has_k, sym in cases:
        rows, warps = config(P)
        specs.append(dict(
            name="rotate_quant", kernel=rotate_quant_kernel, matrix=False,
            signature={"x_ptr": f"*{dt}", "h_ptr": "*fp32" if has_k else f"*{dt}",
                       "y_ptr": f"*{dt}", "n_rows": "i32", "stride_x": "i64", "stride_y": "i64",
                       "K": "i32", **scalars},
            constexprs={"HAS_K": has_k, "TRANSPOSE": False, "SYMMETRIC": sym, "ROWS": rows,
                        "P": P, "LOG2P": P.bit_length() - 1},
            hints=hints, options={"num_warps": warps},
            config=f"P={P} ROWS={rows} {dt}{' K' if has_k else ''}{' sym' if sym else ''} "
                   f"warps={warps}"))
    for n, dt in ((128, "bf16"), (4096, "bf16"), (4096, "fp16"), (4096, "fp32"),
                  (11008, "bf16")):
        rows, block, warps = rows_config(n)
        for sym in (False, True):
            specs.append(dict(
                name="quant_rows", kernel=quant_rows_kernel, matrix=False,
                signature={"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "n_rows": "i32", "n": "i32",
                           "stride_x": "i64", "stride_y": "i64",
                           **{s: "fp32" for s in ("clip", "den", "qmin", "qmax")}},
                constexprs={"SYMMETRIC": sym, "ROWS": rows, "BLOCK": block,
                            "ONE_TILE": n <= block},
                hints={"x_ptr": 16, "y_ptr": 16, "stride_x": 16, "stride_y": 16},
                options={"num_warps": warps},
                config=f"n={n} ROWS={rows} BLOCK={block} {dt}{' sym' if sym else ''} "
                       f"warps={warps}"))
    return specs

