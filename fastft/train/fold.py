"""Adapters folded into a working copy of their weights, for the length of a rollout.

Sampling decodes one token at a time, and an unfolded LoRA layer pays its adapter
matmuls (x A^T, then B) on every one of them, in every layer. :func:`folded_adapters`
computes W = W0 + s B R A once (the same fp32 math as ``fastft.merge``, rounded once
to W0's dtype), points the layer's base at that copy and marks the layer merged, so
its forward is the plain linear layer. On exit the original weight tensors are put
back: W0 is never written, only read. The copies (one per adapted weight, at most
one extra copy of the adapted layers) are dropped on exit.

Layers with nothing to fold are left as they are: disabled or already merged adapters,
bases that are not a plain ``nn.Linear`` / ``Conv1D`` (RoSTE caches its own folded and
quantized weight), and weights that are not plain tensors (FSDP2's DTensor shards,
quantized storage).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..methods.lora import LoRALinear, adapter_layers, linear_types


def foldable(layer: nn.Module) -> bool:
    """Whether ``layer`` is an active LoRA / LoRA-SB layer whose adapter can be folded."""
    if not isinstance(layer, LoRALinear) or layer.disabled or layer.merged:
        return False
    base = layer.base_layer
    return type(base) in linear_types() and type(base.weight.data) is torch.Tensor


@torch.no_grad()
def folded_weight(layer: LoRALinear) -> torch.Tensor:
    """W0 + s B R A in W0's layout and dtype (fp32 math, rounded once), a new tensor.

    W0 is added into the fp32 delta in place, so beside the result only that one layer's
    fp32 delta is ever allocated (none more for an fp32 W0)."""
    w = layer.base_layer.weight
    return layer.delta_weight().add_(w).to(w.dtype).contiguous()  # a Conv1D's: transposed


@contextlib.contextmanager
def folded_adapters(model: nn.Module):
    """Run ``model`` with each foldable adapter folded into a copy of its base weight."""
    swapped = []
    try:
        for layer in adapter_layers(model).values():
            if not foldable(layer):
                continue
            base = layer.base_layer
            original = base._parameters["weight"]
            copy = nn.Parameter(folded_weight(layer), requires_grad=False)
            base._parameters["weight"] = copy
            layer.merged = True
            swapped.append((layer, original))
        yield model
    finally:
        for layer, original in swapped:
            layer.base_layer._parameters["weight"] = original
            layer.merged = False
