"""Gumbel-max sampling of K tokens per row, streamed over vocabulary tiles.

For each row of a chunk of logits z [C, V] and each k < K, draws
a_k = argmax_v (s_v + g_{k,v}), with s the transformed logits (softcap, then
temperature) and g standard Gumbel noise, i.e. a sample of softmax(s). The
noise comes from Philox4x32-10 keyed by the seed, with counters (v, row low
32 bits, k // 4, row high 32 bits); each call gives the noise of four k. So a
draw is a pure function of (seed, global row, k, v): reproducible, and the same
whatever the chunking. fastft/ops/gumbel_torch.py computes the same stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .loss_rows import _transform

# (BLOCK_V, num_warps): 8 samples' running bests, a value and an index each, per lane:
# 8 x 2 x 1024 / 256 threads = 64 registers
CONFIGS = ((1024, 8),)


@triton.jit
def _gumbel(x):
    u = ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # (0, 1), 23 bits
    return -tl.log(-tl.log(u))


@triton.jit
def _lane_best(best_v, best_i, val, offs):
    """Each lane's running best over the tiles: strictly greater wins, so a lane keeps the
    first index of its maximum."""
    take = val > best_v
    return tl.where(take, val, best_v), tl.where(take, offs, best_i)


@triton.jit
def _first_argmax(best_v, best_i):
    """The first index of the row's maximum, from the lanes' running bests."""
    m = tl.max(best_v, axis=0)
    return tl.min(tl.where(best_v == m, best_i, 2147483647), axis=0).to(tl.int64)


@triton.jit
def _draw4(seed, c0, row_lo, row_hi, call, s, offs, v0, v1, v2, v3, i0, i1, i2, i3,
           N: tl.constexpr):
    """One Philox call (counters: v, row low, ``call`` = k // 4, row high) gives the noise of
    4 samples; the running bests of the first ``N`` of them take this tile."""
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, zero + row_lo, zero + call, zero + row_hi)
    v0, i0 = _lane_best(v0, i0, s + _gumbel(r0), offs)
    if N > 1:
        v1, i1 = _lane_best(v1, i1, s + _gumbel(r1), offs)
    if N > 2:
        v2, i2 = _lane_best(v2, i2, s + _gumbel(r2), offs)
    if N > 3:
        v3, i3 = _lane_best(v3, i3, s + _gumbel(r3), offs)
    return v0, v1, v2, v3, i0, i1, i2, i3


@triton.jit
def _store4(ptr, v0, v1, v2, v3, i0, i1, i2, i3, N: tl.constexpr):
    """The samples of the first ``N`` of 4 running bests, at ptr[0:N]."""
    tl.store(ptr, _first_argmax(v0, i0))
    if N > 1:
        tl.store(ptr + 1, _first_argmax(v1, i1))
    if N > 2:
        tl.store(ptr + 2, _first_argmax(v2, i2))
    if N > 3:
        tl.store(ptr + 3, _first_argmax(v3, i3))


# seed and row_offset change every call: specialising on their values (== 1, divisible by 16)
# would compile new variants in the middle of training (about 2 s each on an H200)
@triton.jit(do_not_specialize=["seed", "row_offset"])
def gumbel_sample_kernel(
    z_ptr, stride_z, V, out_ptr, row_offset, seed,
    softcap, inv_temp,
    K: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row per program; samples 8 at a time, each pass one stream over the row. Every
    lane keeps the running best of each sample in registers, with no reduction across the
    lanes until the pass ends (one per sample per row, not one per tile)."""
    row = tl.program_id(0).to(tl.int64)
    grow = row + row_offset
    row_lo = (grow & 0xFFFFFFFF).to(tl.uint32)
    row_hi = (grow >> 32).to(tl.uint32)
    base = z_ptr + row * stride_z
    out = out_ptr + row * K
    cols = tl.arange(0, BLOCK_V)
    for p in tl.static_range((K + 7) // 8):  # samples 8p .. 8p + 7: draws 2p and 2p + 1
        neg = tl.full([BLOCK_V], float("-inf"), tl.float32)
        idx = tl.zeros([BLOCK_V], tl.int32)
        v0, v1, v2, v3, v4, v5, v6, v7 = neg, neg, neg, neg, neg, neg, neg, neg
        i0, i1, i2, i3, i4, i5, i6, i7 = idx, idx, idx, idx, idx, idx, idx, idx
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            inb = offs < V
            z = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32)
            s = tl.where(inb, _transform(z, softcap, inv_temp, HAS_SOFTCAP), float("-inf"))
            c0 = offs.to(tl.uint32)
            v0, v1, v2, v3, i0, i1, i2, i3 = _draw4(seed, c0, row_lo, row_hi, 2 * p, s, offs,
                                                    v0, v1, v2, v3, i0, i1, i2, i3, K - 8 * p)
            if 8 * p + 4 < K:
                v4, v5, v6, v7, i4, i5, i6, i7 = _draw4(
                    seed, c0, row_lo, row_hi, 2 * p + 1, s, offs, v4, v5, v6, v7,
                    i4, i5, i6, i7, K - 8 * p - 4)
        _store4(out + 8 * p, v0, v1, v2, v3, i0, i1, i2, i3, K - 8 * p)
        if 8 * p + 4 < K:
            _store4(out + 8 * p + 4, v4, v5, v6, v7, i4, i5, i6, i7, K - 8 * p - 4)


def sample(z: torch.Tensor, k: int, *, seed: int, row_offset: int, softcap: float,
           temperature: float) -> torch.Tensor:
    """K samples per row of softmax(transform(z)): int64 [C, K]."""
    C, V = z.shape
    out = torch.empty(C, k, device=z.device, dtype=torch.int64)
    if C == 0:
        return out
    block, warps = CONFIGS[0]
    gumbel_sample_kernel[(C,)](
        z, z.stride(0), V, out, row_offset, seed, float(softcap or 1.0), 1.0 / temperature,
        K=k, HAS_SOFTCAP=bool(softcap), BLOCK_V=block, num_warps=warps)
    return out


def aot_specs():
    specs = []
    for block, warps in CONFIGS:
        for zt, k in (("fp32", 8), ("bf16", 8), ("bf16", 12)):  # 12: two passes
            specs.append(dict(
                name="gumbel_sample", kernel=gumbel_sample_kernel, matrix=False,
                signature={"z_ptr": f"*{zt}", "stride_z": "i64", "V": "i32", "out_ptr": "*i64",
                           "row_offset": "i64", "seed": "i64", "softcap": "fp32",
                           "inv_temp": "fp32"},
                constexprs={"K": k, "HAS_SOFTCAP": True, "BLOCK_V": block},
                hints={"z_ptr": 16, "out_ptr": 16, "stride_z": 16, "V": 16},
                options={"num_warps": warps}, config=f"BLOCK_V={block} K={k} z={zt}"))
    return specs
