"""Bench suite ``lora``: a LoRA linear, forward and backward (dX, dA, dB), per implementation.

Providers: ``fastft`` (the fused kernels), ``reference`` (the plain composition
PEFT computes: base linear, then A, then B, then an add), ``addmm`` (the base GEMM,
then the adapter's product added into its output by one ``addmm`` with alpha = s:
cuBLAS with no extra add, as Unsloth composes it), ``peft`` (PEFT's own LoRA layer,
where installed) and ``frozen_base`` (the two GEMMs of the frozen layer alone,
y = x W0^T and dX = dY W0: the floor a fused LoRA can approach). CUDA shapes are
Llama-3-8B's: q/o (4096 -> 4096), k/v (4096 -> 1024), MLP up and down.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fastft.methods.lora import LoRALinear
from fastft.reference import lora as ref

from ..harness import Case
from ._common import DTYPES, peer


def _shapes(device: str, quick: bool):
    if device == "cuda":  # Llama-3-8B: attention, MLP up, MLP down
        return [dict(T=8192, n_in=i, n_out=o, r=r) for i, o in
                ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
                for r in (16, 64)], "bf16"
    if quick:
        return [dict(T=256, n_in=256, n_out=256, r=16)], "fp32"
    return [dict(T=1024, n_in=1024, n_out=1024, r=16), dict(T=1024, n_in=1024, n_out=2816, r=64)], \
        "fp32"


def addmm_lora(x, weight, lora_a, lora_b, scale: float):
    """x W0^T + s (x A^T) B^T as cuBLAS composes it: the base GEMM, then one addmm that adds
    the adapter's product into it (alpha = s), autograd through both."""
    return torch.addmm(F.linear(x, weight), x @ lora_a.t().to(x.dtype),
                       lora_b.t().to(x.dtype), alpha=scale)


def _build(provider, T, n_in, n_out, r, dtype, device):
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    x = torch.randn(T, n_in, generator=g).to(device, dt).requires_grad_()
    dy = torch.randn(T, n_out, generator=g).to(device, dt)
    base = nn.Linear(n_in, n_out, bias=False).to(device, dt).requires_grad_(False)
    layer = LoRALinear(base, r, alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02, generator=None)
    params = [x, layer.lora_A, layer.lora_B]

    def clear():
        for p in params:
            p.grad = None

    if provider == "fastft":
        def run():
            layer(x).backward(dy)
            clear()
    elif provider == "reference":
        def run():
            ref.lora_linear(x, base.weight, None, layer.lora_A, layer.lora_B, None,
                            layer.scaling).backward(dy)
            clear()
    elif provider == "addmm":
        def run():
            addmm_lora(x, base.weight, layer.lora_A, layer.lora_B, layer.scaling).backward(dy)
            clear()
    elif provider == "frozen_base":
        def run():
            F.linear(x, base.weight).backward(dy)
            clear()
    else:
        import peft

        holder = nn.Sequential()
        holder.add_module("lin", base)
        model = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=2 * r,
                                                            target_modules=["lin"]))
        lin = model.base_model.model.lin
        with torch.no_grad():
            lin.lora_A["default"].weight.copy_(layer.lora_A)
            lin.lora_B["default"].weight.copy_(layer.lora_B)
        params = [x, lin.lora_A["default"].weight, lin.lora_B["default"].weight]

        def run():
            lin(x).backward(dy)
            clear()
    return run


def cases(device: str, quick: bool = False) -> list[Case]:
    shapes, dtype = _shapes(device, quick)
    out = []
    for s in shapes:
        for provider in ("fastft", "reference", "addmm", "peft", "frozen_base"):
            out.append(Case(op="lora_linear", provider=provider, params=s, dtype=dtype,
                            build=partial(_build, provider, **s, dtype=dtype, device=device),
                            available=(lambda: peer("peft")) if provider == "peft"
                            else (lambda: None)))
    return out
