"""Bench suite ``quant``: RoSTE's transform and fused rotate + fake-quant.

op ``hadamard`` (params: rows, n): the normalised transform over the last dim.
Providers: ``fastft`` (the op's default backend here: Triton or CUDA on a GPU,
C++ on the CPU), ``torch`` (the op's chunked torch path, FASTFT_BACKEND=torch),
``dense`` (x @ H^T with the explicit n x n matrix: what a user without a fast
transform writes) and ``copy`` (a copy of the same bytes: the bandwidth floor).

op ``rotate_fake_quant`` (params: rows, n, bits): q(H x) per token, 4-bit
asymmetric. Providers: ``fastft`` (the fused op: one read of x, one write),
``unfused`` (the plain torch composition: the transform, then the quantizer's
amax/amin/round/clamp over the whole tensor) and ``copy``.

``bytes_moved`` = one read and one write of x; ``gbps`` the achieved bandwidth,
compared with ``copy``'s by the GPU targets (benches/gpu_targets.py).

op ``train_step`` (params: a Llama-shaped model, batch x seq): one full
fine-tuning step (forward, fused loss, backward, AdamW) of ``fastft`` (RoSTE,
W4A4KV4, all rotations) against ``plain`` (the same model without RoSTE), in bf16 on CUDA
(Llama-3-8B widths, 2 layers) and fp32 on the CPU (hidden 256, 2 layers).
"""

from __future__ import annotations

import contextlib
import math
import os
from functools import partial

import torch

from fastft.ops.fake_quant import fake_quant_act, quantize_rows
from fastft.ops.hadamard import hadamard, transform_f32
from fastft.reference.quant import hadamard_matrix

from ..harness import Case
from ._common import DTYPES

DENSE_LIMIT_CPU = 4096  # above it the dense matmul takes minutes on a CPU


@contextlib.contextmanager
def _backend(name: str | None):
    old = os.environ.get("FASTFT_BACKEND")
    if name is not None:
        os.environ["FASTFT_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTFT_BACKEND", None)
        else:
            os.environ["FASTFT_BACKEND"] = old


def _shapes(device: str, quick: bool):
    if device == "cuda":
        return [dict(rows=8192, n=n) for n in (4096, 8192, 14336)], "bf16"
    if quick:
        return [dict(rows=256, n=1024)], "fp32"
    return [dict(rows=2048, n=n) for n in (1024, 4096, 14336)], "fp32"


def unfused(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The plain composition: the whole tensor transformed, then quantized op by op."""
    y = transform_f32(x, 1.0 / math.sqrt(x.shape[1]), False)
    return quantize_rows(y, bits, False, 1.0).to(x.dtype)


def _build(op, provider, rows, n, dtype, device, bits=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=g).to(device, DTYPES[dtype])
    if provider == "copy":
        out = torch.empty_like(x)

        def run():
            out.copy_(x)
    elif provider == "dense":
        m = (hadamard_matrix(n) / math.sqrt(n)).to(device, DTYPES[dtype])

        def run():
            return x @ m.t()
    elif op == "hadamard":
        backend = "torch" if provider == "torch" else None

        def run():
            with _backend(backend):
                return hadamard(x)
    elif provider == "unfused":
        def run():
            return unfused(x, bits)
    else:
        def run():
            return fake_quant_act(x, bits, False, 1.0, rotate=True)
    run.metrics = dict(bytes_moved=2 * x.numel() * x.element_size())
    return run


def _step_shape(device: str, quick: bool) -> dict:
    if device == "cuda":
        return dict(hidden=4096, intermediate=14336, layers=2, heads=32, batch=4, seq=1024)
    if quick:
        return dict(hidden=64, intermediate=128, layers=1, heads=4, batch=2, seq=32)
    return dict(hidden=256, intermediate=512, layers=2, heads=4, batch=4, seq=256)


def _build_step(provider, hidden, intermediate, layers, heads, batch, seq, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastft

    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=seq)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device, DTYPES[dtype])
    method = fastft.RoSTE(w_bits=4, a_bits=4, kv_bits=4, rotations="all") \
        if provider == "fastft" else fastft.Full()
    fastft.prepare(model, method)
    model.train()
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def cases(device: str, quick: bool = False) -> list[Case]:
    shapes, dtype = _shapes(device, quick)
    out = []
    for s in shapes:
        for provider in ("fastft", "torch", "dense", "copy"):
            too_big = device == "cpu" and provider == "dense" and s["n"] > DENSE_LIMIT_CPU
            out.append(Case(op="hadamard", provider=provider, params=s, dtype=dtype,
                            build=partial(_build, "hadamard", provider, **s, dtype=dtype,
                                          device=device),
                            available=(lambda: f"dense n > {DENSE_LIMIT_CPU} on a CPU")
                            if too_big else (lambda: None)))
        for provider in ("fastft", "unfused", "copy"):
            p = dict(s, bits=4)
            out.append(Case(op="rotate_fake_quant", provider=provider, params=p, dtype=dtype,
                            build=partial(_build, "rotate_fake_quant", provider, **p,
                                          dtype=dtype, device=device)))
    step = _step_shape(device, quick)
    for provider in ("fastft", "plain"):
        out.append(Case(op="train_step", provider=provider, params=step, dtype=dtype,
                        build=partial(_build_step, provider, **step, dtype=dtype,
                                      device=device)))
    return out
