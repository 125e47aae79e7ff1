"""fastft.losses.cross_entropy, dft and asft: the fused CE family from hidden states."""

from __future__ import annotations

import torch

from .. import backends
from ..errors import check
from ..ops import linear_cross_entropy as _op
from ..reference import losses as _ref
from . import _inputs


def _ce_family(hidden, weight, labels, *, ignore_index, reduction, num_items_in_batch,
               label_smoothing, z_loss, softcap, temperature, weights, dft=False, bias=None,
               ref_hidden=None, ref_weight=None, ref_bias=None, kl_coef=0.0):
    same_head = ref_weight is None and ref_bias is None  # the reference is this head, bias too
    if ref_hidden is not None:
        ref_bias = bias if same_head else ref_bias
        if (bias is None) != (ref_bias is None):  # one head has a bias: the other gets zeros
            zeros = lambda w: torch.zeros_like(w[:, 0])  # noqa: E731
            bias = zeros(weight) if bias is None else bias
            ref_bias = zeros(weight if ref_weight is None else ref_weight) if ref_bias is None \
                else ref_bias
    h, w = _inputs.head(hidden, weight, bias=bias)
    y = _inputs.labels_like(labels, hidden, w.shape[0], ignore_index)
    ls, zl, cap, temp = _inputs.options(label_smoothing=label_smoothing, z_loss=z_loss,
                                        softcap=softcap, temperature=temperature)
    norm = _inputs.normalizer(reduction, y != ignore_index, num_items_in_batch)
    rw = _inputs.row_weights(weights, hidden)
    rh = rwt = None
    if ref_hidden is not None:
        check(tuple(ref_hidden.shape) == tuple(hidden.shape),
              f"ref_hidden has shape {tuple(ref_hidden.shape)} but hidden has "
              f"{tuple(hidden.shape)}: pass the reference model's hidden states for the same "
              "tokens")
        ref_w = (weight if ref_weight is None else ref_weight).detach()
        rb = None if same_head or ref_bias is None else ref_bias.detach()
        rh, rwt = _inputs.head(ref_hidden.detach(), ref_w, "ref_hidden", bias=rb)
        if same_head and bias is not None:  # w holds the bias column already: only rh grows
            rh = torch.cat([rh, rh.new_ones(rh.shape[0], 1)], 1)
            rwt = w
        check(rwt.shape == w.shape, f"ref_weight has shape {tuple(rwt.shape)} but weight has "
              f"{tuple(w.shape)}: the reference head must share the vocabulary")
        check(rh.dtype == h.dtype, f"ref_hidden is {rh.dtype} but hidden is {h.dtype}")
        rwt = None if same_head else rwt
    if backends.choose(_op.INFO, h.device) == "reference":
        fn = _ref.asft if rh is not None else (_ref.dft if dft else _ref.cross_entropy)
        extra = {}
        if rh is not None:
            ref_h, ref_w = _inputs.with_bias(ref_hidden, weight if same_head else ref_weight,
                                             None if ref_bias is None else ref_bias.detach())
            extra = dict(ref_hidden=ref_h, ref_weight=None if same_head else ref_w,
                         kl_coef=kl_coef)
        hidden, weight = _inputs.with_bias(hidden, weight, bias)
        return fn(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
                  num_items_in_batch=num_items_in_batch, label_smoothing=ls, z_loss=zl,
                  softcap=softcap, temperature=temp, weights=weights, **extra)
    in_forward = reduction != "none"
    rows, _, _ = torch.ops.fastft.linear_cross_entropy(
        h, w, y, rw, norm, int(ignore_index), ls, zl, cap, temp, dft, rh, rwt, float(kl_coef),
        in_forward and _inputs.wants_grad(h), in_forward and _inputs.wants_grad(w))
    if reduction == "none":
        return rows.reshape(labels.shape)
    return rows.sum()


def cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                  ignore_index: int = -100, reduction: str = "mean", num_items_in_batch=None,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                  temperature: float = 1.0, weights: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``softmax(softcap(hidden @ weight.T + bias) / temperature)`` against ``labels``.

    hidden [..., H], weight [V, H], labels [...] (ignore_index rows are masked);
    ``bias`` [V] for an output head with a bias (Phi-1/Phi-2): the loss then runs on
    (hidden | 1) and (weight | bias), a copy of the head, V x (H+1), per call.
    The logits are computed a chunk of rows at a time and never kept: the
    gradients are formed in the forward. ``reduction``: "mean" over unmasked
    rows (or divided by ``num_items_in_batch`` when given, for gradient
    accumulation), "sum", or "none" (per row, shape of ``labels``).
    ``weights`` [...] multiply each row's loss. ``z_loss`` adds z_loss * lse^2, with
    lse the logsumexp of the logits the loss itself normalises, softcap(z) /
    temperature (PaLM's log Z of the softmax being trained; equal to the raw
    logits' lse when neither option is set).
    """
    return _ce_family(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
                      num_items_in_batch=num_items_in_batch, label_smoothing=label_smoothing,
                      z_loss=z_loss, softcap=softcap, temperature=temperature, weights=weights,
                      bias=bias)


def dft(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
        ignore_index: int = -100, reduction: str = "mean", num_items_in_batch=None,
        weights: torch.Tensor | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
        softcap: float | None = None, temperature: float = 1.0,
        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic Fine-Tuning: each row's CE scaled by its own (detached) target probability.

    loss_t = sg(p_y) * CE_t, so dz = p_y (p - e_y). Same arguments as :func:`cross_entropy`.
    """
    return _ce_family(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
                      num_items_in_batch=num_items_in_batch, label_smoothing=label_smoothing,
                      z_loss=z_loss, softcap=softcap, temperature=temperature, weights=weights,
                      dft=True, bias=bias)


def asft(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
         ref_hidden: torch.Tensor, ref_weight: torch.Tensor | None = None, kl_coef: float = 0.1,
         ignore_index: int = -100, reduction: str = "mean", num_items_in_batch=None,
         weights: torch.Tensor | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
         softcap: float | None = None, temperature: float = 1.0,
         bias: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Anchored SFT: DFT plus kl_coef * KL(p_ref || p) over the whole vocabulary.

    ``ref_hidden`` [..., H]: the frozen reference's final hidden states for the
    same tokens; ``ref_weight`` its head (None: ``weight``). The reference gets
    no gradient; its logits are streamed chunk by chunk, never held for all rows.
    ``bias`` [V]: the head's bias; ``ref_bias`` the reference head's (None: ``bias``
    when ``ref_weight`` is None, the same head; else no bias).
    """
    check(isinstance(ref_hidden, torch.Tensor), "asft needs ref_hidden: the reference model's "
          "hidden states (e.g. the same model with its adapters disabled)")
    check(float(kl_coef) >= 0.0, f"kl_coef must be >= 0; got {kl_coef}")
    return _ce_family(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
                      num_items_in_batch=num_items_in_batch, label_smoothing=label_smoothing,
                      z_loss=z_loss, softcap=softcap, temperature=temperature, weights=weights,
                      dft=True, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      ref_bias=ref_bias, kl_coef=kl_coef)
