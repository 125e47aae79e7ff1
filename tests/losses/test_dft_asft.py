"""fastft.losses.dft and asft against fastft.reference, on every backend this machine runs."""

import pytest
import torch

import fastft
from fastft.reference import losses as ref

from ..helpers import RTOL, assert_close, check_pair, grads_of, head_inputs

pytestmark = pytest.mark.interpreter
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ref_like(h, scale=0.3, seed=7):
    g = torch.Generator().manual_seed(seed)
    return (h.detach().float() + scale * torch.randn(h.shape, generator=g).to(h.device)).to(h.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,V", [(37, 24, 1000), (1, 16, 77), (67, 8, 5003)])
def test_dft_matches_reference(backend, device, dtype, T, H, V):
    h, w, y = head_inputs(T, H, V, dtype, ignore_every=4, device=device)
    check_pair(fastft.losses.dft, ref.dft, h, w, RTOL[dtype], y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,V", [(37, 24, 1000), (1, 16, 77), (67, 8, 5003)])
def test_asft_matches_reference_with_shared_head(backend, device, dtype, T, H, V):
    h, w, y = head_inputs(T, H, V, dtype, ignore_every=4, device=device)
    check_pair(fastft.losses.asft, ref.asft, h, w, RTOL[dtype], y, ref_hidden=ref_like(h))


@pytest.mark.parametrize("kw", [
    dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.1, z_loss=1e-3),
    dict(softcap=3.0, temperature=0.7), dict(kl_coef=1.0, reduction="none", softcap=5.0),
], ids=str)
def test_asft_options_and_own_reference_head(backend, device, kw):
    h, w, y = head_inputs(29, 16, 531, ignore_every=3, seed=1, device=device)
    ref_w = (w.detach() + 0.05 * torch.randn_like(w)).requires_grad_()
    rh = ref_like(h).requires_grad_()
    out, _, _ = check_pair(fastft.losses.asft, ref.asft, h, w, 1e-5, y, ref_hidden=rh,
                           ref_weight=ref_w, **kw)
    # the reference side gets no gradient
    out = fastft.losses.asft(h, w, y, ref_hidden=rh, ref_weight=ref_w, **kw)
    total = out.sum() if out.dim() else out
    g_rh, g_rw = torch.autograd.grad(total, (rh, ref_w), allow_unused=True)
    assert g_rh is None and g_rw is None


def test_asft_kl_is_zero_when_reference_equals_policy(backend, device):
    h, w, y = head_inputs(20, 16, 300, device=device)
    with torch.no_grad():
        a = fastft.losses.asft(h, w, y, ref_hidden=h.detach(), kl_coef=3.0, reduction="none")
        d = fastft.losses.dft(h, w, y, reduction="none")
    assert_close(a, d, 1e-5)


@pytest.mark.parametrize("name", ["cross_entropy", "dft", "asft"])
def test_all_rows_masked_and_one_row(backend, device, name):
    h, w, y = head_inputs(6, 8, 50, device=device)
    y[:] = -100
    kw = dict(ref_hidden=ref_like(h)) if name == "asft" else {}
    out = getattr(fastft.losses, name)(h, w, y, **kw)
    gh, gw = grads_of(out, (h, w))
    assert out.item() == 0 and not gh.any() and not gw.any()


@pytest.mark.parametrize("name", ["cross_entropy", "dft", "asft"])
def test_gradient_accumulation(backend, device, name):
    h, w, y = head_inputs(40, 16, 211, ignore_every=3, seed=3, device=device)
    fn = getattr(fastft.losses, name)
    rh = ref_like(h)
    kw = (lambda a, b: dict(ref_hidden=rh[a:b])) if name == "asft" else (lambda a, b: {})
    full = fn(h, w, y, **kw(0, 40))
    gh, gw = grads_of(full, (h, w), torch.ones_like(full))
    n = (y != -100).sum()
    acc_h, acc_w, total = torch.zeros_like(h), torch.zeros_like(w), 0.0
    for a, b in ((0, 17), (17, 40)):
        part = fn(h[a:b], w, y[a:b], num_items_in_batch=n, **kw(a, b))
        ph, pw = grads_of(part, (h, w), torch.ones_like(part))
        acc_h, acc_w, total = acc_h + ph, acc_w + pw, total + part
    assert_close(total, full, 1e-5, "loss")
    assert_close(acc_h, gh, 1e-5, "grad_hidden")
    assert_close(acc_w, gw, 1e-5, "grad_weight")
