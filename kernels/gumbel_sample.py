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

CONFIGS = ((1024, 4),)


@triton.jit
def _gumbel(x):
    u = ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # (0, 1), 23 bits
    return -tl.log(-tl.log(u))


@triton.jit
def _update(best_v, best_i, kr, k: tl.constexpr, val, offs):
    m = tl.max(val, axis=0)
    a = tl.min(tl.where(val == m, offs, 2147483647), axis=0)  # first index of the max
    take = (kr == k) & (m > best_v)
    return tl.where(take, m, best_v), tl.where(take, a.to(tl.int64), best_i)


# seed and row_offset change every call: specialising on their values (== 1, divisible by 16)
# would compile new variants in the middle of training (about 2 s each on an H200)
@triton.jit(do_not_specialize=["seed", "row_offset"])
def gumbel_sample_kernel(
    z_ptr, stride_z, V, out_ptr, row_offset, seed,
    softcap, inv_temp,
    K: tl.constexpr, KP: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    grow = row + row_offset
    row_lo = (grow & 0xFFFFFFFF).to(tl.uint32)
    row_hi = (grow >> 32).to(tl.uint32)
    base = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK_V)
    kr = tl.arange(0, KP)
    best_v = tl.full([KP], float("-inf"), tl.float32)
    best_i = tl.zeros([KP], tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        inb = offs < V
        z = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32)
        s = tl.where(inb, _transform(z, softcap, inv_temp, HAS_SOFTCAP), float("-inf"))
        c0 = offs.to(tl.uint32)
        zero = c0 * 0
        for g in tl.static_range((K + 3) // 4):
            r0, r1, r2, r3 = tl.philox(seed, c0, zero + row_lo, zero + g, zero + row_hi)
            best_v, best_i = _update(best_v, best_i, kr, 4 * g, s + _gumbel(r0), offs)
            if 4 * g + 1 < K:
                best_v, best_i = _update(best_v, best_i, kr, 4 * g + 1, s + _gumbel(r1), offs)
            if 4 * g + 2 < K:
                best_v, best_i = _update(best_v, best_i, kr, 4 * g + 2, s + _gumbel(r2), offs)
            if 4 * g + 3 < K:
                best_v, best_i = _update(best_v, best_i, kr, 4 * g + 3, s + _gumbel(r3), offs)
    tl.store(out_ptr + row * K + kr, best_i, mask=kr < K)


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
        K=k, KP=triton.next_power_of_2(k), HAS_SOFTCAP=bool(softcap), BLOCK_V=block,
        num_warps=warps)
    return out


def aot_specs():
    specs = []
    for block, warps in CONFIGS:
        for zt in ("fp32", "bf16"):
            specs.append(dict(
                name="gumbel_sample", kernel=gumbel_sample_kernel, matrix=False,
                signature={"z_ptr": f"*{zt}", "stride_z": "i64", "V": "i32", "out_ptr": "*i64",
                           "row_offset": "i64", "seed": "i64", "softcap": "fp32",
                           "inv_temp": "fp32"},
                constexprs={"K": 8, "KP": 8, "HAS_SOFTCAP": True, "BLOCK_V": block},
                options={"num_warps": warps}, config=f"BLOCK_V={block} K=8 z={zt}"))
    return specs
