"""Reference AdamW with a masked update: dense fp32 state, written straight from the math.

AdamW (decoupled weight decay, Loshchilov and Hutter; the update of
torch.optim.AdamW) at step t, for gradient g, applied only where the mask is
True; m, v and the weight keep their values everywhere else:

    m <- b1 m + (1 - b1) g
    v <- b2 v + (1 - b2) g^2
    w <- w (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The math is fp32; the new weight is rounded once to its dtype. A mask refresh
drops the state of entries that leave the mask (they restart from zero if they
come back) and keeps the step count. This is what SparseAdamW's compact state
must reproduce exactly.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def masked_adamw_step(weight, grad, mask, exp_avg, exp_avg_sq, *, step: int, lr: float,
                      betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """One AdamW step of ``weight`` where ``mask`` (None: everywhere); dense fp32 m, v."""
    b1, b2 = betas
    g = grad.float()
    m = b1 * exp_avg + (1 - b1) * g
    v = b2 * exp_avg_sq + (1 - b2) * (g * g)
    step_size = lr / (1 - b1 ** step)
    sqrt_bc2 = math.sqrt(1 - b2 ** step)
    w = weight.float() * (1 - lr * weight_decay) - step_size * (m / (v.sqrt() / sqrt_bc2 + eps))
    if mask is None:
        mask = torch.ones_like(weight, dtype=torch.bool)
    exp_avg.copy_(torch.where(mask, m, exp_avg))
    exp_avg_sq.copy_(torch.where(mask, v, exp_avg_sq))
    weight.copy_(torch.where(mask, w.to(weight.dtype), weight))


class MaskedAdamW:
    """AdamW over ``params`` whose update touches only the masked entries (dense state)."""

    def __init__(self, params, masks, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params = list(params)
        self.masks = [None if m is None else m.clone() for m in masks]
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.exp_avg = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.steps = [0] * len(self.params)

    def step(self, grads) -> None:
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            self.steps[i] += 1
            masked_adamw_step(p, g, self.masks[i], self.exp_avg[i], self.exp_avg_sq[i],
                              step=self.steps[i], lr=self.lr, betas=self.betas, eps=self.eps,
                              weight_decay=self.weight_decay)

    @torch.no_grad()
    def refresh(self, new_masks) -> None:
        """New masks; state outside them is dropped, the step counts are kept."""
        for i, mask in enumerate(new_masks):
            if mask is None:
                continue
            self.masks[i] = mask.clone()
            self.exp_avg[i].mul_(mask)
            self.exp_avg_sq[i].mul_(mask)
