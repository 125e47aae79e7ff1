"""Reference losses: materialise the logits [T, V] and let autograd differentiate."""

from __future__ import annotations

import torch


def logits(hidden, weight, *, softcap=None, temperature=1.0):
    """s = softcap * tanh(h W^T / softcap) / temperature, in fp32, all rows at once."""
    z = hidden.float() @ weight.float().t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def reduce(rows, mask, reduction, num_items_in_batch=None):
    """Reduce per-row losses (zero at masked rows) the way fastft.losses does."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        if num_items_in_batch is not None:
            return rows.sum() / num_items_in_batch
        return rows.sum() / mask.sum().clamp(min=1)
    raise ValueError(reduction)


def cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean",
                  num_items_in_batch=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
                  temperature=1.0, weights=None):
    """CE of METHODS.md §1; per-row result has the shape of ``labels``."""
    H = hidden.shape[-1]
    s = logits(hidden.reshape(-1, H), weight, softcap=softcap, temperature=temperature)
    y = labels.reshape(-1)
    mask = y != ignore_index
    lse = torch.logsumexp(s, dim=-1)
    s_y = s.gather(1, torch.where(mask, y, 0)[:, None])[:, 0]
    rows = lse - s_y
    if label_smoothing:
        rows = (1 - label_smoothing) * rows + label_smoothing * (lse - s.mean(-1))
    if z_loss:
        rows = rows + z_loss * lse**2
    if weights is not None:
        rows = rows * weights.reshape(-1).float()
    rows = torch.where(mask, rows, 0.0)
    out = reduce(rows, mask, reduction, num_items_in_batch)
    return out.reshape(labels.shape) if reduction == "none" else out
