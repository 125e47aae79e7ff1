"""fastft.losses.cross_entropy against fastft.reference, on every CPU-runnable backend."""

import pytest
import torch

import fastft
from fastft.reference import losses as ref

from ..helpers import RTOL, assert_close, check_pair, grads_of, head_inputs

make = head_inputs
grads = grads_of


def check(h, w, y, rtol, **kw):
    return check_pair(fastft.losses.cross_entropy, ref.cross_entropy, h, w, rtol, y, **kw)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,H,V", [(37, 24, 1000), (1, 16, 77), (67, 8, 5003)])
def test_matches_reference_odd_shapes(backend, device, dtype, T, H, V):
    h, w, y = make(T, H, V, dtype, ignore_every=4, device=device)
    check(h, w, y, RTOL[dtype])


@pytest.mark.interpreter
@pytest.mark.parametrize("kw", [
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=4.0),
    dict(temperature=0.7),
    dict(softcap=2.5, temperature=1.3, label_smoothing=0.2, z_loss=1e-2),
    dict(reduction="none", label_smoothing=0.1, softcap=3.0),
], ids=str)
def test_options_match_reference(backend, device, kw):
    h, w, y = make(29, 16, 531, ignore_every=3, seed=1, device=device)
    check(h, w, y, RTOL[torch.float32], **kw)


@pytest.mark.interpreter
def test_row_weights_and_leading_dims(backend, device):
    h, w, y = make(0, 16, 300, lead=(3, 7), seed=2, device=device)
    y[0, :2] = -100
    weights = torch.rand(3, 7, device=device)
    check(h, w, y, 1e-5, weights=weights)
    check(h, w, y, 1e-5, weights=weights, reduction="none")


@pytest.mark.interpreter
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_not_nan(backend, device, reduction):
    h, w, y = make(9, 16, 100, device=device)
    y[:] = -100
    out = fastft.losses.cross_entropy(h, w, y, reduction=reduction)
    gh, gw = grads(out, (h, w))
    assert torch.all(out == 0)
    assert torch.all(gh == 0) and torch.all(gw == 0)


@pytest.mark.interpreter
def test_gradient_accumulation_equals_full_batch(backend, device):
    h, w, y = make(40, 16, 211, ignore_every=3, seed=3, device=device)
    full = fastft.losses.cross_entropy(h, w, y)
    gh, gw = grads(full, (h, w), torch.ones_like(full))
    n = (y != -100).sum()
    parts = [fastft.losses.cross_entropy(h[a:b], w, y[a:b], num_items_in_batch=n)
             for a, b in ((0, 17), (17, 40))]
    acc_h, acc_w = torch.zeros_like(h), torch.zeros_like(w)
    for p in parts:
        ph, pw = grads(p, (h, w), torch.ones_like(p))
        acc_h += ph
        acc_w += pw
    assert_close(sum(parts), full, 1e-5, "loss")
    assert_close(acc_h, gh, 1e-5, "grad_hidden")
    assert_close(acc_w, gw, 1e-5, "grad_weight")


@pytest.mark.interpreter
def test_chunking_does_not_change_the_result(backend, device, monkeypatch):
    h, w, y = make(50, 16, 300, ignore_every=5, seed=4, device=device)
    whole = check(h, w, y, 1e-5)
    monkeypatch.setenv("FASTFT_LOSS_CHUNK", "7")
    parts = check(h, w, y, 1e-5)
    for a, b in zip(whole, parts):
        assert_close(b, a, 1e-5)


def test_stride_zero_upstream_gradient(backend, device):
    h, w, y = make(11, 8, 50, device=device)
    out = fastft.losses.cross_entropy(h, w, y, reduction="none")
    gh, gw = torch.autograd.grad(out.sum(), (h, w))  # upstream: an expanded stride-0 tensor
    eh, ew = torch.autograd.grad(ref.cross_entropy(h, w, y, reduction="none").sum(), (h, w))
    assert_close(gh, eh, 1e-5)
    assert_close(gw, ew, 1e-5)


def test_frozen_weight_and_no_grad(backend, device):
    h, w, y = make(13, 8, 64, device=device)
    w.requires_grad_(False)
    out = fastft.losses.cross_entropy(h, w, y)
    (gh,) = torch.autograd.grad(out, (h,))
    (eh,) = torch.autograd.grad(ref.cross_entropy(h, w, y), (h,))
    assert_close(gh, eh, 1e-5)
    with torch.no_grad():
        val = fastft.losses.cross_entropy(h, w, y)
    assert val.grad_fn is None
    assert_close(val, out.detach(), 1e-6)


def test_reference_backend_is_the_reference(device, monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "reference")
    h, w, y = make(10, 8, 40, ignore_every=3, device=device)
    out = fastft.losses.cross_entropy(h, w, y, label_smoothing=0.1)
    assert torch.equal(out, ref.cross_entropy(h, w, y, label_smoothing=0.1))


@pytest.mark.interpreter
def test_out_of_range_label_poisons_its_row(backend, device):
    """Past the range check (skipped on CUDA without FASTFT_DEBUG), a bad label gives NaN."""
    h, w, y = make(6, 8, 40, device=device)
    y[2] = 40
    out = torch.ops.fastft.linear_cross_entropy(
        h.reshape(-1, 8), w, y, None, torch.ones((), device=device), -100, 0.0, 0.0, 0.0, 1.0,
        False, None, None, 0.0, True, True)
    rows, gh, _ = out
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4, 5]]).all()
    assert torch.isnan(gh[2]).all() and torch.isfinite(gh[[0, 1, 3, 4, 5]]).all()
