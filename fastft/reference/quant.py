"""Reference Hadamard transform (a dense fp64 matrix) and fake quantizer (METHODS.md §4)."""

from __future__ import annotations

import math

import torch

from ..ops.hadamard_factors import kfactor, plan


def hadamard_matrix(n: int) -> torch.Tensor:
    """The dense n x n transform H_K kron H_P (unnormalised, fp64), P by Sylvester's kron."""
    K, P = plan(n)
    hp = torch.ones(1, 1, dtype=torch.float64)
    two = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while hp.shape[0] < P:
        hp = torch.kron(hp, two)
    return torch.kron(kfactor(K), hp)


def hadamard(x: torch.Tensor, scale: float | None = None, transpose: bool = False):
    """scale * M x over the last dim (M^T with ``transpose``), in fp64, returned in x's dtype."""
    n = x.shape[-1]
    m = hadamard_matrix(n)
    s = 1.0 / math.sqrt(n) if scale is None else scale
    y = x.double() @ (m if transpose else m.t()) * s
    return y.to(x.dtype)


def fake_quant(x: torch.Tensor, bits: int, symmetric: bool = False, clip_ratio: float = 1.0):
    """q(x) per row of the last dim: (clamp(round(x / s) + z, qmin, qmax) - z) s, fp32."""
    x = x.float()
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        s = (clip_ratio * x.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-8)
        z = torch.zeros_like(s)
    else:
        qmin, qmax = 0, 2**bits - 1
        mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
        s = (clip_ratio * (mx - mn) / qmax).clamp(min=1e-8)
        z = torch.round(-clip_ratio * mn / s)
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s
