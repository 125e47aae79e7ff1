"""Bench suite ``losses``: the fused loss head against the reference (and Liger on CUDA).

Every case is a forward and backward of the loss from hidden states. "train
head" also computes the head's gradient (full fine-tuning); "frozen head" does
not (LoRA and other adapters).
"""

from __future__ import annotations

from functools import partial

import fastft
from fastft.reference import losses as ref

from ..harness import Case
from ._common import backward_and_clear, head_inputs, needs_cuda, peer


def _shapes(device: str, quick: bool):
    if device == "cuda":
        return [dict(T=8192, H=4096, V=128256)], "bf16"
    if quick:
        return [dict(T=512, H=128, V=8192)], "fp32"
    return [dict(T=4096, H=512, V=32768)], "fp32"


def _ce(provider, T, H, V, dtype, device, train_head):
    h, w, y = head_inputs(T, H, V, dtype, device, train_head=train_head)
    if provider == "fastft":
        return lambda: backward_and_clear(fastft.losses.cross_entropy(h, w, y), h, w)
    if provider == "reference":
        return lambda: backward_and_clear(ref.cross_entropy(h, w, y), h, w)
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    fn = LigerFusedLinearCrossEntropyLoss()
    return lambda: backward_and_clear(fn(w, h, y), h, w)


def cases(device: str, quick: bool = False) -> list[Case]:
    shapes, dtype = _shapes(device, quick)
    heads = (True, False) if device == "cuda" else (True,)
    out = []
    for s in shapes:
        for train_head in heads:
            params = dict(s, head="train" if train_head else "frozen")
            for provider in ("fastft", "reference", "liger"):
                avail = (lambda: needs_cuda(device) or peer("liger_kernel")) \
                    if provider == "liger" else (lambda: None)
                out.append(Case(
                    op="cross_entropy", provider=provider, params=params, dtype=dtype,
                    build=partial(_ce, provider, s["T"], s["H"], s["V"], dtype, device,
                                  train_head),
                    available=avail))
    return out
