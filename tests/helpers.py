"""Comparison helpers shared by the tests."""

import torch


def assert_close(actual, expected, rtol, name=""):
    """Elementwise closeness, with atol scaled to the largest reference magnitude.

    The floor of atol is the smallest step of the compared dtype (fp16 gradients
    of 1e-6 live among its subnormals, 6e-8 apart).
    """
    fi = torch.finfo(actual.dtype) if actual.is_floating_point() else torch.finfo(torch.float32)
    floor = fi.smallest_normal * fi.eps
    expected = expected.float()
    actual = actual.float()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=max(rtol * scale, floor),
                               msg=lambda m: f"{name}: {m}")


RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def head_inputs(T, H, V, dtype=torch.float32, ignore_every=0, seed=0, lead=None, device="cpu"):
    """hidden [*lead or T, H] and head [V, H] requiring grad, labels with every n-th ignored."""
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (T,)
    h = torch.randn(*shape, H, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, shape, generator=g)
    if ignore_every:
        y.view(-1)[::ignore_every] = -100
    return h, w, y.to(device)


def grads_of(loss, inputs, upstream=None):
    """Gradients of loss (or of upstream . loss for a non-scalar loss) w.r.t. inputs."""
    if upstream is None:
        upstream = torch.randn_like(loss) if loss.dim() else torch.full_like(loss, 1.3)
    return torch.autograd.grad(loss, inputs, upstream)


def check_pair(fn, ref_fn, h, w, rtol, *args, **kw):
    """fn and ref_fn agree on the loss and on grad_hidden and grad_weight; returns fn's.

    The reference runs on float32 copies of half-precision inputs, its gradients rounded
    to the inputs' dtype: the fused ops accumulate in float32, and a reference computed
    in half precision is itself off by more than the tolerance where gradients are tiny
    (cuBLAS's fp16 products of DFT's gradients near fp16's subnormals, for one).
    """
    out = fn(h, w, *args, **kw)
    h32, w32, args32, kw32 = h, w, args, kw
    if h.dtype in (torch.float16, torch.bfloat16):
        def up(x):
            return x.detach().float() if torch.is_tensor(x) and x.dtype == h.dtype else x

        h32, w32 = (t.detach().float().requires_grad_() for t in (h, w))
        args32, kw32 = [up(a) for a in args], {k: up(v) for k, v in kw.items()}
    expect = ref_fn(h32, w32, *args32, **kw32)
    up = torch.randn_like(out) if out.dim() else torch.full_like(out, 1.3)
    gh, gw = grads_of(out, (h, w), up)
    eh, ew = (g.to(t.dtype) for g, t in zip(grads_of(expect, (h32, w32), up), (h, w)))
    assert out.dtype == torch.float32 and out.shape == expect.shape
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    assert_close(out, expect, rtol, "loss")
    assert_close(gh, eh, rtol, "grad_hidden")
    assert_close(gw, ew, rtol, "grad_weight")
    return out, gh, gw


def compiled_rows(tmp_path, name, script):
    """Run ``script`` (a file: @triton.jit needs its source in one) in a fresh process with
    the real JIT (no TRITON_INTERPRET), and return the JSON its last line prints."""
    import json
    import os
    import subprocess
    import sys

    path = tmp_path / name
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
