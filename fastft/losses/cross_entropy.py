"""fastft.losses.cross_entropy: fused linear cross-entropy from hidden states."""

from __future__ import annotations

import torch

from .. import backends
from ..ops import linear_cross_entropy as _op
from ..reference import losses as _ref
from . import _inputs


def cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                  ignore_index: int = -100, reduction: str = "mean", num_items_in_batch=None,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                  temperature: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``softmax(softcap(hidden @ weight.T) / temperature)`` against ``labels``.

    hidden [..., H], weight [V, H], labels [...] (ignore_index rows are masked).
    The logits are computed a chunk of rows at a time and never kept: the
    gradients are formed in the forward. ``reduction``: "mean" over unmasked
    rows (or divided by ``num_items_in_batch`` when given, for gradient
    accumulation), "sum", or "none" (per row, shape of ``labels``).
    ``weights`` [...] multiply each row's loss. ``z_loss`` adds z_loss * lse^2.
    """
    h, w = _inputs.head(hidden, weight)
    y = _inputs.labels_like(labels, hidden, w.shape[0], ignore_index)
    ls, zl, cap, temp = _inputs.options(label_smoothing=label_smoothing, z_loss=z_loss,
                                        softcap=softcap, temperature=temperature)
    norm = _inputs.normalizer(reduction, y != ignore_index, num_items_in_batch)
    rw = _inputs.row_weights(weights, hidden)
    if backends.choose(_op.INFO, h.device) == "reference":
        return _ref.cross_entropy(hidden, weight, labels, ignore_index=ignore_index,
                                  reduction=reduction, num_items_in_batch=num_items_in_batch,
                                  label_smoothing=ls, z_loss=zl, softcap=softcap,
                                  temperature=temp, weights=weights)
    in_forward = reduction != "none"
    rows, _, _ = torch.ops.fastft.linear_cross_entropy(
        h, w, y, rw, norm, int(ignore_index), ls, zl, cap, temp,
        in_forward and _inputs.wants_grad(h), in_forward and _inputs.wants_grad(w))
    if reduction == "none":
        return rows.reshape(labels.shape)
    return rows.sum()
