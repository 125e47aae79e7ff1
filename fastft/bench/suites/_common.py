"""Input builders shared by the bench suites."""

from __future__ import annotations

import importlib.util

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def head_inputs(T, H, V, dtype, device, *, train_head=True, seed=0):
    """Hidden states [T, H] (requires grad), a head [V, H], and labels [T] with 10% ignored."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    h = torch.randn(T, H, generator=g).to(device=device, dtype=dt).requires_grad_()
    w = (torch.randn(V, H, generator=g) * H**-0.5).to(device=device, dtype=dt)
    w.requires_grad_(train_head)
    y = torch.randint(0, V, (T,), generator=g)
    y[torch.rand(T, generator=g) < 0.1] = -100
    return h, w, y.to(device)


def backward_and_clear(loss, *tensors):
    loss.backward()
    for t in tensors:
        t.grad = None


def peer(module: str):
    """None if the peer package can be imported, else why not (for Case.available)."""
    return None if importlib.util.find_spec(module) else f"{module} is not installed"


def needs_cuda(device: str):
    return None if device == "cuda" else "runs on CUDA only"
