"""The fast Walsh-Hadamard transform over the last dim: y = scale (H_K kron H_P) x.

A row of n = K P elements is K segments of P = 2^m; H_P is the Sylvester
Hadamard matrix (entries +-1, unnormalised) and H_K a K x K factor given as an
fp32 matrix (+-1 for Hadamard orders, sqrt(K) times an orthogonal matrix for
the random fallback; K = 1 when n is a power of two). ``transpose`` uses H_K^T
(H_P is symmetric). ``scale`` is usually 1 / sqrt(n).

``hadamard_kernel``: one program per ROWS rows (ROWS > 1 packs short rows,
P < 2048, into one tile). Output segment ko of a row is
``fwht(sum_ki H_K[ko, ki] x[ki])``: the K-factor is K axpys over segments read
from memory (the row stays in L1/L2 across the K passes, so DRAM sees one
read), then one transform of P elements in registers. The transform is
log2(P) constant-geometry stages, each (x[2i], x[2i+1]) -> (x[i], x[i + P/2])
= (a + b, a - b), written as reshape / split / join / permute: Triton's linear
layouts turn most of these into register renames, so a P = 8192 row does 13
stages with about 3 exchanges through shared memory. Every P = 2^m up to
32768 runs in one program (at 32768: 32 warps, at most 64 registers, no
spills, 128 KiB of shared memory, within sm_80's and sm_90's limits); a
larger P is left to the op's torch path.

fp32 math; x and y in fp32, fp16 or bf16 (y rounded to nearest even once).
kernels/fake_quant.py reuses ``fwht`` and ``segment``; csrc/hadamard.cpp and
csrc/hadamard.cu compute the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_adam import _round_to

MAX_P = 32768
TILE = 2048  # elements per program for short rows


def config(P: int) -> tuple[int, int]:
    """(ROWS, num_warps) for segments of P: ~16 fp32 per thread, at most 32 warps."""
    rows = max(1, TILE // P)
    return rows, min(32, max(1, rows * P // 512))


@triton.jit
def fwht(x, ROWS: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform (Sylvester order) of each row of x [ROWS, P]."""
    for _ in tl.static_range(LOG2P):
        a, b = tl.split(tl.reshape(x, [ROWS, P // 2, 2]))
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 2, 1]), [ROWS, P])
    return x


@triton.jit
def segment(ptrs, mask, h_ptr, ko, K, scale, HAS_K: tl.constexpr, TRANSPOSE: tl.constexpr,
            ROWS: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr):
    """Output segment ko [ROWS, P] of the rows at ``ptrs`` (segment 0's addresses), fp32."""
    if HAS_K:
        acc = tl.zeros([ROWS, P], tl.float32)
        for ki in range(K):
            if TRANSPOSE:
                h = tl.load(h_ptr + ki * K + ko)
            else:
                h = tl.load(h_ptr + ko * K + ki)
            acc += h * tl.load(ptrs + ki * P, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return fwht(acc, ROWS, P, LOG2P) * scale


@triton.jit
def hadamard_kernel(
    x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, K, scale,
    HAS_K: tl.constexpr, TRANSPOSE: tl.constexpr, ROWS: tl.constexpr, P: tl.constexpr,
    LOG2P: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, P)
    mask = (rows < n_rows)[:, None] & (cols < P)[None, :]
    src = x_ptr + rows[:, None] * stride_x + cols[None, :]
    dst = y_ptr + rows[:, None] * stride_y + cols[None, :]
    if HAS_K:
        for ko in range(K):
            y = segment(src, mask, h_ptr, ko, K, scale, HAS_K, TRANSPOSE, ROWS, P, LOG2P)
            tl.store(dst + ko * P, _round_to(y, y_ptr.dtype.element_ty), mask=mask)
    else:
        y = segment(src, mask, h_ptr, 0, 1, scale, HAS_K, TRANSPOSE, ROWS, P, LOG2P)
        tl.store(dst, _round_to(y, y_ptr.dtype.element_ty), mask=mask)


def split(n: int, kfactor: torch.Tensor | None) -> tuple[int, int]:
    """(K, P) of rows of n with this K factor; P must be a power of two <= MAX_P."""
    K = 1 if kfactor is None else kfactor.shape[0]
    P = n // K
    if K * P != n or P & (P - 1) or not 1 <= P <= MAX_P:
        raise ValueError(f"hadamard kernel: n={n} is not K={K} times a power of two <= {MAX_P}")
    if kfactor is not None and tuple(kfactor.shape) != (K, K):
        raise ValueError(
            f"hadamard kernel: the K factor must be square; got {tuple(kfactor.shape)}")
    return K, P


def kfactor_arg(kfactor: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The K factor as a contiguous fp32 tensor on x's device (x itself when there is none)."""
    if kfactor is None:
        return x, False
    return kfactor.to(device=x.device, dtype=torch.float32).contiguous(), True


def hadamard(x2d: torch.Tensor, kfactor: torch.Tensor | None, scale: float,
             transpose: bool = False) -> torch.Tensor:
    """y = scale (H_K kron H_P) x2d over the last dim (H_K^T when ``transpose``); x2d [R, n]
    with unit column stride, fp32/fp16/bf16; y has x2d's dtype. ``kfactor``: [K, K] or None."""
    R, n = x2d.shape
    K, P = split(n, kfactor)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    y = torch.empty((R, n), device=x2d.device, dtype=x2d.dtype)
    if R == 0 or n == 0:
        return y
    h, has_k = kfactor_arg(kfactor, x2d)
    rows, warps = config(P)
    hadamard_kernel[(triton.cdiv(R, rows),)](
        x2d, h, y, R, x2d.stride(0), y.stride(0), K, float(scale),
        HAS_K=has_k, TRANSPOSE=bool(transpose), ROWS=rows, P=P, LOG2P=P.bit_length() - 1,
        num_warps=warps)
    return y


SIZES = tuple(1 << m for m in range(6, 16))  # P = 64 ... 32768: the AOT table
DTYPES = ("bf16", "fp16", "fp32")


def aot_specs():
    """Every P = 64..32768 in bf16/fp16/fp32 with a K factor (the K = 1 variant in bf16)."""
    specs = []
    for P in SIZES:
        rows, warps = config(P)
        for dt in DTYPES:
            for has_k in ((False, True) if dt == "bf16" else (True,)):
                specs.append(dict(
                    name="hadamard", kernel=hadamard_kernel, matrix=False,
                    signature={"x_ptr": f"*{dt}", "h_ptr": "*fp32" if has_k else f"*{dt}",
                               "y_ptr": f"*{dt}", "n_rows": "i32", "stride_x": "i64",
                               "stride_y": "i64", "K": "i32", "scale": "fp32"},
                    constexprs={"HAS_K": has_k, "TRANSPOSE": False, "ROWS": rows, "P": P,
                                "LOG2P": P.bit_length() - 1},
                    hints={"x_ptr": 16, "h_ptr": 16, "y_ptr": 16, "stride_x": 16,
                           "stride_y": 16},
                    options={"num_warps": warps},
                    config=f"P={P} ROWS={rows} {dt}{' K' if has_k else ''} warps={warps}"))
    return specs
