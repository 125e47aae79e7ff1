"""fastft::linear_grpo and fastft::linear_logprobs: the GRPO family, fused with the output head.

On completion rows with token y, advantage A of the row's sequence and mask m:

    logp      = log softmax(s)_y,  log_ratio = logp - old_logp  (old = sg(logp) when not given)
    coef1     = exp(log_ratio)                       (token level)
              = exp(masked mean of log_ratio over the sequence)      (sequence level, GSPO)
    coef2     = clamp(coef1, 1 - eps_low, 1 + eps_high);  coef1 capped at ``delta`` when given
    per_token = -min(coef1 A, coef2 A) + beta (exp(ref - logp) - (ref - logp) - 1)
    loss      = sum_t rw_t m_t per_token_t

rw_t, the reduction weight of the row, carries the loss_type's normaliser
(fastft.losses.grpo). The loss is a function of the per-row logp alone, so
dz_t = g_t (e_y - p_t) with g_t = dloss/dlogp_t, computed here in closed form
(torch's tie rule of min and clamp included). Sequence-level ratios with given
old_logps need every logp of a sequence first: then a first pass computes them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import backends
from . import fused_autograd, fused_linear, row_backends

INFO = backends.register(backends.OpInfo(
    name="fastft::linear_grpo",
    summary="fused GRPO / DAPO / Dr. GRPO / GSPO policy loss with metrics",
    backends=("triton", "cpp", "torch", "reference"),
    cpp_extension="loss_rows",
))
LOGPROBS_INFO = backends.register(backends.OpInfo(
    name="fastft::linear_logprobs",
    summary="fused per-token log-probabilities (and entropy), no gradient",
    backends=("triton", "cpp", "torch", "reference"),
    cpp_extension="loss_rows",
))
METRICS = ("logp", "kl", "ratio", "clip_low", "clip_high", "entropy")


def _logprobs(hidden, weight, tokens, rows_be, softcap, temperature):
    """(logp [T], entropy [T]) in one pass without gradients."""
    T = hidden.shape[0]
    out = torch.empty(T, 2, device=hidden.device, dtype=torch.float32)

    def coeffs(start, end, stats, idx_c):
        lse, gathered, _, entropy = stats
        out[start:end, 0] = gathered[:, 0] - lse
        out[start:end, 1] = entropy
        zero = torch.zeros_like(lse)
        return fused_linear.RowCoeffs(loss=zero, c=zero, u=zero, w=zero[:, None])

    fused_linear.run(hidden, weight, idx=tokens.unsqueeze(1), coeffs=coeffs, rows=rows_be,
                     softcap=softcap, temperature=temperature, want_entropy=True,
                     need_grad_hidden=False, need_grad_weight=False)
    return out[:, 0], out[:, 1]


def clipped_objective(coef1, adv, eps_low, eps_high, delta):
    """(-min(coef1' A, coef2 A), its derivative in log coef1), coef1' = min(coef1, delta)."""
    coef2 = coef1.clamp(1.0 - eps_low, 1.0 + eps_high)
    capped = coef1.clamp(max=delta) if delta > 0 else coef1
    l1, l2 = capped * adv, coef2 * adv
    d1 = -adv * coef1 * ((coef1 <= delta).float() if delta > 0 else 1.0)
    d2 = -adv * coef1 * ((coef1 >= 1.0 - eps_low) & (coef1 <= 1.0 + eps_high)).float()
    d = torch.where(l1 < l2, d1, torch.where(l1 > l2, d2, 0.5 * (d1 + d2)))
    return -torch.minimum(l1, l2), d


@torch.library.custom_op("fastft::linear_grpo", mutates_args=())
@backends.no_autocast
def linear_grpo(
    hidden: Tensor, weight: Tensor, tokens: Tensor, advantages: Tensor, mask: Tensor,
    row_scale: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None, seq_len: int,
    beta: float, eps_low: float, eps_high: float, delta: float, sequence_level: bool,
    softcap: float, temperature: float, want_entropy: bool, need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row_loss [T], grad_hidden or [0], grad_weight or [0], row metrics [T, 6]).

    All per-row inputs are [T] (T = B * seq_len); advantages already expanded to rows.
    Metrics columns: logp, kl, ratio (coef1), clip_low, clip_high, entropy (0 unless wanted).
    """
    backend = backends.choose(INFO, hidden.device)
    rows_be = row_backends.get(backend)
    T = hidden.shape[0]
    m = mask.float()
    rw = row_scale.float() * m
    seq = torch.arange(T, device=hidden.device) // max(seq_len, 1)
    B = -(-T // max(seq_len, 1))
    n_seq = torch.zeros(B, device=hidden.device).index_add_(0, seq, m).clamp(min=1.0)
    log_w = None
    if sequence_level:
        rsum = torch.zeros(B, device=hidden.device).index_add_(0, seq, rw)[seq]
        if old_logps is not None:
            logp_all, _ = _logprobs(hidden, weight, tokens, rows_be, softcap, temperature)
            lr = (logp_all - old_logps.float()) * m
            log_w = (torch.zeros(B, device=hidden.device).index_add_(0, seq, lr) / n_seq)[seq]
        else:
            log_w = torch.zeros(T, device=hidden.device)
        n_row = n_seq[seq]
    metrics = torch.empty(T, len(METRICS), device=hidden.device, dtype=torch.float32)

    def coeffs(start, end, stats, idx_c):
        lse, gathered, _, entropy = stats
        logp = gathered[:, 0] - lse
        adv = advantages[start:end].float()
        if sequence_level:
            coef1 = torch.exp(log_w[start:end])
        elif old_logps is not None:
            coef1 = torch.exp(logp - old_logps[start:end].float())
        else:
            coef1 = torch.ones_like(logp)  # exp(logp - sg(logp))
        per, d = clipped_objective(coef1, adv, eps_low, eps_high, delta)
        r, mm = rw[start:end], m[start:end]
        if sequence_level:
            g = rsum[start:end] * d * mm / n_row[start:end]
        else:
            g = r * d
        kl = torch.zeros_like(logp)
        if ref_logps is not None:
            diff = ref_logps[start:end].float() - logp
            kl = torch.exp(diff) - diff - 1.0
            if beta:
                per = per + beta * kl
                g = g + r * beta * (1.0 - torch.exp(diff))
        clip = coef1.clamp(max=delta) if delta > 0 else coef1  # counted after the cap, as TRL
        metrics[start:end] = torch.stack([
            logp, kl, coef1, ((clip < 1.0 - eps_low) & (adv < 0)).float(),
            ((clip > 1.0 + eps_high) & (adv > 0)).float(),
            entropy if want_entropy else torch.zeros_like(logp)], dim=1)
        # g = dloss/dlogp, and dlogp/dz = e_y - p: dz = -g p + g e_y
        return fused_linear.RowCoeffs(loss=r * per, c=-g, u=torch.zeros_like(g), w=-g[:, None])

    rows, gh, gw = fused_linear.run(
        hidden, weight, idx=tokens.unsqueeze(1), coeffs=coeffs, rows=rows_be, softcap=softcap,
        temperature=temperature, want_entropy=want_entropy, need_grad_hidden=need_grad_hidden,
        need_grad_weight=need_grad_weight, row_scale=rw)
    return (*fused_linear.op_outputs(hidden, rows, gh, gw), metrics)


@linear_grpo.register_fake
def _(hidden, weight, tokens, advantages, mask, row_scale, old_logps, ref_logps, seq_len, beta,
      eps_low, eps_high, delta, sequence_level, softcap, temperature, want_entropy,
      need_grad_hidden, need_grad_weight):
    T = hidden.shape[0]
    return (*fused_linear.fake_outputs(hidden, weight, need_grad_hidden, need_grad_weight),
            hidden.new_empty(T, len(METRICS), dtype=torch.float32))


fused_autograd.register(linear_grpo, INFO, row_weights=5, need_hidden=17, need_weight=18)


@register_flop_formula(torch.ops.fastft.linear_grpo)
def _flops(hidden_shape, weight_shape, *args, **kwargs) -> int:
    T, H = hidden_shape
    two_pass = bool(args[11]) and args[4] is not None  # sequence level with old_logps
    return 2 * T * weight_shape[0] * H * (1 + int(two_pass) + int(args[-2]) + int(args[-1]))


@torch.library.custom_op("fastft::linear_logprobs", mutates_args=())
@backends.no_autocast
def linear_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, softcap: float,
                    temperature: float) -> tuple[Tensor, Tensor]:
    """(log p(token) [T], entropy [T]) under softmax(softcap(h W^T) / temperature)."""
    backend = backends.choose(LOGPROBS_INFO, hidden.device)
    logp, entropy = _logprobs(hidden, weight, tokens, row_backends.get(backend), softcap,
                              temperature)
    return logp.clone(), entropy.clone()


@linear_logprobs.register_fake
def _(hidden, weight, tokens, softcap, temperature):
    T = hidden.shape[0]
    return hidden.new_empty(T, dtype=torch.float32), hidden.new_empty(T, dtype=torch.float32)


@register_flop_formula(torch.ops.fastft.linear_logprobs)
def _flops_logprobs(hidden_shape, weight_shape, *args, **kwargs) -> int:
    T, H = hidden_shape
    return 2 * T * weight_shape[0] * H
