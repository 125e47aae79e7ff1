"""K samples per row of softmax, drawn in the logsumexp pass, rows split across programs.

For each row of a chunk of logits z [C, V] and each k < K this draws a sample of
softmax(s) with s the transformed logits (softcap, then the sampling temperature), and
computes the row's logsumexp at the model's temperature, in one read of the row.

The draw is Gumbel-max in its exponential-race form. With u_v uniform on (0, 1) and
E_v = -log u_v (exponential), argmax_v (s_v - log E_v) = argmax_v exp(s_v - m) / E_v for
any m: the same sample as Gumbel-max with noise -log(-log u_v), from the same u, with one
log per sample and entry instead of two. The online logsumexp already has
e_v = exp(s_v - m) (m the lane's running maximum), so each lane keeps, per sample, its
best (e, E, v) and compares e_v E_best > e_best E_v: two products, no division; when the
lane's maximum grows, its e_best are rescaled by the same factor as its running sum.

The noise comes from Philox4x32-10 keyed by the seed, with counters (v, row low 32 bits,
k // 4, row high 32 bits): a draw is a pure function of (seed, global row, k, v), the same
whatever the chunking or the split. fastft/ops/gumbel_torch.py draws the same stream by
Gumbel-max; the two agree but for ties in fp32 rounding.

Two kernels:

- ``race_kernel``: grid (C, S), program (r, p) sweeps the vocabulary span p of row r in
  tiles of BLOCK_V, 8 samples per sweep (K > 8: more sweeps, the logsumexp in the first).
  It writes the span's running maximum and sum, and per sample its best Gumbel score
  (s - log E) and entry. S spans per row keep a short chunk's rows from leaving the GPU
  idle.
- ``combine_kernel``: one program per row: the logsumexp of the spans, each sample's best
  span (the lowest entry among equal scores), and the transformed logits at the samples
  and the target (the gathered entries of the loss), as row_stats gives them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .loss_rows import NEG, _transform

BLOCK_V, NUM_WARPS = 512, 8  # 8 samples x (e, E, v) x 2 entries per thread: 48 registers
PROGRAMS = 1024  # spans per row: enough programs for the GPU whatever the chunk's rows
BIG = tl.constexpr(2147483647)


@triton.jit
def _exp_noise(x):
    """E = -log u with u = ((x >> 9) + 0.5) 2^-23 in (0, 1): the 23-bit uniform of
    gumbel_torch._gumbel, so -log E is its Gumbel noise."""
    u = ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    return -tl.log(u)


@triton.jit
def _race(eb, Eb, ib, e, x, offs):
    """A lane's best (e, E, v) against this tile's entries: strictly greater wins, so a lane
    keeps the first entry of its maximum."""
    E = _exp_noise(x)
    take = e * Eb > eb * E
    return tl.where(take, e, eb), tl.where(take, E, Eb), tl.where(take, offs, ib)


@triton.jit
def _race4(seed, c0, row_lo, row_hi, call, e, alpha, offs, eb0, eb1, eb2, eb3, Eb0, Eb1, Eb2,
           Eb3, ib0, ib1, ib2, ib3, N: tl.constexpr):
    """One Philox call (counters: v, row low, ``call`` = k // 4, row high) gives the noise of
    4 samples; the first ``N`` of them take this tile (their e_best rescaled by alpha)."""
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, zero + row_lo, zero + call, zero + row_hi)
    eb0, Eb0, ib0 = _race(eb0 * alpha, Eb0, ib0, e, r0, offs)
    if N > 1:
        eb1, Eb1, ib1 = _race(eb1 * alpha, Eb1, ib1, e, r1, offs)
    if N > 2:
        eb2, Eb2, ib2 = _race(eb2 * alpha, Eb2, ib2, e, r2, offs)
    if N > 3:
        eb3, Eb3, ib3 = _race(eb3 * alpha, Eb3, ib3, e, r3, offs)
    return eb0, eb1, eb2, eb3, Eb0, Eb1, Eb2, Eb3, ib0, ib1, ib2, ib3


@triton.jit
def _store_best(score_ptr, index_ptr, m, eb, Eb, ib):
    """The span's best sample: the Gumbel score m + log(e / E) of each lane's best, the
    maximum over the lanes and its first entry."""
    took = eb > 0  # a lane past the span's end never took an entry
    score = tl.where(took, m + tl.log(tl.where(took, eb, 1.0) / Eb), -float("inf"))
    best = tl.max(score, axis=0)
    tl.store(score_ptr, best)
    tl.store(index_ptr, tl.min(tl.where(score == best, ib, BIG), axis=0))


@triton.jit
def _store4(score_ptr, index_ptr, m, eb0, eb1, eb2, eb3, Eb0, Eb1, Eb2, Eb3, ib0, ib1, ib2,
            ib3, N: tl.constexpr):
    _store_best(score_ptr, index_ptr, m, eb0, Eb0, ib0)
    if N > 1:
        _store_best(score_ptr + 1, index_ptr + 1, m, eb1, Eb1, ib1)
    if N > 2:
        _store_best(score_ptr + 2, index_ptr + 2, m, eb2, Eb2, ib2)
    if N > 3:
        _store_best(score_ptr + 3, index_ptr + 3, m, eb3, Eb3, ib3)


# seed and row_offset change every call: specialising on their values (== 1, divisible by 16)
# would compile new variants in the middle of training (about 2 s each on an H200)
@triton.jit(do_not_specialize=["seed", "row_offset"])
def race_kernel(
    z_ptr, stride_z, V, span, row_offset, seed, softcap, inv_temp, inv_stemp,
    m_ptr, l_ptr, score_ptr, index_ptr,
    K: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SAME_TEMP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    n_parts = tl.num_programs(1)
    grow = row + row_offset
    row_lo = (grow & 0xFFFFFFFF).to(tl.uint32)
    row_hi = (grow >> 32).to(tl.uint32)
    base = z_ptr + row * stride_z
    slot = row * n_parts + part  # this span's entry in the [C, S] and [C, S, K] outputs
    lo = part * span
    hi = tl.minimum(V, lo + span)
    cols = tl.arange(0, BLOCK_V)
    for p in tl.static_range((K + 7) // 8):  # samples 8p .. 8p + 7: Philox calls 2p, 2p + 1
        m = tl.full([BLOCK_V], NEG, tl.float32)  # the race's running maximum, per lane
        acc = tl.zeros([BLOCK_V], tl.float32)  # the model's sum of exp(s - m_model), per lane
        m_model = tl.full([BLOCK_V], NEG, tl.float32)
        zero = tl.zeros([BLOCK_V], tl.float32)
        one = zero + 1.0
        idx = tl.zeros([BLOCK_V], tl.int32)
        eb0, eb1, eb2, eb3, eb4, eb5, eb6, eb7 = zero, zero, zero, zero, zero, zero, zero, zero
        Eb0, Eb1, Eb2, Eb3, Eb4, Eb5, Eb6, Eb7 = one, one, one, one, one, one, one, one
        ib0, ib1, ib2, ib3, ib4, ib5, ib6, ib7 = idx, idx, idx, idx, idx, idx, idx, idx
        for start in range(lo, hi, BLOCK_V):
            offs = start + cols
            inb = offs < hi
            z = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32)
            s = tl.where(inb, _transform(z, softcap, inv_stemp, HAS_SOFTCAP), NEG)
            m_new = tl.maximum(m, s)
            alpha = tl.exp(m - m_new)
            e = tl.where(inb, tl.exp(s - m_new), 0.0)  # a lane past the span never wins
            m = m_new
            if p == 0:  # the model's logsumexp, in the first sweep
                if SAME_TEMP:
                    acc = acc * alpha + e
                else:
                    sm = tl.where(inb, _transform(z, softcap, inv_temp, HAS_SOFTCAP), NEG)
                    mm_new = tl.maximum(m_model, sm)
                    acc = acc * tl.exp(m_model - mm_new) + tl.exp(sm - mm_new)
                    m_model = mm_new
            c0 = offs.to(tl.uint32)
            eb0, eb1, eb2, eb3, Eb0, Eb1, Eb2, Eb3, ib0, ib1, ib2, ib3 = _race4(
                seed, c0, row_lo, row_hi, 2 * p, e, alpha, offs, eb0, eb1, eb2, eb3,
                Eb0, Eb1, Eb2, Eb3, ib0, ib1, ib2, ib3, K - 8 * p)
            if 8 * p + 4 < K:
                eb4, eb5, eb6, eb7, Eb4, Eb5, Eb6, Eb7, ib4, ib5, ib6, ib7 = _race4(
                    seed, c0, row_lo, row_hi, 2 * p + 1, e, alpha, offs, eb4, eb5, eb6, eb7,
                    Eb4, Eb5, Eb6, Eb7, ib4, ib5, ib6, ib7, K - 8 * p - 4)
        if p == 0:
            if SAME_TEMP:
                m_model = m
            m_row = tl.max(m_model, axis=0)
            tl.store(m_ptr + slot, m_row)
            tl.store(l_ptr + slot, tl.sum(acc * tl.exp(m_model - m_row), axis=0))
        out_s = score_ptr + slot * K + 8 * p
        out_i = index_ptr + slot * K + 8 * p
        _store4(out_s, out_i, m, eb0, eb1, eb2, eb3, Eb0, Eb1, Eb2, Eb3, ib0, ib1, ib2, ib3,
                K - 8 * p)
        if 8 * p + 4 < K:
            _store4(out_s + 4, out_i + 4, m, eb4, eb5, eb6, eb7, Eb4, Eb5, Eb6, Eb7, ib4, ib5,
                    ib6, ib7, K - 8 * p - 4)


@triton.jit
def _gathered(base, idx, V, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """The transformed logit at ``idx`` (0 for an index outside [0, V): never read)."""
    ok = (idx >= 0) & (idx < V)
    z = tl.load(base + tl.where(ok, idx, 0), mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok, _transform(z, softcap, inv_temp, HAS_SOFTCAP), 0.0)


@triton.jit
def combine_kernel(
    z_ptr, stride_z, V, S, m_ptr, l_ptr, score_ptr, index_ptr, target_ptr,
    idx_ptr, lse_ptr, gath_ptr, softcap, inv_temp,
    K: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    S_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    J: tl.constexpr = K + (1 if HAS_TARGET else 0)
    base = z_ptr + row * stride_z
    parts = tl.arange(0, S_PAD)
    ok = parts < S
    slots = row * S + parts
    m = tl.load(m_ptr + slots, mask=ok, other=NEG)
    m_row = tl.max(m, axis=0)
    l_row = tl.sum(tl.load(l_ptr + slots, mask=ok, other=0.0) * tl.exp(m - m_row), axis=0)
    tl.store(lse_ptr + row, m_row + tl.log(l_row))
    for k in tl.static_range(K):
        score = tl.load(score_ptr + slots * K + k, mask=ok, other=-float("inf"))
        entry = tl.load(index_ptr + slots * K + k, mask=ok, other=BIG)
        best = tl.max(score, axis=0)
        v = tl.min(tl.where(score == best, entry, BIG), axis=0).to(tl.int64)
        tl.store(idx_ptr + row * J + k, v)
        tl.store(gath_ptr + row * J + k, _gathered(base, v, V, softcap, inv_temp, HAS_SOFTCAP))
    if HAS_TARGET:
        t = tl.load(target_ptr + row)
        tl.store(idx_ptr + row * J + K, t)
        tl.store(gath_ptr + row * J + K, _gathered(base, t, V, softcap, inv_temp, HAS_SOFTCAP))


def spans(C: int, V: int, splits: int | None = None) -> tuple[int, int]:
    """(S, span): the spans per row (``splits``, or enough for PROGRAMS programs but at least
    4 tiles each) and the entries of each, a multiple of BLOCK_V."""
    tiles = triton.cdiv(max(V, 1), BLOCK_V)
    want = splits or max(1, min(triton.cdiv(tiles, 4), triton.cdiv(PROGRAMS, max(C, 1))))
    span = triton.cdiv(tiles, min(want, tiles)) * BLOCK_V
    return triton.cdiv(max(V, 1), span), span


def sample_stats(z: torch.Tensor, k: int, target: torch.Tensor | None, *, seed: int,
                 row_offset: int, softcap: float, temperature: float,
                 sample_temperature: float, splits: int | None = None):
    """Draw K samples per row of softmax(transform(z) / sample_temperature) and the stats
    of the loss at ``temperature``, in one read of z [C, V] (unit column stride).

    ``target``: None, or [C] int64 entries (-1: none) gathered after the samples.
    Returns (samples [C, K] int64, a view of idx; idx [C, J] int64: the samples then the
    target; (lse [C], gathered [C, J], None, None) as row_stats returns its stats).
    """
    C, V = z.shape
    J = k + (target is not None)
    dev = z.device
    idx = torch.empty(C, J, device=dev, dtype=torch.int64)
    lse = torch.empty(C, device=dev, dtype=torch.float32)
    gathered = torch.empty(C, J, device=dev, dtype=torch.float32)
    if C == 0:
        return idx[:, :k], idx, (lse, gathered, None, None)
    S, span = spans(C, V, splits)
    f32 = dict(device=dev, dtype=torch.float32)
    m, lsum = torch.empty(C, S, **f32), torch.empty(C, S, **f32)
    score = torch.empty(C, S, k, **f32)
    index = torch.empty(C, S, k, device=dev, dtype=torch.int32)
    cap = float(softcap or 1.0)
    race_kernel[(C, S)](
        z, z.stride(0), V, span, row_offset, seed, cap, 1.0 / temperature,
        1.0 / sample_temperature, m, lsum, score, index, K=k, HAS_SOFTCAP=bool(softcap),
        SAME_TEMP=temperature == sample_temperature, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    tgt = target.contiguous() if target is not None else idx
    combine_kernel[(C,)](
        z, z.stride(0), V, S, m, lsum, score, index, tgt, idx, lse, gathered, cap,
        1.0 / temperature, K=k, HAS_TARGET=target is not None, HAS_SOFTCAP=bool(softcap),
        S_PAD=triton.next_power_of_2(S), num_warps=1)
    return idx[:, :k], idx, (lse, gathered, None, None)


def sample(z: torch.Tensor, k: int, *, seed: int, row_offset: int, softcap: float,
           temperature: float, splits: int | None = None) -> torch.Tensor:
    """K samples per row of softmax(transform(z)): int64 [C, K]."""
    return sample_stats(z, k, None, seed=seed, row_offset=row_offset, softcap=softcap,
                        temperature=temperature, sample_temperature=temperature,
                        splits=splits)[0]


def aot_specs():
    specs = []
    for zt, k, same in (("fp32", 8, True), ("bf16", 8, True), ("bf16", 12, True),
                        ("fp32", 8, False)):  # 12: two sweeps; False: two temperatures
        specs.append(dict(
            name="gumbel_race", kernel=race_kernel, matrix=False,
            signature={"z_ptr": f"*{zt}", "stride_z": "i64", "V": "i32", "span": "i32",
                       "row_offset": "i64", "seed": "i64", "softcap": "fp32",
                       "inv_temp": "fp32", "inv_stemp": "fp32", "m_ptr": "*fp32",
                       "l_ptr": "*fp32", "score_ptr": "*fp32", "index_ptr": "*i32"},
            constexprs={"K": k, "HAS_SOFTCAP": True, "SAME_TEMP": same, "BLOCK_V": BLOCK_V},
            hints={"z_ptr": 16, "stride_z": 16, "V": 16, "span": 16},
            options={"num_warps": NUM_WARPS},
            config=f"BLOCK_V={BLOCK_V} K={k} z={zt}{'' if same else ' two temps'}"))
    for target, s_pad in ((True, 4), (False, 1)):  # OTR's rows; samples alone, one span
        specs.append(dict(
            name="gumbel_combine", kernel=combine_kernel, matrix=False,
            signature={"z_ptr": "*fp32", "stride_z": "i64", "V": "i32", "S": "i32",
                       "m_ptr": "*fp32", "l_ptr": "*fp32", "score_ptr": "*fp32",
                       "index_ptr": "*i32", "target_ptr": "*i64", "idx_ptr": "*i64",
                       "lse_ptr": "*fp32", "gath_ptr": "*fp32", "softcap": "fp32",
                       "inv_temp": "fp32"},
            constexprs={"K": 8, "HAS_TARGET": target, "HAS_SOFTCAP": True, "S_PAD": s_pad},
            options={"num_warps": 1},
            config=f"K=8{' target' if target else ''} S_PAD={s_pad}"))
    return specs
