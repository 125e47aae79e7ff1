"""The Triton row kernels (kernels/loss_rows.py, interpreter) against the torch rows."""

import pytest
import torch
from fastft.kernels import loss_rows

from fastft.ops import loss_rows_torch

from ..helpers import assert_close

pytestmark = pytest.mark.interpreter


def inputs(C, V, J, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(C, V, generator=g) * 3).to(dtype)
    idx = torch.randint(0, V, (C, J), generator=g)
    idx[0, 0] = -1  # "no entry"
    if C > 2:
        idx[2, -1] = V + 5  # out of range: must read nothing
    return z.to(device), idx.to(device)


@pytest.mark.parametrize("C,V,J", [(1, 7, 1), (5, 1000, 1), (4, 5003, 3), (3, 9000, 2)])
@pytest.mark.parametrize("softcap,temperature", [(0.0, 1.0), (5.0, 0.8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_stats(device, C, V, J, softcap, temperature, dtype):
    z, idx = inputs(C, V, J, dtype, device=device)
    kw = dict(softcap=softcap, temperature=temperature, want_sum=True, want_entropy=True)
    got = loss_rows.row_stats(z, idx, **kw)
    want = loss_rows_torch.row_stats(z, idx, **kw)
    for name, a, b in zip(("lse", "gathered", "row_sum", "entropy"), got, want):
        assert_close(a, b, 1e-5, name)


@pytest.mark.parametrize("C,V,J", [(1, 7, 1), (5, 1000, 2), (3, 9000, 3)])
@pytest.mark.parametrize("softcap,temperature", [(0.0, 1.0), (5.0, 0.8)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_row_grad(device, C, V, J, softcap, temperature, out_dtype):
    z, idx = inputs(C, V, J, device=device)
    g = torch.Generator(device).manual_seed(1)
    lse = loss_rows_torch.row_stats(z, idx, softcap=softcap, temperature=temperature,
                                    want_sum=False, want_entropy=False)[0]
    c, u = torch.rand(C, generator=g, device=device), torch.randn(C, generator=g, device=device) * 1e-3
    w = torch.rand(C, J, generator=g, device=device)
    kw = dict(softcap=softcap, temperature=temperature)
    got, want = (torch.empty(C, V, dtype=out_dtype, device=device) for _ in range(2))
    assert loss_rows.row_grad(z, lse, c, u, idx, w, got, **kw) is None
    assert loss_rows_torch.row_grad(z, lse, c, u, idx, w, want, **kw) is None
    assert_close(got, want, 1e-6 if out_dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("store", [True, False])
@pytest.mark.parametrize("softcap,temperature", [(0.0, 1.0), (5.0, 0.8)])
def test_row_grad_with_reference_rows(device, store, softcap, temperature):
    """The ASFT term: -lam p_ref in dz, and KL(p_ref || p) per row (alone when not storing)."""
    C, V, J = 5, 1500, 2
    z, idx = inputs(C, V, J, device=device)
    zr = z + torch.randn(C, V, generator=torch.Generator().manual_seed(3)).to(device)
    kw = dict(softcap=softcap, temperature=temperature)
    stats = dict(want_sum=False, want_entropy=False)
    lse = loss_rows_torch.row_stats(z, idx, **kw, **stats)[0]
    lse_r = loss_rows_torch.row_stats(zr, idx, **kw, **stats)[0]
    g = torch.Generator(device).manual_seed(1)
    c, u, lam = (torch.rand(C, generator=g, device=device) for _ in range(3))
    w = torch.rand(C, J, generator=g, device=device)
    got, want = (torch.empty(C, V, device=device) if store else None for _ in range(2))
    kl = loss_rows.row_grad(z, lse, c, u, idx, w, got, ref=(zr, lse_r, lam), **kw)
    kl_want = loss_rows_torch.row_grad(z, lse, c, u, idx, w, want, ref=(zr, lse_r, lam), **kw)
    assert_close(kl, kl_want, 1e-5, "kl")
    s = torch.log_softmax(loss_rows_torch._transform(z, softcap, temperature), 1)
    sr = torch.log_softmax(loss_rows_torch._transform(zr, softcap, temperature), 1)
    assert_close(kl, (sr.exp() * (sr - s)).sum(1), 1e-5, "kl vs definition")
    if store:
        assert_close(got, want, 1e-6, "dz")


def test_row_grad_in_place_over_logits_with_row_stride(device):
    """The chunk's logits may be a row-strided view; dz may overwrite them."""
    z, idx = inputs(4, 300, 1, device=device)
    big = torch.zeros(4, 320, device=device)
    big[:, :300] = z
    view = big[:, :300]
    lse = loss_rows_torch.row_stats(z, idx, softcap=0.0, temperature=1.0, want_sum=False,
                                    want_entropy=False)[0]
    c, u, w = (torch.ones(4, device=device), torch.zeros(4, device=device),
               torch.ones(4, 1, device=device))
    want = torch.empty_like(z)
    loss_rows_torch.row_grad(z, lse, c, u, idx, w, want, softcap=0.0, temperature=1.0)
    assert loss_rows.row_grad(view, lse, c, u, idx, w, view, softcap=0.0, temperature=1.0) is None
    assert_close(view, want, 1e-6)
    assert torch.all(big[:, 300:] == 0)


def test_every_config_is_picked_for_some_vocabulary():
    picked = {loss_rows.pick_config(V) for V in (7, 8192, 8193, 152064)}
    assert picked == set(loss_rows.CONFIGS)
