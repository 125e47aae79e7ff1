"""Fake quantization (RoSTE, METHODS.md section 4), per row, in one read and one write.

For each row r (a token of an activation, an output channel or a group of a
weight) with min m and max M (after the optional rotation), bits b, clip c:

    asymmetric: s = c (M - m) / (2^b - 1),  z = round(-c m / s),  q in [0, 2^b - 1]
    symmetric:  s = c max(|m|, |M|) / (2^(b-1) - 1),  z = 0,  q in [-2^(b-1), 2^(b-1) - 1]
    s = max(s, 1e-8);   q(x) = (clamp(round(x / s) + z, qmin, qmax) - z) s

round is half to even (torch.round), divisions are IEEE (div_rn, or equal to it), fp32 math,
the output in the input's dtype. Two kernels:

- ``rotate_quant_kernel``: the activation path, y = q(scale (H_K kron H_P) x)
  per row, persistent as kernels/hadamard.py's kernel (the next tile or segment
  loaded before the current one is worked on): the transform in registers, the
  row's min/max, the quantizer, one store. A whole-row tile (K = 1, or K <= 32
  with H_K by tl.dot) is transformed once; by segments (larger K or P) each
  segment is transformed twice (a min/max pass, then the quantize pass), the
  second time from L1/L2, so DRAM still sees one read.
- ``quant_rows_kernel``: rows of any length n without a rotation (weights per
  output channel or per group, activations without R): ROWS rows per program,
  one tile when n <= BLOCK, else a min/max sweep and a quantize sweep.

The per-element division y / s is a multiply by the row's 1 / s and one
Markstein correction with fmas (``_div``), equal to the IEEE quotient; rint and
the bf16 conversion are the hardware's on the GPU (bit tricks, with the same
results, under the interpreter only).

csrc/quant_math.h holds the same arithmetic for the C++ and CUDA kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .hadamard import (
    DOT_SIZES,
    factor_tile,
    fetch_tile,
    first_segment,
    first_tile,
    fwht,
    kfactor_arg,
    launch_args,
    mix,
    spec,
    split,
    store_segment,
    store_tile,
    transform_tile,
)
from .sparse_adam import INTERPRET, _round_to

INF = tl.constexpr(float("inf"))
MIN_SCALE = tl.constexpr(1e-8)
MAX_BLOCK = 8192  # quant_rows_kernel: longer rows are swept in chunks of this


@triton.jit
def _rint(x):
    """Round half to even (torch.round): the hardware's rint (FRND) on the GPU; under the
    interpreter, which has no libdevice, by floor (the same result)."""
    if INTERPRET:
        r = tl.floor(x)
        d = x - r  # exact
        h = r * 0.5
        odd = tl.floor(h) != h
        return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)
    else:
        return libdevice.rint(x)


@triton.jit
def _qparams(mn, mx, clip, den, SYMMETRIC: tl.constexpr):
    """(s, 1 / s, z) per row from its min and max; den = 2^b - 1 or 2^(b-1) - 1; 1 / s
    correctly rounded (the quantizer's per-element division is ``_div`` by it)."""
    if SYMMETRIC:
        s = tl.maximum(tl.div_rn(clip * tl.maximum(-mn, mx), den), MIN_SCALE)
        z = tl.zeros_like(s)
    else:
        s = tl.maximum(tl.div_rn(clip * (mx - mn), den), MIN_SCALE)
        z = _rint(tl.div_rn(-clip * mn, s))
    return s, tl.div_rn(tl.zeros_like(s) + 1.0, s), z


@triton.jit
def _div(y, s, r):
    """y / s correctly rounded (div_rn's result), from r = RN(1 / s): q0 = y r, then one
    Markstein correction q0 + (y - q0 s) r, each step one fma (y - q0 s is exact). An
    exhaustive test (tests/kernels/test_quant_division.py) checks it against IEEE division;
    the interpreter's tl.fma rounds once too."""
    q0 = y * r
    return tl.fma(tl.fma(-q0, s, y), r, q0)


@triton.jit
def _quant(y, s, r, z, qmin, qmax):
    q = tl.minimum(tl.maximum(_rint(_div(y, s, r)) + z, qmin), qmax)
    return (q - z) * s


@triton.jit
def _tile_qparams(y, K, clip, den, SYMMETRIC: tl.constexpr, KP: tl.constexpr,
                  ROWS: tl.constexpr, P: tl.constexpr):
    """(s, 1 / s, z) of each row of a whole-row tile [KP ROWS, P], each [KP ROWS, 1] (row r's
    at its KP tile rows; scalars for one row); the padding k >= K is left out of the min and
    max."""
    if KP == 1:
        mn, mx = tl.min(y, axis=1), tl.max(y, axis=1)
        s, r, z = _qparams(mn, mx, clip, den, SYMMETRIC)
        return s[:, None], r[:, None], z[:, None]
    elif ROWS == 1:  # one row: scalars
        real = (tl.arange(0, KP) < K)[:, None]
        mn, mx = tl.min(tl.where(real, y, INF)), tl.max(tl.where(real, y, -INF))
        return _qparams(mn, mx, clip, den, SYMMETRIC)
    else:
        real = (tl.arange(0, KP * ROWS) // ROWS < K)[:, None]
        lo = tl.reshape(tl.min(tl.where(real, y, INF), axis=1), [KP, ROWS])
        hi = tl.reshape(tl.max(tl.where(real, y, -INF), axis=1), [KP, ROWS])
        s, r, z = _qparams(tl.min(lo, axis=0), tl.max(hi, axis=0), clip, den, SYMMETRIC)
        return (tl.reshape(tl.broadcast_to(s[None, :], [KP, ROWS]), [KP * ROWS, 1]),
                tl.reshape(tl.broadcast_to(r[None, :], [KP, ROWS]), [KP * ROWS, 1]),
                tl.reshape(tl.broadcast_to(z[None, :], [KP, ROWS]), [KP * ROWS, 1]))


@triton.jit
def _quant_tiles(x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, K, scale, clip, den, qmin,
                 qmax, DOT: tl.constexpr, TRANSPOSE: tl.constexpr, SYMMETRIC: tl.constexpr,
                 KP: tl.constexpr, ROWS: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr):
    """This program's whole-row tiles: transform, per-row min/max, quantize, one store; each
    tile loaded while the one before is worked on."""
    hk = factor_tile(h_ptr, K, TRANSPOSE, KP) if DOT else 0.0
    xn = first_tile(x_ptr, n_rows, stride_x, K, KP, ROWS, P)
    for t in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        row0 = tl.cast(t, tl.int64) * ROWS
        x, xn = fetch_tile(xn, x_ptr, row0, n_rows, stride_x, K, KP, ROWS, P)
        y = transform_tile(x, hk, scale, DOT, KP, ROWS, P, LOG2P)
        s, r, z = _tile_qparams(y, K, clip, den, SYMMETRIC, KP, ROWS, P)
        store_tile(y_ptr, _quant(y, s, r, z, qmin, qmax), row0, n_rows, stride_y, K, KP, ROWS,
                   P)


@triton.jit
def _quant_segments(x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, K, scale, clip, den,
                    qmin, qmax, TRANSPOSE: tl.constexpr, SYMMETRIC: tl.constexpr,
                    ROWS: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr):
    """This program's tiles by segments: a min/max pass, then the quantize pass (its segments
    again from L1/L2), the loads one segment ahead across passes and tiles."""
    hop = tl.num_programs(0) * ROWS
    xn = first_segment(x_ptr, n_rows, stride_x, ROWS, P)
    for t in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = tl.cast(t, tl.int64) * ROWS + tl.arange(0, ROWS)
        mn = tl.full([ROWS], INF, tl.float32)
        mx = tl.full([ROWS], -INF, tl.float32)
        for ko in range(K):
            acc, xn = mix(xn, x_ptr, h_ptr, rows, n_rows, stride_x, ko, K, 0, TRANSPOSE, ROWS,
                          P)
            y = fwht(acc, ROWS, P, LOG2P) * scale
            mn = tl.minimum(mn, tl.min(y, axis=1))
            mx = tl.maximum(mx, tl.max(y, axis=1))
        s, r, z = _qparams(mn, mx, clip, den, SYMMETRIC)
        for ko in range(K):
            acc, xn = mix(xn, x_ptr, h_ptr, rows, n_rows, stride_x, ko, K,
                          tl.where(ko == K - 1, hop, 0), TRANSPOSE, ROWS, P)
            y = fwht(acc, ROWS, P, LOG2P) * scale
            q = _quant(y, s[:, None], r[:, None], z[:, None], qmin, qmax)
            store_segment(y_ptr, q, rows, n_rows, stride_y, ko, P)


@triton.jit
def rotate_quant_kernel(
    x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, K, scale, clip, den, qmin, qmax,
    HAS_K: tl.constexpr, TRANSPOSE: tl.constexpr, SYMMETRIC: tl.constexpr, DOT: tl.constexpr,
    KP: tl.constexpr, ROWS: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr,
):
    if HAS_K:
        if DOT:
            _quant_tiles(x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, K, scale, clip, den,
                         qmin, qmax, True, TRANSPOSE, SYMMETRIC, KP, ROWS, P, LOG2P)
        else:
            _quant_segments(x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, K, scale, clip,
                            den, qmin, qmax, TRANSPOSE, SYMMETRIC, ROWS, P, LOG2P)
    else:
        _quant_tiles(x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, 1, scale, clip, den,
                     qmin, qmax, False, TRANSPOSE, SYMMETRIC, 1, ROWS, P, LOG2P)


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
        s, r, z = _qparams(tl.where(live, mn, 0.0), tl.where(live, mx, 0.0), clip, den,
                           SYMMETRIC)
        q = _quant(x, s[:, None], r[:, None], z[:, None], qmin, qmax)
        tl.store(dst, _round_to(q, y_ptr.dtype.element_ty), mask=mask)
    else:
        mn = tl.full([ROWS], INF, tl.float32)
        mx = tl.full([ROWS], -INF, tl.float32)
        for start in range(0, n, BLOCK):
            mask = rmask & (start + cols < n)[None, :]
            x = tl.load(src + start, mask=mask, other=0.0).to(tl.float32)
            mn = tl.minimum(mn, tl.min(tl.where(mask, x, INF), axis=1))
            mx = tl.maximum(mx, tl.max(tl.where(mask, x, -INF), axis=1))
        s, r, z = _qparams(tl.where(live, mn, 0.0), tl.where(live, mx, 0.0), clip, den,
                           SYMMETRIC)
        for start in range(0, n, BLOCK):
            mask = rmask & (start + cols < n)[None, :]
            x = tl.load(src + start, mask=mask, other=0.0).to(tl.float32)
            q = _quant(x, s[:, None], r[:, None], z[:, None], qmin, qmax)
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
                   transpose: bool = False, dot: bool | None = None) -> torch.Tensor:
    """Per-row (token) q(scale (H_K kron H_P) x) of x2d [R, n]; ``rotate=False`` quantizes x
    itself (then ``kfactor`` and ``scale`` are unused and n is any length). ``dot``: the
    tiling of kernels/hadamard.py (None: by size)."""
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
    grid, meta = launch_args(R, K, P, has_k, x2d.device, dot)
    rotate_quant_kernel[grid](
        x2d, h, y, R, x2d.stride(0), y.stride(0), K, float(scale), float(clip_ratio), den,
        qmin, qmax, HAS_K=has_k, TRANSPOSE=bool(transpose), SYMMETRIC=bool(symmetric), **meta)
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
    """rotate_quant: P = 64..32768 in bf16 (fp16 and fp32 at 4096) by segments with a K
    factor (K = 43) and without, asymmetric (the symmetric variant at P = 4096); whole-row
    tiles with tl.dot (n = 14336 = 28 x 512 in bf16 and fp32, the symmetric variant too, and
    K = 12, 20, 28 at other P); quant_rows: bf16/fp16/fp32."""
    specs = []
    scalars = {s: "fp32" for s in ("scale", "clip", "den", "qmin", "qmax")}
    cases = [(43, P, "bf16", has_k, False) for P in (1 << m for m in range(6, 16))
             for has_k in (False, True)]
    cases += [(43, 4096, "fp16", True, False), (43, 4096, "fp32", True, False),
              (43, 4096, "bf16", False, True), (43, 4096, "bf16", True, True)]
    cases += [(K, P, "bf16", True, False) for K, P in DOT_SIZES]
    cases += [(28, 512, "fp32", True, False), (28, 512, "bf16", True, True)]
    for K, P, dt, has_k, sym in cases:
        specs.append(spec(rotate_quant_kernel, "rotate_quant", dt, has_k, K, P, scalars,
                          {"SYMMETRIC": sym}, " sym" if sym else ""))
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
                # these n are multiples of 16, as the launcher marks them
                hints={"x_ptr": 16, "y_ptr": 16, "stride_x": 16, "stride_y": 16, "n": 16},
                options={"num_warps": warps},
                config=f"n={n} ROWS={rows} BLOCK={block} {dt}{' sym' if sym else ''} "
                       f"warps={warps}"))
    return specs

