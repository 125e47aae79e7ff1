"""Reference losses: materialise the logits [T, V] and let autograd differentiate."""

from __future__ import annotations

import contextlib

import torch

_gemm_in_input_dtype = False


@contextlib.contextmanager
def gemm_in_input_dtype():
    """Compute the logits GEMM in the inputs' dtype, then upcast, as Hugging Face models do.

    The benchmarks' plain-PyTorch baseline for bf16/fp16 inputs; the tests keep the
    exact fp32 GEMM.
    """
    global _gemm_in_input_dtype
    old, _gemm_in_input_dtype = _gemm_in_input_dtype, True
    try:
        yield
    finally:
        _gemm_in_input_dtype = old


def logits(hidden, weight, *, softcap=None, temperature=1.0):
    """s = softcap * tanh(h W^T / softcap) / temperature, in fp32, all rows at once."""
    if _gemm_in_input_dtype:
        z = (hidden @ weight.t()).float()
    else:
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
                  temperature=1.0, weights=None, dft=False, ref_hidden=None, ref_weight=None,
                  kl_coef=0.0):
    """CE of METHODS.md §1 (DFT with ``dft``, ASFT with a reference); result shaped as labels."""
    H = hidden.shape[-1]
    s = logits(hidden.reshape(-1, H), weight, softcap=softcap, temperature=temperature)
    y = labels.reshape(-1)
    mask = y != ignore_index
    lse = torch.logsumexp(s, dim=-1)
    s_y = s.gather(1, torch.where(mask, y, 0)[:, None])[:, 0]
    rows = lse - s_y
    if label_smoothing:
        rows = (1 - label_smoothing) * rows + label_smoothing * (lse - s.mean(-1))
    if dft:
        rows = torch.exp(s_y - lse).detach() * rows
    if ref_hidden is not None:
        ref_w = weight if ref_weight is None else ref_weight
        with torch.no_grad():
            log_p_ref = torch.log_softmax(logits(ref_hidden.reshape(-1, H), ref_w,
                                                 softcap=softcap, temperature=temperature), -1)
        kl = (log_p_ref.exp() * (log_p_ref - torch.log_softmax(s, -1))).sum(-1)
        rows = rows + kl_coef * kl
    if z_loss:
        rows = rows + z_loss * lse**2
    if weights is not None:
        rows = rows * weights.reshape(-1).float()
    rows = torch.where(mask, rows, 0.0)
    out = reduce(rows, mask, reduction, num_items_in_batch)
    return out.reshape(labels.shape) if reduction == "none" else out


def dft(hidden, weight, labels, **kw):
    """DFT: sg(p_y) * CE per row (arXiv 2508.05629)."""
    return cross_entropy(hidden, weight, labels, dft=True, **kw)


def asft(hidden, weight, labels, *, ref_hidden, ref_weight=None, kl_coef=0.1, **kw):
    """ASFT: sg(p_y) * CE + kl_coef * KL(p_ref || p) per row, p_ref from a frozen reference."""
    return cross_entropy(hidden, weight, labels, dft=True, ref_hidden=ref_hidden,
                         ref_weight=ref_weight, kl_coef=kl_coef, **kw)


def token_logprobs(hidden, weight, tokens, *, softcap=None, temperature=1.0):
    """log softmax(s)[token] per row, materialising all logits; shape of ``tokens``."""
    H = hidden.shape[-1]
    s = logits(hidden.reshape(-1, H), weight, softcap=softcap, temperature=temperature)
    logp = torch.log_softmax(s, -1).gather(1, tokens.reshape(-1, 1))[:, 0]
    return logp.reshape(tokens.shape)


def otr(hidden, weight, labels, *, samples=None, k=8, beta=0.1, include_target=True,
        ignore_index=-100, reduction="mean", num_items_in_batch=None, softcap=None,
        temperature=1.0, weights=None):
    """One-Token Rollout: -(1/K') sum_k r_k log p(a_k) per row.

    ``samples`` [..., K]; None draws K per row with torch.multinomial from p.
    """
    H = hidden.shape[-1]
    s = logits(hidden.reshape(-1, H), weight, softcap=softcap, temperature=temperature)
    log_p = torch.log_softmax(s, -1)
    y = labels.reshape(-1)
    mask = y != ignore_index
    if samples is None:
        with torch.no_grad():
            samples = torch.multinomial(log_p.exp(), k, replacement=True)
    a = samples.reshape(y.shape[0], -1)
    reward = torch.where(a == y[:, None], 1.0, -beta)
    lp = log_p.gather(1, a)
    if include_target:
        reward = torch.cat([reward, torch.ones_like(reward[:, :1])], 1)
        lp = torch.cat([lp, log_p.gather(1, torch.where(mask, y, 0)[:, None])], 1)
    rows = -(reward * lp).mean(1)
    if weights is not None:
        rows = rows * weights.reshape(-1).float()
    rows = torch.where(mask, rows, 0.0)
    out = reduce(rows, mask, reduction, num_items_in_batch)
    return out.reshape(labels.shape) if reduction == "none" else out


def grpo(hidden, weight, tokens, advantages, *, mask, old_logps=None, ref_logps=None, beta=0.0,
         eps_low=0.2, eps_high=0.2, delta=None, loss_type="dapo", importance_level="token",
         temperature=1.0, num_items_in_batch=None, num_sequences_in_batch=None,
         max_completion_length=None, softcap=None, entropy=False):
    """GRPO-family policy loss as Hugging Face TRL's GRPOTrainer computes it; (loss, metrics)."""
    logp = token_logprobs(hidden, weight, tokens, softcap=softcap, temperature=temperature)
    m = mask.float()
    old = logp.detach() if old_logps is None else old_logps
    log_ratio = logp - old
    if importance_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef1 = torch.exp(log_w)
    coef2 = torch.clamp(coef1, 1 - eps_low, 1 + eps_high)
    capped = torch.clamp(coef1, max=delta) if delta is not None else coef1
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(capped * adv, coef2 * adv)
    kl = torch.zeros_like(logp)
    if ref_logps is not None:
        kl = torch.exp(ref_logps - logp) - (ref_logps - logp) - 1
        if beta != 0.0:
            per_token = per_token + beta * kl
    B, S = m.shape
    # counts of the whole step when given (micro-batches), else of this call
    n_seq = B if num_sequences_in_batch is None else num_sequences_in_batch
    n_tok = m.sum() if num_items_in_batch is None else torch.as_tensor(
        num_items_in_batch, dtype=torch.float32)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / n_seq
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (n_seq * (max_completion_length or S))
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * m).sum() / n_tok.clamp(min=1.0)
    else:
        raise ValueError(loss_type)
    n_tok = m.sum().clamp(min=1.0)
    c1 = coef1.expand_as(m).detach()
    cc = capped.detach()  # clips counted after the delta cap; per sequence at sequence level
    low, high = (cc < 1 - eps_low) & (adv < 0), (cc > 1 + eps_high) & (adv > 0)
    frac = (lambda f: f.float().mean()) if importance_level == "sequence" else \
        (lambda f: (f.float() * m).sum() / n_tok)
    metrics = {
        "kl": (kl.detach() * m).sum() / n_tok,
        "clip_low": frac(low),
        "clip_high": frac(high),
        "ratio": (c1 * m).sum() / n_tok,
    }
    if entropy:
        with torch.no_grad():
            s = logits(hidden.reshape(-1, hidden.shape[-1]), weight, softcap=softcap,
                       temperature=temperature)
            ent = -(torch.softmax(s, -1) * torch.log_softmax(s, -1)).sum(-1)
        metrics["entropy"] = (ent * m.reshape(-1)).sum() / n_tok
    return loss, metrics


def group_advantages(rewards, group_size, scale="group"):
    """TRL's advantages: (r - group mean) / (std + 1e-4), std per group, of the batch, or none."""
    grouped = rewards.view(-1, group_size)
    adv = rewards - grouped.mean(1).repeat_interleave(group_size)
    if scale == "none":
        return adv
    std = grouped.std(1).repeat_interleave(group_size) if scale == "group" \
        else rewards.std().expand_as(rewards)
    return adv / (std + 1e-4)
