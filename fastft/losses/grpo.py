"""fastft.losses.grpo, selective_logprobs and group_advantages: the GRPO family."""

from __future__ import annotations

import torch

from .. import backends
from ..errors import check
from ..ops import linear_grpo as _op
from ..reference import losses as _ref
from . import _inputs

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")
SCALES = ("group", "batch", "none")


def _per_row(t, name, shape, device):
    if t is None:
        return None
    check(isinstance(t, torch.Tensor) and tuple(t.shape) == shape,
          f"{name} must have shape {shape} (one value per completion token); got "
          f"{tuple(getattr(t, 'shape', ()))}")
    return t.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()


def _count(value, default: torch.Tensor, name: str) -> torch.Tensor:
    """A normaliser given by the caller (number or 0-d tensor), else ``default``; 0-d fp32."""
    if value is None:
        return default.float()
    n = torch.as_tensor(value, device=default.device, dtype=torch.float32)
    check(n.numel() == 1, f"{name} must be one number")
    return n.reshape(())


def _row_scale(loss_type, m, num_items_in_batch, num_sequences_in_batch,
               max_completion_length):
    """Per-row reduction weight rw: loss = sum rw * m * per_token (no host sync).

    The normalisers count the whole optimizer step when given (``num_sequences_in_batch``
    for grpo and dr_grpo, ``num_items_in_batch`` tokens for bnpo and dapo), so that the
    micro-batches of a step add up to the loss of one call over all of them.
    """
    B, S = m.shape
    n_seq = _count(num_sequences_in_batch, torch.tensor(float(B), device=m.device),
                   "num_sequences_in_batch")
    if loss_type == "grpo":
        return (1.0 / (m.sum(1, keepdim=True).clamp(min=1.0) * n_seq.clamp(min=1.0))
                ).expand(B, S)
    if loss_type == "dr_grpo":
        L = S if max_completion_length is None else max_completion_length
        check(L >= 1, f"max_completion_length must be >= 1; got {L}")
        return (1.0 / (n_seq.clamp(min=1.0) * L)).expand(B, S)
    n = _count(num_items_in_batch, m.sum(), "num_items_in_batch")
    return (1.0 / n.clamp(min=1.0)).expand(B, S)


def grpo(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
         advantages: torch.Tensor, *, mask: torch.Tensor, old_logps: torch.Tensor | None = None,
         ref_logps: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
         eps_high: float = 0.2, delta: float | None = None, loss_type: str = "dapo",
         importance_level: str = "token", temperature: float = 1.0, num_items_in_batch=None,
         num_sequences_in_batch=None, max_completion_length: int | None = None,
         softcap: float | None = None, entropy: bool = False, bias: torch.Tensor | None = None):
    """GRPO-family policy loss on completion tokens; returns (loss, metrics).

    hidden [B, S, H] (the hidden states that predict ``tokens`` [B, S]),
    advantages [B], mask [B, S] (1 = completion token). ``old_logps`` /
    ``ref_logps`` [B, S] from :func:`selective_logprobs` (old = the current
    policy, detached, when None; ``beta`` > 0 needs ``ref_logps``).
    ``loss_type``: "grpo" (mean per sequence, then over sequences), "bnpo"
    (sum / tokens), "dr_grpo" (sum / (sequences x max_completion_length, default
    S)), "dapo" (sum / tokens). The counts are the micro-batch's unless given:
    ``num_sequences_in_batch`` (grpo, dr_grpo) and ``num_items_in_batch`` (bnpo,
    dapo: tokens) name those of the whole step split into micro-batches, so the
    micro-batches' losses and gradients add up to those of one call (the trainer
    passes this process's step for bnpo, the global one for dapo, as TRL does).
    ``importance_level`` "sequence" is GSPO. ``delta`` caps coef1 from above.
    ``metrics``: 0-d tensors kl, clip_low, clip_high, ratio (and entropy with
    ``entropy=True``), means over completion tokens (the clip fractions over
    sequences at the sequence level; counted after the ``delta`` cap, as TRL
    counts them), computed without a host sync.
    """
    check(loss_type in LOSS_TYPES, f"loss_type must be one of {', '.join(LOSS_TYPES)}; got "
          f"{loss_type!r}")
    check(importance_level in LEVELS, f"importance_level must be 'token' or 'sequence'; got "
          f"{importance_level!r}")
    check(isinstance(hidden, torch.Tensor) and hidden.dim() == 3,
          f"hidden must be [B, S, H] (completion positions); got shape "
          f"{tuple(getattr(hidden, 'shape', ()))}")
    B, S, _ = hidden.shape
    h, w = _inputs.head(hidden, weight, bias=bias)  # bias [V]: a head with a bias (Phi)
    check(isinstance(advantages, torch.Tensor) and tuple(advantages.shape) == (B,),
          f"advantages must have one value per sequence, shape ({B},); got "
          f"{tuple(getattr(advantages, 'shape', ()))}")
    check(isinstance(mask, torch.Tensor) and tuple(mask.shape) == (B, S),
          f"mask must have shape ({B}, {S}) like tokens; got {tuple(getattr(mask, 'shape', ()))}")
    # ids under the mask (padding) are never read: only completion tokens must be in range
    y = _inputs.labels_like(tokens, hidden, w.shape[0], -100, name="tokens",
                            where=mask.to(tokens.device).bool())
    check(eps_low >= 0 and eps_high >= 0, "eps_low and eps_high must be >= 0")
    check(delta is None or float(delta) > 0, f"delta must be > 0 or None; got {delta}")
    check(float(beta) >= 0, f"beta must be >= 0; got {beta}")
    check(beta == 0 or ref_logps is not None,
          "beta > 0 adds KL to a reference policy: pass ref_logps (selective_logprobs of the "
          "reference model), or set beta=0")
    _, _, cap, temp = _inputs.options(softcap=softcap, temperature=temperature)
    m = mask.to(device=h.device, dtype=torch.float32)
    old = _per_row(old_logps, "old_logps", (B, S), h.device)
    ref = _per_row(ref_logps, "ref_logps", (B, S), h.device)
    if backends.choose(_op.INFO, h.device) == "reference":
        hidden, weight = _inputs.with_bias(hidden, weight, bias)
        loss, metrics = _ref.grpo(
            hidden, weight, tokens, advantages, mask=m, old_logps=old_logps, ref_logps=ref_logps,
            beta=beta, eps_low=eps_low, eps_high=eps_high, delta=delta, loss_type=loss_type,
            importance_level=importance_level, temperature=temp,
            num_items_in_batch=num_items_in_batch, num_sequences_in_batch=num_sequences_in_batch,
            max_completion_length=max_completion_length, softcap=softcap, entropy=entropy)
        return loss, metrics
    rw = _row_scale(loss_type, m, num_items_in_batch, num_sequences_in_batch,
                    max_completion_length)
    adv = advantages.detach().float().to(h.device).repeat_interleave(S)
    rows, _, _, stats = torch.ops.fastft.linear_grpo(
        h, w, y, adv, m.reshape(-1), rw.reshape(-1).contiguous(), old, ref, S, float(beta),
        float(eps_low), float(eps_high), float(delta or 0.0), importance_level == "sequence",
        cap, temp, bool(entropy), _inputs.wants_grad(h), _inputs.wants_grad(w))
    flat_m = m.reshape(-1, 1)
    means = (stats * flat_m).sum(0) / m.sum().clamp(min=1.0)
    if importance_level == "sequence":  # one ratio per sequence: TRL counts clips per sequence
        per_seq = (m / (m.sum(1, keepdim=True).clamp(min=1.0) * B)).reshape(-1, 1)
        clips = [_op.METRICS.index("clip_low"), _op.METRICS.index("clip_high")]
        means[clips] = (stats[:, clips] * per_seq).sum(0)
    metrics = {name: means[i] for i, name in enumerate(_op.METRICS)
               if name != "logp" and (name != "entropy" or entropy)}
    return rows.sum(), metrics


def selective_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *,
                       temperature: float = 1.0, softcap: float | None = None,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(softcap(hidden @ weight.T) / temperature)[token], no gradient, no [T, V].

    hidden [..., H], tokens [...]; returns fp32 log-probabilities shaped like tokens
    (for old_logps / ref_logps of :func:`grpo`).
    """
    bias = None if bias is None else bias.detach()  # bias [V]: a head with a bias (Phi)
    h, w = _inputs.head(hidden.detach(), weight.detach(), bias=bias)
    y = _inputs.labels_like(tokens, hidden, w.shape[0], -(2**62), name="tokens")
    _, _, cap, temp = _inputs.options(softcap=softcap, temperature=temperature)
    if backends.choose(_op.LOGPROBS_INFO, h.device) == "reference":
        with torch.no_grad():
            hidden, weight = _inputs.with_bias(hidden, weight, bias)
            return _ref.token_logprobs(hidden, weight, tokens, softcap=softcap, temperature=temp)
    with torch.no_grad():
        logp, _ = torch.ops.fastft.linear_logprobs(h, w, y, cap, temp)
    return logp.reshape(tokens.shape)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group"):
    """A_i = (r_i - mean of its group) / (std + 1e-4), std by ``scale``: group | batch | none.

    ``rewards`` [N] with N a multiple of ``group_size`` (the completions of a prompt
    are consecutive); as TRL's GRPOTrainer computes them.
    """
    check(scale in SCALES, f"scale must be one of {', '.join(SCALES)}; got {scale!r}")
    check(isinstance(rewards, torch.Tensor) and rewards.dim() == 1,
          "rewards must be a 1-d tensor, one reward per completion")
    check(isinstance(group_size, int) and group_size >= 2,
          f"group_size must be >= 2: an advantage compares a completion with the others of its "
          f"prompt (a group of one has no spread, its std is NaN); got {group_size!r}")
    check(rewards.numel() % group_size == 0,
          f"group_size must divide the number of rewards ({rewards.numel()}); got {group_size}")
    r = rewards.float()
    grouped = r.view(-1, group_size)
    adv = r - grouped.mean(1).repeat_interleave(group_size)
    if scale == "none":
        return adv
    std = grouped.std(1).repeat_interleave(group_size) if scale == "group" else r.std().expand_as(r)
    return adv / (std + 1e-4)
