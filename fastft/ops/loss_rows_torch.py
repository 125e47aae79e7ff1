"""The row kernels of the loss head in plain PyTorch (the CPU and fallback path).

Same contract as ``fastft.kernels.loss_rows``: one chunk of logits rows at a
time, fp32 math, no tensor larger than the chunk.
"""

from __future__ import annotations

import torch


def _transform(z: torch.Tensor, softcap: float, temperature: float) -> torch.Tensor:
    s = z.float()
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if temperature != 1.0:
        s = s / temperature
    return s


def _gather(s: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    V = s.shape[1]
    ok = (idx >= 0) & (idx < V)
    return torch.where(ok, s.gather(1, idx.clamp(0, V - 1)), 0.0)


def row_stats(z, idx, *, softcap, temperature, want_sum, want_entropy):
    s = _transform(z, softcap, temperature)
    lse = torch.logsumexp(s, dim=1)
    row_sum = s.sum(1) if want_sum else None
    entropy = None
    if want_entropy:
        entropy = lse - (torch.softmax(s, dim=1) * s).sum(1)
    return lse, _gather(s, idx), row_sum, entropy


def row_grad(z, lse, c, u, idx, w, out, *, softcap, temperature, ref=None):
    s = _transform(z, softcap, temperature)
    log_p = s - lse[:, None]
    kl = None
    ds = None
    if ref is not None:
        zr, lse_r, lam = ref
        log_pr = _transform(zr, softcap, temperature) - lse_r[:, None]
        p_r = torch.exp(log_pr)
        kl = (p_r * (log_pr - log_p)).sum(1)
        if out is not None:
            ds = p_r.mul_(-lam[:, None])
        del log_pr
    if out is None:
        return kl
    p = log_p.exp_().mul_(c[:, None]).add_(u[:, None])
    ds = p if ds is None else ds.add_(p)
    V = ds.shape[1]
    ok = (idx >= 0) & (idx < V)
    ds.scatter_add_(1, idx.clamp(0, V - 1), torch.where(ok, -w, 0.0))
    if softcap:
        t = torch.tanh(z.float() / softcap)
        ds.mul_((1.0 - t * t) / temperature)
    elif temperature != 1.0:
        ds.div_(temperature)
    out.copy_(ds)
    return kl
