"""Bench suite ``sparse``: the SparseAdamW step against dense AdamW, and optimizer state per method.

op ``sparse_adamw_step`` (params: model, density): one optimizer step over the
linear weights of a Llama-shaped model (CPU: H 1024, I 2816, 4 layers, fp32;
CUDA: two Llama-3-8B layers, bf16), masks drawn at random at the density.
Providers:

- ``fastft``: SparseAdamW as the trainer runs it (hooks on: the compact fp32
  gradients are already gathered), on the device's backend (C++ on CPU,
  Triton on CUDA);
- ``fastft_dense_grad``: SparseAdamW gathering from the dense ``.grad``;
- ``torch_path``: the hook-mode step through the op's torch path;
- ``dense_adamw``: torch.optim.AdamW (fused) over every entry, dense gradients;
- ``copy``: a plain tensor copy moving as many bytes as ``fastft``'s step (half
  read, half written): the bandwidth this device reaches on a copy of that size.

``bytes_moved`` is the traffic the DRAM really moves in a step: per trained entry, its
index and m, v (read and written: compact arrays, read in order) and its compact fp32
gradient, or, gathering from ``.grad``, each 64-byte segment of the dense gradient that
holds a trained entry; per 64-byte segment of the weight that holds a trained entry, the
segment read and written. 64 bytes is what a DRAM access moves (an HBM burst, a CPU cache
line): at 5% random density a bf16 weight has 32 entries per segment, so 1 - 0.95^32 = 81%
of its segments are touched and the step moves most of the weight, not 5% of it.
``sector_bytes`` is the same count on 32-byte sectors (the L2's granularity) and
``useful_bytes`` the entries' own bytes only. ``gbps`` = bytes_moved / time; the GPU
target compares it with ``copy``'s.

op ``optimizer_state`` (params: model, dtype; CPU runs only, as it does not
depend on the device): bytes of optimizer state after a step, per method, over
the linear weights (the output head frozen): a real tiny Llama (allocated and
measured) and Llama-3-8B on the meta device (dense AdamW's state measured by
torch's AdamW on meta tensors; the sparse methods' by ``state_bytes_for``,
which the tests check against real optimizers).
``ratio_to_dense`` divides by dense AdamW's state over the same weights.
"""

from __future__ import annotations

import os
from functools import partial

import torch
from torch import nn

from ...optim import SparseAdamW, state_bytes_for
from ..harness import Case
from ._common import DTYPES

DENSITIES = (0.01, 0.05, 0.5)
SECTOR = 32  # bytes: an L2 transaction
SEGMENT = 64  # bytes: a DRAM access (HBM burst, CPU cache line)
STEP_PROVIDERS = ("fastft", "fastft_dense_grad", "torch_path", "dense_adamw", "copy")
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=1024)


def layer_shapes(hidden: int, inter: int, kv: int, layers: int) -> list[tuple[int, int]]:
    """Weight shapes of a Llama decoder's linear layers: q, k, v, o, gate, up, down."""
    one = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden),
           (inter, hidden), (hidden, inter)]
    return one * layers


def _step_setup(device: str, quick: bool):
    if device == "cuda":
        return "llama-3-8b x2 layers", layer_shapes(4096, 14336, 1024, 2), "bf16"
    if quick:
        return "llama h256 x2", layer_shapes(256, 688, 64, 2), "fp32"
    return "llama h1024 x4", layer_shapes(1024, 2816, 256, 4), "fp32"


def _tensors(shapes, density, dtype, device, seed=0):
    """Weights, dense gradients and Bernoulli(density) masks, drawn on the device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[dtype]
    params, grads, masks = [], [], []
    for s in shapes:
        params.append(nn.Parameter((torch.randn(s, generator=gen, device=device) * 0.02).to(dt)))
        grads.append((torch.randn(s, generator=gen, device=device) * 1e-3).to(dt))
        masks.append(torch.rand(s, generator=gen, device=device) < density)
    return params, grads, masks


def _segments(idx: torch.Tensor, elem: int, size: int) -> int:
    """How many ``size``-byte pieces of a tensor of ``elem``-byte entries hold an entry of
    ``idx``."""
    return int(torch.unique(idx.long() * elem // size).numel())


def step_bytes(opt: SparseAdamW, compact: bool, grad_elem: int) -> dict:
    """{bytes_moved, sector_bytes, useful_bytes, entries} of one SparseAdamW step (see the
    module doc)."""
    moved = {SEGMENT: 0, SECTOR: 0}
    useful = entries = 0
    for i, p in enumerate(opt.params):
        idx = opt.indices(i)
        k, we, ie = idx.numel(), p.element_size(), idx.element_size()
        ge = 4 if compact else grad_elem
        entries += k
        useful += k * (ie + ge + 16 + 2 * we)
        for size in moved:
            moved[size] += k * (ie + 16) + 2 * size * _segments(idx, we, size)
            moved[size] += k * 4 if compact else size * _segments(idx, ge, size)
    return dict(bytes_moved=moved[SEGMENT], sector_bytes=moved[SECTOR], useful_bytes=useful,
                entries=entries)


def _build_step(provider, shapes, density, dtype, device):
    params, grads, masks = _tensors(shapes, density, dtype, device)
    numel = sum(p.numel() for p in params)
    if provider == "dense_adamw":
        for p, g in zip(params, grads):
            p.grad = g
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        per = 7 * params[0].element_size()  # w, m, v read and written, g read (state: w's dtype)
        fn = lambda: opt.step()  # noqa: E731
        fn.metrics = dict(bytes_moved=numel * per, sector_bytes=numel * per,
                          useful_bytes=numel * per, entries=numel)
        return fn
    opt = SparseAdamW(params, masks, lr=1e-4)
    compact = provider != "fastft_dense_grad"
    if compact:
        opt.attach_hooks()
        torch.autograd.backward(params, grads)  # the hooks gather and free the dense gradients
    else:
        for p, g in zip(params, grads):
            p.grad = g
    del grads
    metrics = step_bytes(opt, compact, params[0].element_size())
    if provider == "copy":
        n = metrics["bytes_moved"] // 8  # fp32 elements read, and as many written
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        del opt, params
        fn = lambda: dst.copy_(src)  # noqa: E731
    elif provider == "torch_path":
        def fn():
            old = os.environ.get("FASTFT_BACKEND")
            os.environ["FASTFT_BACKEND"] = "torch"
            try:
                opt.step()
            finally:
                if old is None:
                    del os.environ["FASTFT_BACKEND"]
                else:
                    os.environ["FASTFT_BACKEND"] = old
    else:
        fn = lambda: opt.step()  # noqa: E731
    fn.metrics = dict(metrics, n_params=numel)
    return fn


# ---- optimizer state per method ---------------------------------------------------------

def _llama(config: dict, dtype: torch.dtype, meta: bool):
    import transformers

    cfg = transformers.LlamaConfig(**config, tie_word_embeddings=False)
    with torch.device("meta" if meta else "cpu"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype)


def _adamw_state_bytes(params) -> int:
    """State of torch's AdamW over ``params`` after one step (runs on meta tensors too)."""
    params = list(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    opt.step()
    total = sum(t.nbytes for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor))
    for p in params:
        p.grad = None
    return total


def state_table(model_name: str, dtype: str, only=None) -> dict[str, int]:
    """{method: optimizer state bytes} for ``model_name`` ("tiny-llama" real, "llama-3-8b"
    meta) with weights in ``dtype``; ``only``: the methods to compute (dense_adamw always)."""
    import fastft
    from fastft.methods import lift as lift_mod
    from fastft.methods.targets import linear_modules
    from fastft.optim import random_mask

    want = set(STATE_PROVIDERS if only is None else only)
    meta = model_name == "llama-3-8b"
    model = _llama(LLAMA3_8B if meta else TINY, DTYPES[dtype], meta)
    weights = [m.weight for m in linear_modules(model).values()]
    for p in model.parameters():
        p.requires_grad_(False)
    out = {"dense_adamw": _adamw_state_bytes(w.requires_grad_(True) for w in weights)}
    out["ltsft_full"] = out["dense_adamw"]  # phase 1 is dense AdamW over the same weights
    total = sum(w.numel() for w in weights)
    gen = torch.Generator().manual_seed(0)
    if "sparse_adamw_5pct" in want:
        out["sparse_adamw_5pct"] = sum(state_bytes_for(w.numel(), round(0.05 * w.numel()))
                                       for w in weights) if meta else SparseAdamW(
            weights, (random_mask(w.shape, 0.05, generator=gen) for w in weights)).state_bytes()
    if "ltsft_sparse" in want:  # K = 1% of all maskable entries, global
        out["ltsft_sparse"] = state_bytes_for(max(w.numel() for w in weights),
                                              round(0.01 * total))
    if "lift" in want:  # the defaults on Llama-3-8B; rank 8 on the tiny model
        if meta:
            out["lift"] = sum(state_bytes_for(w.numel(), lift_mod.budget(w.shape, 128))
                              for w in weights)
        else:
            method = fastft.LIFT(lora_rank=8, filter_rank=8, fast_svd=True)
            method.prepare_model(model)
            out["lift"] = method.make_optimizer(model, lr=1e-4).state_bytes()
    if "hft_stage0" in want:  # AdamW state of the half trained in the first stage
        fastft.HFT().prepare_model(model)
        out["hft_stage0"] = _adamw_state_bytes(p for p in model.parameters() if p.requires_grad)
    return out


def _build_state(model_name, dtype, provider):
    table = state_table(model_name, dtype, only={provider})
    fn = lambda: None  # noqa: E731  (nothing to time: the row carries the computed bytes)
    fn.metrics = dict(state_bytes=table[provider],
                      ratio_to_dense=round(table[provider] / table["dense_adamw"], 4))
    return fn


STATE_PROVIDERS = ("dense_adamw", "sparse_adamw_5pct", "lift", "hft_stage0", "ltsft_full",
                   "ltsft_sparse")


def cases(device: str, quick: bool = False) -> list[Case]:
    name, shapes, dtype = _step_setup(device, quick)
    out = []
    for density in DENSITIES:
        params = dict(model=name, density=density)
        for provider in STEP_PROVIDERS:
            out.append(Case(op="sparse_adamw_step", provider=provider, params=params,
                            dtype=dtype, build=partial(_build_step, provider, shapes, density,
                                                       dtype, device)))
    # optimizer state does not depend on the device: computed in the CPU run only
    models = [] if device != "cpu" else [("tiny-llama", "fp32")] if quick else \
        [("tiny-llama", "fp32"), ("llama-3-8b", "fp32"), ("llama-3-8b", "bf16")]
    for model_name, dt in models:
        for provider in STATE_PROVIDERS:
            out.append(Case(op="optimizer_state", provider=provider,
                            params=dict(model=model_name), dtype=dt,
                            build=partial(_build_state, model_name, dt, provider)))
    return out
