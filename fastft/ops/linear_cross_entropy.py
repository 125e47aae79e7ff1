"""fastft::linear_cross_entropy: the fused linear cross-entropy (CE, and DFT).

Loss per unmasked row t, with s = softcap(z) / temperature and z = h_t W^T:

    CE_t   = lse(s) - s_y                       (label smoothing eps:
             (1 - eps) (lse - s_y) + eps (lse - mean_v s_v))
    loss_t = weight_t * (CE_t + z_loss * lse^2) / normaliser

With FASTFT_BACKEND=reference the public function runs fastft.reference
instead of this op. The op returns the per-row losses and, when asked, grad_hidden and grad_weight
computed in the forward for an upstream gradient of one (the loss is summed by
the caller). The registered backward scales them by the upstream gradient.
``grads_in_forward=False`` (reduction "none") computes no gradient in the
forward; the backward recomputes them with the upstream gradient as row weights.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import backends
from . import fused_linear, row_backends

INFO = backends.register(backends.OpInfo(
    name="fastft::linear_cross_entropy",
    summary="fused linear + cross-entropy (label smoothing, z-loss, softcap, temperature)",
    backends=("triton", "torch", "reference"),
))


def _ce_coeffs(labels, mask, scale, *, label_smoothing, z_loss, V):
    """Per-row loss and dz coefficients of CE from the row stats of one chunk."""
    eps = label_smoothing

    def coeffs(start, end, stats):
        lse, gathered, row_sum, _ = stats
        y = labels[start:end]
        m = mask[start:end]
        sc = scale[start:end]
        valid = (y >= 0) & (y < V)
        loss = lse - gathered[:, 0]
        if eps:
            loss = (1.0 - eps) * loss + eps * (lse - row_sum / V)
        c = torch.ones_like(lse)
        if z_loss:
            loss = loss + z_loss * lse * lse
            c = c + 2.0 * z_loss * lse
        # a label outside [0, V) that is not ignored poisons its row with NaN
        bad = m & ~valid
        sc = torch.where(bad, float("nan"), sc)
        loss = torch.where(m, loss * sc, 0.0)
        c = torch.where(m, c * sc, 0.0)
        u = torch.where(m, -sc * (eps / V), 0.0) if eps else torch.zeros_like(c)
        w = torch.where(m, sc * (1.0 - eps), 0.0)[:, None]
        return fused_linear.RowCoeffs(loss=loss, c=c, u=u, w=w)

    return coeffs


def _forward(hidden, weight, labels, row_weights, normalizer, ignore_index, label_smoothing,
             z_loss, softcap, temperature, need_gh, need_gw):
    backend = backends.choose(INFO, hidden.device)
    V = weight.shape[0]
    mask = labels != ignore_index
    scale = mask.float() / normalizer.float()
    if row_weights is not None:
        scale = scale * row_weights.float()
    idx = torch.where(mask, labels, -1).unsqueeze(1)
    coeffs = _ce_coeffs(labels, mask, scale, label_smoothing=label_smoothing, z_loss=z_loss, V=V)
    return fused_linear.run(
        hidden, weight, idx, coeffs, row_backends.get(backend), softcap=softcap,
        temperature=temperature, want_sum=label_smoothing > 0, want_entropy=False,
        need_grad_hidden=need_gh, need_grad_weight=need_gw)


@torch.library.custom_op("fastft::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, row_weights: Tensor | None,
    normalizer: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float, temperature: float, need_grad_hidden: bool, need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(row_loss [T] fp32, grad_hidden [T, H] or [0], grad_weight [V, H] or [0])."""
    row_loss, gh, gw = _forward(
        hidden, weight, labels, row_weights, normalizer, ignore_index, label_smoothing,
        z_loss, softcap, temperature, need_grad_hidden, need_grad_weight)
    return (row_loss, hidden.new_empty(0) if gh is None else gh,
            hidden.new_empty(0) if gw is None else gw)


@linear_cross_entropy.register_fake
def _(hidden, weight, labels, row_weights, normalizer, ignore_index, label_smoothing, z_loss,
      softcap, temperature, need_grad_hidden, need_grad_weight):
    T = hidden.shape[0]
    row_loss = hidden.new_empty(T, dtype=torch.float32)
    gh = torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0)
    gw = torch.empty_like(weight) if need_grad_weight else hidden.new_empty(0)
    return row_loss, gh, gw


def _setup_context(ctx, inputs, output):
    (hidden, weight, labels, row_weights, normalizer, ignore_index, label_smoothing, z_loss,
     softcap, temperature, need_gh, need_gw) = inputs
    _, gh, gw = output
    ctx.in_forward = need_gh or need_gw
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, temperature)
    ctx.has_row_weights = row_weights is not None
    if ctx.in_forward:
        ctx.save_for_backward(gh, gw)
    else:  # reduction "none": keep the inputs and recompute in the backward
        ctx.save_for_backward(hidden, weight, labels, row_weights, normalizer)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_rows, _g_gh, _g_gw):
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if g_rows is None:
        return (None,) * 12
    if ctx.in_forward:
        gh, gw = ctx.saved_tensors
        # The caller summed the rows: the upstream gradient is the same for every row.
        g = g_rows.reshape(-1)[:1].to(torch.float32)
        grad_h = (gh * g.to(gh.dtype)) if need_h and gh.numel() else None
        grad_w = (gw * g.to(gw.dtype)) if need_w and gw.numel() else None
    else:
        hidden, weight, labels, row_weights, normalizer = ctx.saved_tensors
        rw = g_rows.float() if row_weights is None else g_rows.float() * row_weights.float()
        _, grad_h, grad_w = torch.ops.fastft.linear_cross_entropy(
            hidden, weight, labels, rw.contiguous(), normalizer, *ctx.options,
            bool(need_h), bool(need_w))
        grad_h = grad_h if need_h else None
        grad_w = grad_w if need_w else None
    return (grad_h, grad_w) + (None,) * 10


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.fastft.linear_cross_entropy)
def _flops(hidden_shape, weight_shape, *args, **kwargs) -> int:
    """GEMM FLOPs: the logits, plus one GEMM per gradient formed in the forward."""
    need_gh, need_gw = args[-2], args[-1]
    T, H = hidden_shape
    return 2 * T * weight_shape[0] * H * (1 + int(need_gh) + int(need_gw))
