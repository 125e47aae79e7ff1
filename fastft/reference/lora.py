"""Reference LoRA / LoRA-SB linear: the plain composition PEFT computes, autograd for gradients."""

from __future__ import annotations

import torch.nn.functional as F


def lora_linear(x, weight, bias, lora_a, lora_b, lora_r=None, scale=1.0, dropout=None):
    """x W0^T + bias + scale * B R A dropout(x), with W0 frozen by the caller."""
    base = F.linear(x, weight, bias)
    xl = x if dropout is None else dropout(x)
    xa = F.linear(xl.to(lora_a.dtype), lora_a)
    if lora_r is not None:
        xa = F.linear(xa, lora_r)
    return base + (F.linear(xa, lora_b) * scale).to(base.dtype)
