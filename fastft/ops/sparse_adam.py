"""fastft::sparse_adam_step: one AdamW update of the entries of weights named by index lists.

For the k entries o = idx[i] of a weight (flat, row-major) with compact fp32
state m, v [k] and a gradient that is either compact (fp32 [k], gathered
earlier) or the dense gradient of the weight (gathered here), at step t:

    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
    w[o] = w[o] (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

in fp32, rounded once to the weight's dtype; everything else of the weight is
untouched. One call updates a list of weights of one dtype: ``idx``, ``exp_avg``,
``exp_avg_sq`` (and a compact gradient) are flat, segment j =
[offsets[j], offsets[j + 1]) belonging to ``weights[j]``; dense gradients come
one per weight. Mutates the weights, ``exp_avg`` and ``exp_avg_sq`` in place.
The coefficients are computed on the host from Python numbers: no device sync.

Backends: ``triton`` (kernels/sparse_adam.py: one launch for all the weights
with a compact gradient), ``cpp`` (csrc/sparse_adam.cpp), ``torch`` (gather,
update, scatter with torch ops), ``reference`` (the dense masked AdamW of
fastft/reference/optim.py on scattered copies of the state).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends
from ..errors import check

INFO = backends.register(backends.OpInfo(
    name="fastft::sparse_adam_step",
    summary="fused sparse AdamW: gather the gradient at idx, update compact m, v and the "
            "weight entries in place",
    backends=("triton", "cpp", "torch", "reference"),
    cpp_extension="sparse_adam",
))


def coefficients(lr: float, beta1: float, beta2: float, weight_decay: float,
                 step: int) -> dict:
    """The per-step scalars of the update, from Python numbers (no tensor, no sync)."""
    return dict(decay=1.0 - lr * weight_decay, step_size=lr / (1.0 - beta1 ** step),
                sqrt_bc2=math.sqrt(1.0 - beta2 ** step))


@torch.library.custom_op("fastft::sparse_adam_step",
                         mutates_args=("weights", "exp_avg", "exp_avg_sq"))
def sparse_adam_step(weights: list[Tensor], grads: list[Tensor], idx: Tensor, exp_avg: Tensor,
                     exp_avg_sq: Tensor, offsets: list[int], lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, step: int,
                     compact: bool) -> None:
    """Update ``weights`` at their segments of ``idx`` and the flat ``exp_avg``, ``exp_avg_sq``
    in place; ``grads`` is [the flat compact gradient] or one dense gradient per weight."""
    check(len(offsets) == len(weights) + 1 and offsets[0] == 0 and offsets[-1] == idx.numel(),
          "sparse_adam_step: offsets must hold len(weights) + 1 segment bounds of idx")
    check(len(grads) == (1 if compact else len(weights)),
          "sparse_adam_step: give one flat compact gradient, or one dense gradient per weight")
    check(all(w.is_contiguous() for w in weights), "sparse_adam_step: the weights must be "
          "contiguous (their entries are addressed by flat index)")
    check(len({w.dtype for w in weights}) <= 1, "sparse_adam_step: one dtype per call")
    check(step >= 1, f"sparse_adam_step: step counts from 1; got {step}")
    if not weights:
        return
    backend = backends.choose(INFO, weights[0].device)
    grads = [g.contiguous() for g in grads]
    k = coefficients(lr, beta1, beta2, weight_decay, step)
    if backend == "triton":
        from ..kernels import sparse_adam as kernel

        kernel.step(weights, grads, idx, exp_avg, exp_avg_sq, offsets, beta1=beta1, beta2=beta2,
                    eps=eps, compact=compact, **k)
        return
    if backend == "cpp":
        from .. import extensions

        ext = extensions.load("sparse_adam")
        if ext is not None:
            ext.sparse_adam_step(weights, grads, idx, exp_avg, exp_avg_sq, offsets, beta1, beta2,
                                 eps, k["decay"], k["step_size"], k["sqrt_bc2"], compact)
            return
    for j, w in enumerate(weights):
        a, b = offsets[j], offsets[j + 1]
        g = grads[0][a:b] if compact else grads[j]
        if backend == "reference":
            _reference(w, g, idx[a:b], exp_avg[a:b], exp_avg_sq[a:b], lr, beta1, beta2, eps,
                       weight_decay, step, compact)
        else:
            _torch(w, g, idx[a:b], exp_avg[a:b], exp_avg_sq[a:b], beta1, beta2, eps, compact,
                   **k)


@sparse_adam_step.register_fake
def _(weights, grads, idx, exp_avg, exp_avg_sq, offsets, lr, beta1, beta2, eps, weight_decay,
      step, compact):
    return None


def _torch(weight, grad, idx, m, v, beta1, beta2, eps, compact, decay, step_size, sqrt_bc2):
    """Gather, update, scatter with torch ops: memory O(k), never a dense temporary."""
    flat = weight.view(-1)
    g = grad.float() if compact else grad.view(-1).index_select(0, idx).float()
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    w = flat.index_select(0, idx).float()
    w.mul_(decay).sub_(torch.div(m, v.sqrt().div_(sqrt_bc2).add_(eps)).mul_(step_size))
    flat.index_put_((idx,), w.to(flat.dtype))


def _reference(weight, grad, idx, m, v, lr, beta1, beta2, eps, weight_decay, step, compact):
    """The dense masked AdamW of fastft.reference on dense copies of the compact state."""
    from ..reference import optim as ref

    n = weight.numel()
    dense = lambda src, dtype: torch.zeros(n, device=weight.device, dtype=dtype) \
        .index_put_((idx,), src).view_as(weight)  # noqa: E731
    mask = dense(torch.ones_like(idx, dtype=torch.bool), torch.bool)
    g = dense(grad.float(), torch.float32) if compact else grad.view_as(weight)
    dm, dv = dense(m, torch.float32), dense(v, torch.float32)
    ref.masked_adamw_step(weight, g, mask, dm, dv, step=step, lr=lr, betas=(beta1, beta2),
                          eps=eps, weight_decay=weight_decay)
    m.copy_(dm.view(-1).index_select(0, idx))
    v.copy_(dv.view(-1).index_select(0, idx))
