"""fastft::linear_otr: One-Token Rollout, fused with the output head.

Each unmasked row is a one-step episode: K tokens a_k are sampled from the
current policy p = softmax(s) (no gradient through sampling) with reward
r_k = 1 if a_k = y else -beta; with ``include_target`` the target y is one more
rollout with reward 1. The samples are drawn at their own temperature; p is the
model's distribution. Over the K' = K (+1) rollouts:

    loss_t = -(1/K') sum_k r_k log p(a_k),    dz = (rbar p - (1/K') sum_k r_k e_{a_k}) ds/dz

with rbar the mean reward. The samples come from ``samples`` [T, K] when
given, else from the backend's sampler on the chunk's own logits, a pure
function of (seed, row, k): Gumbel-max with Philox noise keyed by (seed, row,
k, v) on the Triton and torch backends (one stream), the inverse CDF of each
row on the C++ one (its own stream, csrc/gumbel_sample.cpp). The op returns them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import backends
from . import fused_autograd, fused_linear, row_backends

INFO = backends.register(backends.OpInfo(
    name="fastft::linear_otr",
    summary="fused One-Token Rollout (in-kernel Gumbel-max sampling, or given samples)",
    backends=("triton", "cpp", "torch", "reference"),
    cpp_extension="gumbel_sample",
))


@torch.library.custom_op("fastft::linear_otr", mutates_args=())
@backends.no_autocast
def linear_otr(
    hidden: Tensor, weight: Tensor, labels: Tensor, row_weights: Tensor | None,
    normalizer: Tensor, samples: Tensor | None, ignore_index: int, k: int, beta: float,
    include_target: bool, seed: int, softcap: float, temperature: float,
    sample_temperature: float, need_grad_hidden: bool, need_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row_loss [T], grad_hidden or [0], grad_weight or [0], samples [T, k] int64).

    ``temperature`` shapes the differentiated distribution p (the model's own);
    ``sample_temperature`` the one the rollouts are drawn from.
    """
    backend = backends.choose(INFO, hidden.device)
    rows_be = row_backends.get(backend)
    mask, scale = fused_linear.row_scale(labels, ignore_index, normalizer, row_weights)
    target = torch.where(mask, labels, -1) if include_target else None  # a last rollout
    drawn = torch.empty(hidden.shape[0], k, device=hidden.device, dtype=torch.int64) \
        if samples is None else samples.contiguous()

    def drawn_stats(start, end, z):  # the samples and the loss's row stats, in one read of z
        s, idx_c, stats = rows_be.sample_stats(
            z, k, None if target is None else target[start:end], seed=seed, row_offset=start,
            softcap=softcap, temperature=temperature, sample_temperature=sample_temperature)
        drawn[start:end] = s
        return idx_c, stats

    given = None  # the entries of the given samples (and the target) per row
    if samples is not None:
        given = drawn if target is None else torch.cat([drawn, target[:, None]], dim=1)

    n_roll = k + int(include_target)

    def coeffs(start, end, stats, idx_c):
        lse, gathered = stats[0], stats[1]
        m, sc = mask[start:end], scale[start:end]
        reward = torch.where(idx_c == labels[start:end, None], 1.0, -beta)
        if include_target:
            reward[:, k] = 1.0
        reward = reward / n_roll
        rbar = reward.sum(1)
        loss = (reward * (lse[:, None] - gathered)).sum(1)
        return fused_linear.RowCoeffs(
            loss=torch.where(m, loss * sc, 0.0), c=torch.where(m, rbar * sc, 0.0),
            u=torch.zeros_like(lse), w=torch.where(m[:, None], reward * sc[:, None], 0.0))

    rows, gh, gw = fused_linear.run(
        hidden, weight, idx=given, coeffs=coeffs, rows=rows_be, softcap=softcap,
        temperature=temperature, need_grad_hidden=need_grad_hidden,
        need_grad_weight=need_grad_weight, row_scale=scale,
        stats=drawn_stats if samples is None else None)
    return (*fused_linear.op_outputs(hidden, rows, gh, gw),
            drawn.clone() if samples is not None else drawn)


@linear_otr.register_fake
def _(hidden, weight, labels, row_weights, normalizer, samples, ignore_index, k, beta,
      include_target, seed, softcap, temperature, sample_temperature, need_grad_hidden,
      need_grad_weight):
    T = hidden.shape[0]
    return (*fused_linear.fake_outputs(hidden, weight, need_grad_hidden, need_grad_weight),
            hidden.new_empty(T, k, dtype=torch.int64))


fused_autograd.register(linear_otr, INFO, row_weights=3, need_hidden=14, need_weight=15)


@register_flop_formula(torch.ops.fastft.linear_otr)
def _flops(hidden_shape, weight_shape, *args, **kwargs) -> int:
    T, H = hidden_shape
    return 2 * T * weight_shape[0] * H * (1 + int(args[-2]) + int(args[-1]))
