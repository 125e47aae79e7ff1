"""Bench suite ``losses``: the fused loss head against the reference (and Liger on CUDA).

Every case is a forward and backward of one loss from hidden states. "train"
head also computes the head's gradient (full fine-tuning); "frozen" does not
(LoRA and other adapters). The reference materialises the [T, V] logits (ASFT
also the reference model's; OTR samples with torch.multinomial), with its GEMM
in the inputs' dtype and fp32 logits after it, as a Hugging Face model and its
loss compute them.
"""

from __future__ import annotations

from functools import partial

import torch

import fastft
from fastft.reference import losses as ref

from ..harness import Case
from ._common import backward_and_clear, head_inputs, needs_cuda, peer

LOSSES = ("cross_entropy", "dft", "asft", "otr", "grpo")
PEERS = {"cross_entropy": "liger", "dft": "liger", "grpo": "liger"}


def _shape(device: str, quick: bool):
    if device == "cuda":
        return dict(T=8192, H=4096, V=128256), "bf16"
    if quick:
        return dict(T=512, H=128, V=8192), "fp32"
    return dict(T=4096, H=512, V=32768), "fp32"


def _grpo_inputs(h, w, y, S=512):
    B = h.shape[0] // S
    g = torch.Generator().manual_seed(1)
    hidden = h.detach().view(B, S, -1).requires_grad_()
    tokens = y.clamp(min=0).view(B, S)
    mask = (y != -100).view(B, S).float()
    adv = torch.randn(B, generator=g).to(h.device)
    with torch.no_grad():
        old = fastft.losses.selective_logprobs(hidden, w, tokens)
    ref_lp = old + 0.05
    return hidden, tokens, mask, adv, old, ref_lp


def _plain(fn):
    """Run a reference loss as plain PyTorch would: GEMM in the inputs' dtype."""
    def run():
        with ref.gemm_in_input_dtype():
            fn()
    return run


def _build(loss: str, provider: str, T, H, V, dtype, device, train_head):
    h, w, y = head_inputs(T, H, V, dtype, device, train_head=train_head)
    ref_h = (h.detach() + 0.1 * torch.randn_like(h)) if loss == "asft" else None
    if loss == "grpo":
        hidden, tokens, mask, adv, old, ref_lp = _grpo_inputs(h, w, y)
        kw = dict(mask=mask, old_logps=old, ref_logps=ref_lp, beta=0.04)
        if provider == "fastft":
            return lambda: backward_and_clear(
                fastft.losses.grpo(hidden, w, tokens, adv, **kw)[0], hidden, w)
        if provider == "reference":
            return _plain(lambda: backward_and_clear(ref.grpo(hidden, w, tokens, adv, **kw)[0],
                                                     hidden, w))
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        fn = LigerFusedLinearGRPOLoss(beta=0.04, use_ref_model=True, loss_type="dapo")
        return lambda: backward_and_clear(
            fn(hidden, w, tokens, mask, adv, ref_per_token_logps=ref_lp,
               old_per_token_logps=old)[0], hidden, w)
    if provider == "fastft":
        extra = {"asft": dict(ref_hidden=ref_h), "otr": dict(k=8)}.get(loss, {})
        fn = getattr(fastft.losses, loss)
        return lambda: backward_and_clear(fn(h, w, y, **extra), h, w)
    if provider == "reference":
        extra = {"asft": dict(ref_hidden=ref_h), "otr": dict(samples=None, k=8)}.get(loss, {})
        fn = getattr(ref, loss)
        return _plain(lambda: backward_and_clear(fn(h, w, y, **extra), h, w))
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    fn = LigerFusedLinearCrossEntropyLoss(use_token_scaling=loss == "dft")
    return lambda: backward_and_clear(fn(w, h, y), h, w)


def cases(device: str, quick: bool = False) -> list[Case]:
    shape, dtype = _shape(device, quick)
    out = []
    for loss in LOSSES:
        heads = ("train", "frozen") if device == "cuda" and loss in ("cross_entropy", "grpo") \
            else ("train",)
        for head in heads:
            params = dict(shape, head=head)
            for provider in ("fastft", "reference", PEERS.get(loss)):
                if provider is None:
                    continue
                avail = (lambda: needs_cuda(device) or peer("liger_kernel")) \
                    if provider == "liger" else (lambda: None)
                out.append(Case(
                    op=loss, provider=provider, params=params, dtype=dtype,
                    build=partial(_build, loss, provider, shape["T"], shape["H"], shape["V"],
                                  dtype, device, head == "train"),
                    available=avail))
    return out

