"""Gumbel-max sampling in plain PyTorch: the same Philox stream as kernels/gumbel_sample.py.

Philox4x32-10 is computed on int64 tensors holding uint32 values; products are
split into 16-bit halves so that nothing overflows int64.
"""

from __future__ import annotations

import torch

from .loss_rows_torch import _transform

M32 = 0xFFFFFFFF
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32 bits of the 64-bit product of the uint32 constant a and uint32 tensor b."""
    lo16, hi16 = b & 0xFFFF, b >> 16
    t = lo16 * a  # < 2**48
    u = hi16 * a + (t >> 16)  # < 2**49
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def philox(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32 of int64 tensors holding uint32 counters; returns four uint32 tensors."""
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    return c0, c1, c2, c3


def _gumbel(x: torch.Tensor) -> torch.Tensor:
    u = ((x >> 9).to(torch.float32) + 0.5) * 1.1920928955078125e-07
    return -torch.log(-torch.log(u))


def sample(z: torch.Tensor, k: int, *, seed: int, row_offset: int, softcap: float,
           temperature: float) -> torch.Tensor:
    """K samples per row of softmax(transform(z)): int64 [C, K]."""
    C, V = z.shape
    s = _transform(z, softcap, temperature)
    rows = torch.arange(row_offset, row_offset + C, device=z.device, dtype=torch.int64)[:, None]
    c0 = torch.arange(V, device=z.device, dtype=torch.int64)[None, :].expand(C, V)
    c1 = (rows & M32).expand(C, V)
    c3 = (rows >> 32).expand(C, V)
    out = torch.empty(C, k, device=z.device, dtype=torch.int64)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    for g in range((k + 3) // 4):
        draws = philox(seed, c0, c1, torch.full_like(c0, g), c3)
        for i, x in enumerate(draws):
            if 4 * g + i < k:
                out[:, 4 * g + i] = torch.argmax(s + _gumbel(x), dim=1)
    return out
