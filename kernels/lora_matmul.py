"""The fused LoRA GEMM: one output tile accumulates two products over two K ranges.

    C[M, N] = A1[M, K1] @ B1[K1, N] + A2[M, K2] @ B2[K2, N]  (+ bias[N])

Forward of a LoRA linear: A1 = x, B1 = W0^T, A2 = s x A^T (r columns), B2 = B^T:
the GEMM over the concatenation [x | s x A^T] x [W0 | B]^T without building it.
Backward for dX: A1 = dY, B1 = W0, A2 = s dY B, B2 = A. The second K range is
the adapter rank (16..256): a few more K steps of the same tile, so the LoRA
term costs almost nothing beyond the frozen GEMM. fp32 accumulation, operands
of any strides (transposes are strides), int64 row offsets.

The backward's two rank-r products of dY, dY B [T, r] and dB = dY^T (s x A^T) [N, r],
run as one kernel (``dy_b_db_kernel``) that reads dY once: program (n, t) holds a
column block of dY's N and a span of its T, and for each tile of dY forms the tile's
share of dY B (summed over the N blocks afterwards: partials [N / BLOCK_N, T, r]) and
adds the tile's share of dB (partials [S, N, r], one per span). Partials and their sums
keep the result deterministic; they cost 2 r / BLOCK_N of dY's bytes each way, so the
kernel serves ranks up to MAX_FUSED_RANK.
"""

from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): what this file ships, per
# arch. sm_80 has no wgmma: its accumulators live in the registers of fewer threads, and the
# sm_90 tiles spill there (8 and 80 bytes): one stage less at 128 x 256, 8 warps at 128 x 128.
GPU_CONFIGS = (
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
)
SM80_CONFIGS = (
    (128, 256, 64, 8, 8, 2),
    (128, 128, 64, 8, 8, 4),
    (64, 128, 64, 8, 4, 4),
)
_SM80: dict[int, bool] = {}


def _sm80(device: torch.device) -> bool:
    """Whether ``device`` is an sm_8x GPU (cached per device)."""
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM80:
        _SM80[i] = torch.cuda.get_device_capability(i)[0] == 8
    return _SM80[i]
SMALL_CONFIG = (32, 32, 32, 4, 4, 1)  # tiny problems and the CPU interpreter


@triton.jit
def _accumulate(acc, a_ptr, b_ptr, rm, rn, m_ok, n_ok, K, s_am, s_ak, s_bk, s_bn,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += A[rm, :K] @ B[:K, rn], BLOCK_K columns of A (rows of B) at a time."""
    rk = tl.arange(0, BLOCK_K)
    for k in range(0, K, BLOCK_K):
        kk = k + rk
        a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak,
                    mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn,
                    mask=(kk[:, None] < K) & n_ok[None, :], other=0.0)
        if DOT_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def dual_matmul_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr,
    M, N, K1, K2,
    s_a1m, s_a1k, s_b1k, s_b1n,
    s_a2m, s_a2k, s_b2k, s_b2n,
    s_cm, s_cn,
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-blocks share their column-blocks of B in L2
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _accumulate(acc, a1_ptr, b1_ptr, rm, rn, m_ok, n_ok, K1, s_a1m, s_a1k, s_b1k, s_b1n,
                      DOT_FP32, PRECISION, BLOCK_K)
    if HAS_SECOND:  # the adapter's rank-r term: a few more K steps of the same tile
        acc = _accumulate(acc, a2_ptr, b2_ptr, rm, rn, m_ok, n_ok, K2, s_a2m, s_a2k, s_b2k,
                          s_b2n, DOT_FP32, PRECISION, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn,
             acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def dy_b_db_kernel(
    dy_ptr, b_ptr, xs_ptr, dyb_ptr, db_ptr, T, N, R, span_t, s_dy, s_b, s_xs,
    DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
):
    pn = tl.program_id(0)
    pt = tl.program_id(1)
    rn = (pn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rr = tl.arange(0, R_PAD)
    n_ok = rn < N
    r_ok = rr < R
    b = tl.load(b_ptr + rn[:, None] * s_b + rr[None, :], mask=n_ok[:, None] & r_ok[None, :],
                other=0.0)
    if DOT_FP32:
        b = b.to(tl.float32)
    acc = tl.zeros([BLOCK_N, R_PAD], dtype=tl.float32)  # this span's share of dB
    t_end = tl.minimum(T, (pt + 1) * span_t)
    for t in range(pt * span_t, t_end, BLOCK_T):
        rt = (t + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_ok = rt < t_end
        d = tl.load(dy_ptr + rt[:, None] * s_dy + rn[None, :],
                    mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        xs = tl.load(xs_ptr + rt[:, None] * s_xs + rr[None, :],
                     mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        if DOT_FP32:
            d, xs = d.to(tl.float32), xs.to(tl.float32)
        part = tl.dot(d, b)  # this N block's share of dY B for these rows
        tl.store(dyb_ptr + (pn * T + rt)[:, None] * R_PAD + rr[None, :], part,
                 mask=t_ok[:, None])
        acc = tl.dot(tl.trans(d), xs, acc)
    tl.store(db_ptr + (pt * N + rn)[:, None] * R_PAD + rr[None, :], acc, mask=n_ok[:, None])


MAX_FUSED_RANK = 32
DY_CONFIG = (64, 256, 8, 3)  # (BLOCK_T, BLOCK_N, num_warps, num_stages) on a GPU
DY_SMALL = (16, 32, 4, 1)  # the interpreter: several programs and spans on small tests
DY_PROGRAMS = 264  # two per SM of an H100 or H200


def dy_b_and_db(dy: torch.Tensor, b: torch.Tensor, xs: torch.Tensor,
                splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dY B [T, r], dY^T xs [N, r]), fp32, reading dY [T, N] once. ``b`` [N, r] and ``xs``
    [T, r] in dY's dtype, unit column strides; r <= MAX_FUSED_RANK. ``splits``: the spans
    of T (default: enough for DY_PROGRAMS programs)."""
    T, N = dy.shape
    r = b.shape[1]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    bt, bn, warps, stages = DY_SMALL if interpret else DY_CONFIG
    r_pad = max(16, triton.next_power_of_2(r))
    n_blocks = triton.cdiv(N, bn)
    want = splits or max(1, triton.cdiv(DY_PROGRAMS, n_blocks))
    span = triton.cdiv(triton.cdiv(T, min(want, triton.cdiv(T, bt))), bt) * bt
    spans = triton.cdiv(T, span)
    f32 = dict(device=dy.device, dtype=torch.float32)
    dyb = torch.empty(n_blocks, T, r_pad, **f32)
    db = torch.empty(spans, N, r_pad, **f32)
    dy_b_db_kernel[(n_blocks, spans)](
        dy, b, xs, dyb, db, T, N, r, span, dy.stride(0), b.stride(0), xs.stride(0),
        DOT_FP32=interpret and dy.dtype == torch.bfloat16, BLOCK_T=bt, BLOCK_N=bn,
        R_PAD=r_pad, num_warps=warps, num_stages=stages)
    return dyb.sum(0)[:, :r], db.sum(0)[:, :r]


def pick_config(M: int, N: int, interpret: bool, sm80: bool = False) -> tuple:
    if interpret or M * N < 128 * 128:
        return SMALL_CONFIG
    configs = SM80_CONFIGS if sm80 else GPU_CONFIGS
    if N >= 256 and M >= 128:
        return configs[0]
    return configs[1] if M >= 128 else configs[2]


def dual_matmul(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor | None,
                b2: torch.Tensor | None, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a1 @ b1 + a2 @ b2 (+ bias) in one kernel; any strides; returns [M, N]."""
    M, K1 = a1.shape
    N = b1.shape[1]
    K2 = a2.shape[1] if a2 is not None else 0
    c = torch.empty(M, N, device=a1.device, dtype=out_dtype or a1.dtype)
    if M == 0 or N == 0:
        return c
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    bm, bn, bk, gm, warps, stages = pick_config(M, N, interpret,
                                                not interpret and _sm80(a1.device))
    second = a2 is not None and K2 > 0
    a2_, b2_ = (a2, b2) if second else (a1, b1)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    dual_matmul_kernel[grid](
        a1, b1, a2_, b2_, bias if bias is not None else c, c,
        M, N, K1, K2,
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        a2_.stride(0), a2_.stride(1), b2_.stride(0), b2_.stride(1),
        c.stride(0), c.stride(1),
        HAS_SECOND=second, HAS_BIAS=bias is not None,
        # the interpreter computes tl.dot on bf16 operands wrongly: fp32 there
        DOT_FP32=interpret and a1.dtype == torch.bfloat16,
        # fp32 operands: TF32 only where torch allows it for its own matmuls
        PRECISION="tf32" if a1.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        else "ieee",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages,
    )
    return c


def aot_specs():
    """Forward layout (B1 = W0^T: K contiguous; B2 = B^T copied to rows of N) and dX layout
    (B1 = W0 and B2 = A: N contiguous), each arch's tiles for that arch only, with the hints Triton's launcher gives the shapes
    that run (rows of A1, A2 and C and the long strides of B1, B2 divisible by 16)."""
    specs = []
    ptrs = ("a1_ptr", "b1_ptr", "a2_ptr", "b2_ptr", "bias_ptr", "c_ptr")
    layouts = {
        "fwd": {"s_a1k": 1, "s_b1k": 1, "s_a2k": 1, "s_b2n": 1, "s_cn": 1,
                "s_a1m": 16, "s_b1n": 16, "s_a2m": 16, "s_b2k": 16, "s_cm": 16},
        "dx": {"s_a1k": 1, "s_b1n": 1, "s_a2k": 1, "s_b2n": 1, "s_cn": 1,
               "s_a1m": 16, "s_b1k": 16, "s_a2m": 16, "s_b2k": 16, "s_cm": 16},
    }
    for arch, configs in (("sm_90", GPU_CONFIGS), ("sm_80", SM80_CONFIGS)):
        for (bm, bn, bk, gm, warps, stages), (layout, hints), dt in itertools.product(
                configs, layouts.items(), ("bf16", "fp16")):
            specs.append(dict(
                name="dual_matmul", kernel=dual_matmul_kernel, matrix=True, archs=(arch,),
                signature={**{p: f"*{dt}" for p in ptrs},
                           "M": "i32", "N": "i32", "K1": "i32", "K2": "i32",
                           **{f"s_{x}": "i64" for x in ("a1m", "a1k", "b1k", "b1n", "a2m",
                                                        "a2k", "b2k", "b2n", "cm", "cn")}},
                constexprs={"HAS_SECOND": True, "HAS_BIAS": True, "DOT_FP32": False,
                            "PRECISION": "ieee", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                            "GROUP_M": gm},
                # LLM shapes: sizes and rank multiples of 16 (so the K loops pipeline)
                hints={**{p: 16 for p in ptrs}, **hints, "M": 16, "N": 16, "K1": 16,
                       "K2": 16},
                options={"num_warps": warps, "num_stages": stages},
                config=f"{bm}x{bn}x{bk} w{warps} s{stages} {layout} {dt}"))
    bt, bn, warps, stages = DY_CONFIG
    for dt in ("bf16", "fp16"):
        for r_pad in (16, 32):
            specs.append(dict(
                name="dy_b_db", kernel=dy_b_db_kernel, matrix=True,
                signature={"dy_ptr": f"*{dt}", "b_ptr": f"*{dt}", "xs_ptr": f"*{dt}",
                           "dyb_ptr": "*fp32", "db_ptr": "*fp32", "T": "i32", "N": "i32",
                           "R": "i32", "span_t": "i32", "s_dy": "i64", "s_b": "i64",
                           "s_xs": "i64"},
                constexprs={"DOT_FP32": False, "BLOCK_T": bt, "BLOCK_N": bn, "R_PAD": r_pad},
                hints={"dy_ptr": 16, "b_ptr": 16, "xs_ptr": 16, "dyb_ptr": 16, "db_ptr": 16,
                       "T": 16, "N": 16, "R": 16, "span_t": 16, "s_dy": 16, "s_b": 16,
                       "s_xs": 16},
                options={"num_warps": warps, "num_stages": stages},
                config=f"{bt}x{bn} r<={r_pad} w{warps} s{stages} {dt}"))
    return specs
