"""Bench suite ``losses``: the fused loss head against the reference, TRL and Liger (CUDA).

Every case is a forward and backward of one loss from hidden states. "train"
head also computes the head's gradient (full fine-tuning); "frozen" does not
(LoRA and other adapters). The reference materialises the [T, V] logits (ASFT
also the reference model's; OTR samples with torch.multinomial), with its GEMM
in the inputs' dtype and fp32 logits after it, as a Hugging Face model and its
loss compute them.

Peers, where they compute the same quantity: ``liger`` (CUDA only: fused linear
cross-entropy, DFT, GRPO; for cross-entropy also ``liger-fp32acc``, its head gradient
accumulated in fp32 as fastft's is, so that memory is compared at equal precision), ``torch`` (cross-entropy: torch's own chunked
``torch.nn.functional.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``, its
chunking and accumulation chosen by torch per device and dtype) and ``trl`` (TRL's chunked LM head,
``trl.kernels.ChunkedLogProbFunction``, reached through ``add_fused_lm_head`` as
TRL's trainers reach it): cross-entropy as SFTTrainer forms it, the sum of
-log p of the labels divided by the labelled tokens (log-probs only: SFTTrainer
also asks the head for entropy and top-1 flags, which the ``step`` suite measures),
and GRPO as GRPOTrainer's ``_compute_loss`` forms it (log-probs and entropy from
the head, then its clipped loss and KL in PyTorch).

On CUDA with the head trained, ``fastft-1024rows`` is fastft with FASTFT_LOSS_CHUNK=1024
(larger logits chunks; the default keeps a chunk near the size of the hidden states, and
the head-gradient GEMM runs over 1024 rows of dz either way), and, for cross-entropy,
``fastft-bf16acc`` is fastft with FASTFT_LOSS_GRAD_W_DTYPE=bf16 (the head's gradient
accumulated in bf16, as Liger's default does: the bounded-memory option).
"""

from __future__ import annotations

import os
from functools import partial
from unittest import mock

import torch

import fastft
from fastft.reference import losses as ref

from ..harness import Case
from ._common import backward_and_clear, head_inputs, needs_cuda, peer

LOSSES = ("cross_entropy", "dft", "asft", "otr", "grpo")
PEERS = {"cross_entropy": ("liger", "liger-fp32acc", "trl", "torch"), "dft": ("liger",),
         "grpo": ("liger", "trl")}
LIGER_FP32 = "liger-fp32acc"  # Liger with accum_dtype=fp32: fastft's precision, its memory
# CUDA, head trained: fastft with 1024-row chunks, and with a bf16 head-gradient sum
BIG_CHUNKS = "fastft-1024rows"
BF16_ACC = "fastft-bf16acc"


def _shapes(device: str, quick: bool):
    if device == "cuda":
        return [dict(T=8192, H=4096, V=128256)], "bf16"
    if quick:
        return [dict(T=512, H=128, V=8192)], "fp32"
    # a long sequence at a 32k vocabulary, and a Llama-2-style vocabulary at half the tokens
    return [dict(T=4096, H=512, V=32768), dict(T=2048, H=512, V=32000)], "fp32"


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


def _trl_cross_entropy(h, w, y):
    """SFTTrainer's loss: TRL's fused head on labels already aligned with ``h`` (its
    ``shift_labels``), -sum(log p) / labelled tokens."""
    from ._trl import head_model

    model = head_model(lambda ids: h[None], w)
    ids = torch.zeros(1, h.shape[0], dtype=torch.long, device=h.device)
    labels = y[None]
    return lambda: backward_and_clear(
        model(input_ids=ids, shift_labels=labels, fused_lm_head=True).loss, h,
        model.lm_head.weight)


def _trl_grpo(hidden, w, tokens, mask, adv, old, ref_lp, *, beta):
    """GRPOTrainer's loss on a one-token prompt: position i of ``hidden`` predicts
    completion token i, as ``_compute_loss`` reads the backbone's output."""
    from ._trl import grpo_loss, head_model

    B, S, H = hidden.shape
    pad = hidden.new_zeros(B, 1, H)  # the last position predicts nothing
    model = head_model(lambda ids: torch.cat([hidden, pad], 1), w,
                       outputs=("log_probs", "entropy"))
    compute = grpo_loss(model, max_completion_length=S, beta=beta,
                        device_type=hidden.device.type)
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long, device=hidden.device),
                  prompt_mask=torch.ones(B, 1, dtype=torch.long, device=hidden.device),
                  completion_ids=tokens, completion_mask=mask.long(), advantages=adv,
                  num_items_in_batch=mask.sum(), old_per_token_logps=old,
                  ref_per_token_logps=ref_lp)
    return lambda: backward_and_clear(compute(dict(inputs)), hidden, model.lm_head.weight)


def _with_env(run, name: str, value: str):
    """``run`` with the environment variable ``name`` set to ``value`` (restored after)."""
    def timed():
        with mock.patch.dict(os.environ, {name: value}):
            run()
    return timed


def _build(loss: str, provider: str, T, H, V, dtype, device, train_head):
    if provider == BIG_CHUNKS:
        return _with_env(_build(loss, "fastft", T, H, V, dtype, device, train_head),
                         "FASTFT_LOSS_CHUNK", "1024")
    if provider == BF16_ACC:
        return _with_env(_build(loss, "fastft", T, H, V, dtype, device, train_head),
                         "FASTFT_LOSS_GRAD_W_DTYPE", "bf16")
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
        if provider == "trl":
            return _trl_grpo(hidden, w, tokens, mask, adv, old, ref_lp, beta=kw["beta"])
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
    if provider == "trl":
        return _trl_cross_entropy(h, w, y)
    if provider == "torch":  # torch's own chunked head, its options at their defaults
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda: backward_and_clear(torch.nn.functional.linear_cross_entropy(
            h, w, y, ignore_index=-100, options=opts), h, w)
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    fn = LigerFusedLinearCrossEntropyLoss(
        use_token_scaling=loss == "dft",
        accum_dtype=torch.float32 if provider == LIGER_FP32 else None)
    return lambda: backward_and_clear(fn(w, h, y), h, w)


def cases(device: str, quick: bool = False) -> list[Case]:
    shapes, dtype = _shapes(device, quick)
    out, last = [], []
    for shape, loss in ((shape, loss) for shape in shapes for loss in LOSSES):
        # the head trained and frozen (LoRA, most RL): every loss on the CPU; on CUDA, where
        # the GPU check's time is short, the two losses most runs use
        heads = ("train", "frozen") if device == "cpu" or loss in ("cross_entropy", "grpo") \
            else ("train",)
        for head in heads:
            params = dict(shape, head=head)
            for provider in ("fastft", "reference", *PEERS.get(loss, ())):
                avail = {"liger": lambda: needs_cuda(device) or peer("liger_kernel"),
                         LIGER_FP32: lambda: needs_cuda(device) or peer("liger_kernel"),
                         "trl": lambda: peer("trl"), "torch": _torch_chunked}.get(
                    provider, lambda: None)
                out.append(_case(loss, provider, params, dtype, device, avail))
            if device == "cuda" and head == "train" and loss == "cross_entropy":
                out.append(_case(loss, BF16_ACC, params, dtype, device, lambda: None))
            if device == "cuda" and head == "train" and loss in ("cross_entropy", "grpo"):
                last.append(_case(loss, BIG_CHUNKS, params, dtype, device, lambda: None))
    return out + last  # last: a GPU check cut short loses these rows first


def _torch_chunked():
    return None if hasattr(torch.nn, "LinearCrossEntropyOptions") else (
        "this torch has no chunked linear_cross_entropy (torch >= 2.13)")


def _case(loss, provider, params, dtype, device, avail) -> Case:
    return Case(op=loss, provider=provider, params=params, dtype=dtype,
                build=partial(_build, loss, provider, params["T"], params["H"], params["V"],
                              dtype, device, params["head"] == "train"),
                available=avail)

