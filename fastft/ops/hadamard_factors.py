"""Orthogonal factors of the Walsh-Hadamard-type transform over n = K x 2^m.

A power of two is Sylvester's Hadamard matrix, applied as butterflies. Any other
n = o x 2^e (o odd) takes a K x K factor with K = o x 2^j: the smallest j >= 2
(2^j dividing n) for which a Paley construction over a prime gives a Hadamard
matrix of order K (Paley I: K = q + 1, q = 3 mod 4; Paley II: K = 2 (q + 1),
q = 1 mod 4) and K <= 256, else K = o (o <= 256) with a seeded random
orthogonal matrix; an odd part above 256 has no factor (an error). Shipped
Hadamard orders up to 256: 12, 20, 28, 36, 44, 60, 68, 72, 76, 80, 84, 108,
124, 132, 140, 148, 152, 164, 168, 180, 196, 200, 212, 228, 240, 252 (and so
hidden, head and intermediate sizes such as 80, 96, 192, 2304, 3584, 5120,
13824, 14336, 18944); 11008 = 43 x 256 has no such factor and takes the random
orthogonal one (K = 43).
"""

from __future__ import annotations

import functools
import math

import torch

from ..errors import check

MAX_N = 2**20
MAX_K = 256  # the largest factor applied as a small matmul inside the kernels


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    i = torch.arange(q)
    chi = torch.tensor([_legendre(a, q) for a in range(q)], dtype=torch.float64)
    return chi[(i[None, :] - i[:, None]) % q]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 from a prime q = 3 mod 4: I + S, S skew with the Jacobsthal core."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) from a prime q = 1 mod 4: the symmetric conference matrix C, then
    C x [[1, 1], [1, -1]] + I x [[1, -1], [-1, -1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0] = 1.0, 1.0
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def construction(K: int) -> str | None:
    """"paley1", "paley2" or None: how a Hadamard matrix of order K is built here."""
    if K % 4:
        return None
    if _is_prime(K - 1) and (K - 1) % 4 == 3:
        return "paley1"
    if _is_prime(K // 2 - 1) and (K // 2 - 1) % 4 == 1:
        return "paley2"
    return None


@functools.cache
def plan(n: int) -> tuple[int, int]:
    """(K, P) with n = K x P, P a power of two, K the factor's order (1: a power of two)."""
    check(isinstance(n, int) and 1 <= n <= MAX_N,
          f"the Hadamard transform takes sizes 1..{MAX_N}; got {n!r}")
    e = (n & -n).bit_length() - 1
    o = n >> e
    if o == 1:
        return 1, n
    for j in range(2, e + 1):
        if (o << j) <= MAX_K and construction(o << j):
            return o << j, n // (o << j)
    check(o <= MAX_K, f"no orthogonal factor is shipped for size {n} = {o} x 2^{e}: the odd "
          f"part {o} is above {MAX_K} (pad the dimension to a multiple of a power of two, "
          "or keep that rotation off)")
    return o, n // o


@functools.cache
def _factor(K: int) -> torch.Tensor:
    kind = construction(K)
    if kind == "paley1":
        return _paley1(K - 1)
    if kind == "paley2":
        return _paley2(K // 2 - 1)
    g = torch.Generator().manual_seed(1_000_003 * K)  # the same matrix on every machine
    q, r = torch.linalg.qr(torch.randn(K, K, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :] * math.sqrt(K)).contiguous()


def kfactor(K: int) -> torch.Tensor:
    """The K x K factor, fp64, scaled so that H H^T = K I (entries +-1 for a Hadamard order)."""
    return _factor(K).clone(memory_format=torch.contiguous_format)


_on_device: dict[tuple[int, str], torch.Tensor] = {}


def factor(K: int, device: torch.device) -> torch.Tensor:
    """H_K in fp32 on ``device`` (cached): what the transform's backends multiply by."""
    key = (K, str(device))
    if key not in _on_device:
        _on_device[key] = kfactor(K).to(device=device, dtype=torch.float32)
    return _on_device[key]


def is_hadamard(K: int) -> bool:
    return K == 1 or construction(K) is not None
