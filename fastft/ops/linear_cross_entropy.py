"""fastft::linear_cross_entropy: the fused linear cross-entropy family (CE, DFT, ASFT).

Per unmasked row t, with s = softcap(z) / temperature and z = h_t W^T:

    CE_t   = lse(s) - s_y             (label smoothing eps: (1 - eps) CE_t + eps (lse - mean_v s_v))
    DFT_t  = sg(p_y) CE_t             (dft=True)
    ASFT_t = sg(p_y) CE_t + kl_coef KL(p_ref || p)    (dft=True and a reference head)
    loss_t = weight_t (.. + z_loss lse^2) / normaliser

p_ref is the softmax of the reference logits ref_hidden ref_weight^T (ref_weight
None: the same head), streamed chunk by chunk beside the policy's; the
reference side gets no gradient. The op returns the per-row losses and, when
asked, grad_hidden and grad_weight formed in the forward (fastft.ops.fused_autograd).
With FASTFT_BACKEND=reference the public functions run fastft.reference instead.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import backends
from . import fused_autograd, fused_linear, row_backends

INFO = backends.register(backends.OpInfo(
    name="fastft::linear_cross_entropy",
    summary="fused linear cross-entropy, DFT and ASFT (label smoothing, z-loss, softcap, "
            "temperature)",
    backends=("triton", "cpp", "torch", "reference"),
    cpp_extension="loss_rows",
))


def _coeffs(labels, mask, scale, *, label_smoothing, z_loss, dft, kl_coef, V):
    """Per-row loss and dz coefficients from the row stats of one chunk."""
    eps = label_smoothing

    def coeffs(start, end, stats, idx_c):
        lse, gathered, row_sum, _ = stats
        y, m = labels[start:end], mask[start:end]
        valid = (y >= 0) & (y < V)
        # a label outside [0, V) that is not ignored poisons its row with NaN
        sc = torch.where(m & ~valid, float("nan"), scale[start:end])
        ce = lse - gathered[:, 0]
        if eps:
            ce = (1.0 - eps) * ce + eps * (lse - row_sum / V)
        f = torch.exp(gathered[:, 0] - lse) if dft else torch.ones_like(lse)
        loss = f * ce
        c = f + kl_coef
        if z_loss:
            loss = loss + z_loss * lse * lse
            c = c + 2.0 * z_loss * lse
        return fused_linear.RowCoeffs(
            loss=torch.where(m, loss * sc, 0.0),
            c=torch.where(m, c * sc, 0.0),
            u=torch.where(m, -sc * f * (eps / V), 0.0),
            w=torch.where(m, sc * f * (1.0 - eps), 0.0)[:, None],
            lam=torch.where(m, sc * kl_coef, 0.0))

    return coeffs


@torch.library.custom_op("fastft::linear_cross_entropy", mutates_args=())
@backends.no_autocast
def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, row_weights: Tensor | None,
    normalizer: Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float, temperature: float, dft: bool, ref_hidden: Tensor | None,
    ref_weight: Tensor | None, kl_coef: float, need_grad_hidden: bool, need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(row_loss [T] fp32, grad_hidden [T, H] or [0], grad_weight [V, H] or [0])."""
    backend = backends.choose(INFO, hidden.device)
    V = weight.shape[0]
    mask, scale = fused_linear.row_scale(labels, ignore_index, normalizer, row_weights)
    ref = None
    if ref_hidden is not None:
        ref = (ref_hidden, weight if ref_weight is None else ref_weight)
    coeffs = _coeffs(labels, mask, scale, label_smoothing=label_smoothing, z_loss=z_loss,
                     dft=dft, kl_coef=kl_coef if ref is not None else 0.0, V=V)
    rows, gh, gw = fused_linear.run(
        hidden, weight, idx=torch.where(mask, labels, -1).unsqueeze(1), coeffs=coeffs,
        rows=row_backends.get(backend), softcap=softcap, temperature=temperature,
        want_sum=label_smoothing > 0, ref=ref, need_grad_hidden=need_grad_hidden,
        need_grad_weight=need_grad_weight, row_scale=scale)
    return fused_linear.op_outputs(hidden, rows, gh, gw)


@linear_cross_entropy.register_fake
def _(hidden, weight, labels, row_weights, normalizer, ignore_index, label_smoothing, z_loss,
      softcap, temperature, dft, ref_hidden, ref_weight, kl_coef, need_grad_hidden,
      need_grad_weight):
    return fused_linear.fake_outputs(hidden, weight, need_grad_hidden, need_grad_weight,
                                     ref=ref_hidden is not None)


fused_autograd.register(linear_cross_entropy, INFO, row_weights=3, need_hidden=14, need_weight=15)


@register_flop_formula(torch.ops.fastft.linear_cross_entropy)
def _flops(hidden_shape, weight_shape, *args, **kwargs) -> int:
    """GEMM FLOPs: the logits (and the reference's), plus one GEMM per gradient."""
    need_gh, need_gw = args[-2], args[-1]
    has_ref = args[9] is not None
    T, H = hidden_shape
    return 2 * T * weight_shape[0] * H * (1 + int(has_ref) + int(need_gh) + int(need_gw))
