"""fastft.losses.otr: One-Token Rollout from hidden states."""

from __future__ import annotations

import torch

from .. import backends
from ..errors import check
from ..ops import linear_otr as _op
from ..reference import losses as _ref
from . import _inputs


def otr(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, k: int = 8,
        temperature: float = 1.0, sampling_temperature: float = 1.0, beta: float = 0.1,
        include_target: bool = True, seed: int | None = None,
        samples: torch.Tensor | None = None, return_samples: bool = False,
        ignore_index: int = -100, reduction: str = "mean", num_items_in_batch=None,
        weights: torch.Tensor | None = None, softcap: float | None = None,
        bias: torch.Tensor | None = None):
    """One-Token Rollout (arXiv 2509.26313): every target position as a one-step RL episode.

    The policy is p = softmax(softcap(hidden @ weight.T) / temperature) (the
    model's own distribution: ``temperature`` is the model's logit scaling, 1 for
    most). K tokens are drawn from it at ``sampling_temperature`` tau, i.e. from
    softmax(softcap(z) / (temperature tau)) (inside the kernel: Gumbel-max on CUDA and
    the torch path, the inverse CDF on the C++ CPU path, each keyed by ``seed``, row
    and k: the same seed and backend give the same samples; without a seed
    one is drawn from torch's generator, so repeated calls draw fresh samples),
    rewarded 1 if equal to the label else -beta; ``include_target`` adds the
    label as one more rollout with reward 1. loss_t = -(1/K') sum_k r_k log p(a_k):
    tau shapes only the sampling. ``samples`` [..., k] skips sampling.
    Returns the loss, or (loss, samples [..., k]) with ``return_samples``.
    """
    h, w = _inputs.head(hidden, weight, bias=bias)  # bias [V]: a head with a bias (Phi)
    y = _inputs.labels_like(labels, hidden, w.shape[0], ignore_index)
    check(isinstance(k, int) and k >= 1, f"k (rollouts per row) must be an int >= 1; got {k!r}")
    check(float(beta) >= 0.0, f"beta (penalty of a wrong sample) must be >= 0; got {beta}")
    if seed is None:  # from torch's generator (torch.manual_seed decides); none to draw when tracing
        seed = int(torch.randint(0, 2**62, (1,))) if samples is None and _inputs.has_data(h) else 0
    check(isinstance(seed, int) and 0 <= seed < 2**63, f"seed must be an int in [0, 2**63); "
          f"got {seed!r}")
    _, _, cap, temp = _inputs.options(softcap=softcap, temperature=temperature)
    check(float(sampling_temperature) > 0.0,
          f"sampling_temperature must be > 0; got {sampling_temperature}")
    sample_temp = temp * float(sampling_temperature)
    norm = _inputs.normalizer(reduction, y != ignore_index, num_items_in_batch)
    rw = _inputs.row_weights(weights, hidden)
    flat = None
    if samples is not None:
        want = (*hidden.shape[:-1], k)
        check(isinstance(samples, torch.Tensor) and tuple(samples.shape) == want,
              f"samples must have shape {want} (one row of k token ids per position); got "
              f"{tuple(getattr(samples, 'shape', ()))}")
        check(not samples.is_floating_point() and samples.device == h.device,
              f"samples must be integer token ids on {h.device}; got {samples.dtype} on "
              f"{samples.device}")
        flat = samples.reshape(-1, k).long()
        if _inputs.has_data(flat) and (flat.device.type == "cpu" or _inputs.debug()):
            check(bool(((flat >= 0) & (flat < w.shape[0])).all()),
                  f"samples hold token ids outside [0, {w.shape[0]})")
    if backends.choose(_op.INFO, h.device) == "reference":
        if flat is None:
            from ..ops import gumbel_torch

            with torch.no_grad():
                z = h.float() @ w.float().t()
                flat = gumbel_torch.sample(z, k, seed=seed, row_offset=0, softcap=cap,
                                           temperature=sample_temp)
        hidden, weight = _inputs.with_bias(hidden, weight, bias)
        loss = _ref.otr(hidden, weight, labels, samples=flat.reshape(*labels.shape, k),
                        beta=beta, include_target=include_target, ignore_index=ignore_index,
                        reduction=reduction, num_items_in_batch=num_items_in_batch,
                        softcap=softcap, temperature=temp, weights=weights)
        drawn = flat
    else:
        in_forward = reduction != "none"
        rows, _, _, drawn = torch.ops.fastft.linear_otr(
            h, w, y, rw, norm, flat, int(ignore_index), k, float(beta), bool(include_target),
            seed, cap, temp, sample_temp, in_forward and _inputs.wants_grad(h),
            in_forward and _inputs.wants_grad(w))
        loss = rows.reshape(labels.shape) if reduction == "none" else rows.sum()
    if return_samples:
        return loss, drawn.reshape(*labels.shape, k)
    return loss
