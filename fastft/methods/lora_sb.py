"""LoRA-SB initialisation: adapters from a one-step approximation of full fine-tuning.

METHODS.md §2. Sum the gradient G of every target W0 over the first ``n_init``
samples (mini-batches, each loss divided by its batch size); form the first
update dW = -lr_eff sign(G) with lr_eff = lr / (warmup_ratio x total_steps);
take the truncated SVD of dW^T (q = r, 10 power iterations, fp32),
dW^T ~ U S V^T, and set A = U^T, B = V, R = diag(S). W0 is not compensated.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import check
from .lora import LoRASBLinear


def _layers(model: nn.Module) -> dict[str, LoRASBLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRASBLinear)}


def initialize(model: nn.Module, batches, *, total_steps: int, lr: float | None = None,
               warmup_ratio: float | None = None, n_init: int | None = None,
               seed: int = 0) -> dict[str, float]:
    """Initialise every LoRA-SB layer of ``model`` from ``batches`` (dicts of model inputs
    with ``labels``). Defaults come from the model's ``fastft.LoRASB`` config.
    Returns {layer path: the largest singular value kept}.
    """
    layers = _layers(model)
    check(bool(layers), "the model has no LoRA-SB layers: prepare it with fastft.LoRASB()")
    method = getattr(getattr(model, "_fastft", None), "method", None)
    lr = lr if lr is not None else getattr(method, "lr", 1e-4)
    warmup_ratio = warmup_ratio if warmup_ratio is not None else getattr(method, "warmup_ratio",
                                                                         0.02)
    n_init = n_init if n_init is not None else getattr(method, "n_init", 50)
    check(total_steps >= 1, f"total_steps must be >= 1; got {total_steps}")
    check(warmup_ratio >= 0, f"warmup_ratio must be >= 0; got {warmup_ratio}")
    # the update of the warm-up steps; a run without warm-up counts one step
    lr_eff = lr / (warmup_ratio * total_steps if warmup_ratio > 0 else 1.0)
    for layer in layers.values():
        r = layer.r
        check(r <= min(layer.in_features, layer.out_features),
              f"LoRA-SB rank {r} exceeds the layer's smaller side "
              f"({layer.in_features} x {layer.out_features}): use a smaller r (fastft train: "
              "--lora-r)")
        layer.base_layer.weight.requires_grad_(True)
        layer.base_layer.weight.grad = None
        layer.disabled = True  # plain nn.Linear: autograd forms the weight gradient
    was_training = model.training
    model.train()
    seen = 0
    try:
        for batch in batches:
            if seen >= n_init:
                break
            size = next(iter(batch.values())).shape[0]
            take = min(size, n_init - seen)
            part = {k: v[:take] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            check("labels" in part, "LoRA-SB initialisation needs batches with labels")
            loss = model(**part).loss
            (loss / take).backward()
            seen += take
        check(seen > 0, "LoRA-SB initialisation got no batches")
        top = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for path, layer in layers.items():
                w = layer.base_layer.weight
                g = w.grad
                check(g is not None, f"{path}: no gradient reached this layer during "
                      "initialisation (is it used by the forward pass?)")
                dw_t = -lr_eff * torch.sign(g.float())
                dw_t = dw_t if layer.fan_in_fan_out else dw_t.t()  # [in, out] (Conv1D stores it so)
                u, s, v = torch.svd_lowrank(dw_t, q=layer.r, niter=10)
                with torch.no_grad():
                    layer.lora_A.copy_(u.t().to(layer.lora_A.dtype))
                    layer.lora_B.copy_(v.to(layer.lora_B.dtype))
                    layer.lora_R.copy_(torch.diag(s).to(layer.lora_R.dtype))
                top[path] = float(s[0])
                layer.initialized = True
    finally:
        for layer in layers.values():
            layer.base_layer.weight.grad = None
            layer.base_layer.weight.requires_grad_(False)
            layer.disabled = False
        model.train(was_training)
    return top
