"""The fused losses under a loss scale: GradScaler multiplies the loss by 2**16 (and grows it),
and the fused ops form their gradients in the forward for an upstream gradient of one. The
scale must reach them without being rounded to half precision (2**16 is inf in fp16), and a
gradient formed for an upstream of one must keep its small entries until it is scaled (in
fp16 they are subnormals). The expected gradients come from the reference on float32 copies
of the inputs, scaled there and rounded once."""

import pytest
import torch

import fastft
from fastft.reference import losses as ref

from ..helpers import head_inputs

pytestmark = pytest.mark.interpreter

LOSSES = {
    "ce": (fastft.losses.cross_entropy, ref.cross_entropy, {}),
    "dft": (fastft.losses.dft, ref.dft, {}),
    "otr": (lambda h, w, y, **kw: fastft.losses.otr(h, w, y, k=3, **kw),
            lambda h, w, y, **kw: ref.otr(h, w, y, **kw), "samples"),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("dtype,scale,tol", [
    (torch.float16, 2.0**16, 2e-3),  # GradScaler's starting scale: inf once rounded to fp16
    (torch.float16, 2.0**18, 2e-3),  # grown
    (torch.bfloat16, 0.1, 1e-2),  # not a power of two
])
def test_gradients_under_a_loss_scale_match_the_float32_reference(backend, device, loss, dtype,
                                                                   scale, tol):
    fn, ref_fn, extra = LOSSES[loss]
    h, w, y = head_inputs(61, 32, 5003, dtype, ignore_every=5, seed=3, device=device)
    kw = {}
    if extra == "samples":
        kw["samples"] = torch.randint(0, 5003, (61, 3), generator=torch.Generator()
                                      .manual_seed(4)).to(device)
    gh, gw = torch.autograd.grad(fn(h, w, y, **kw) * scale, (h, w))
    h32, w32 = (t.detach().float().requires_grad_() for t in (h, w))
    eh, ew = torch.autograd.grad(ref_fn(h32, w32, y, **kw) * scale, (h32, w32))
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert rel_err(gh, eh.to(dtype)) < tol, (loss, dtype, scale)
    assert rel_err(gw, ew.to(dtype)) < tol, (loss, dtype, scale)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_under_fp16_autocast_with_an_fp32_head_and_gradscalers_scale(backend, device, loss):
    """transformers' fp16=True: fp32 master weights, fp16 autocast (which casts the head to
    fp16 for the loss, as nn.Linear would) and GradScaler's 2**16 on the loss. CUDA's
    autocast on its CPU stand-in."""
    fn, ref_fn, extra = LOSSES[loss]
    h, w, y = head_inputs(61, 32, 5003, torch.float16, ignore_every=5, seed=6, device=device)
    w = w.detach().float().requires_grad_()
    kw = {}
    if extra == "samples":
        kw["samples"] = torch.randint(0, 5003, (61, 3), generator=torch.Generator()
                                      .manual_seed(7)).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.float16):
        out = fn(h, w, y, **kw)
    gh, gw = torch.autograd.grad(out * 2.0**16, (h, w))
    h32 = h.detach().float().requires_grad_()
    w32 = w.detach().half().float().requires_grad_()  # the head autocast multiplies by
    eh, ew = torch.autograd.grad(ref_fn(h32, w32, y, **kw) * 2.0**16, (h32, w32))
    assert gh.dtype == torch.float16 and gw.dtype == torch.float32
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert rel_err(gh, eh.half()) < 2e-3, loss
    assert rel_err(gw, ew.half()) < 2e-3, loss  # the cast's backward: fp16, then fp32


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_fp32_gradients_are_scaled_in_place_and_a_second_backward_is_refused(backend, device,
                                                                            scale):
    """The op's own gradient buffers become the gradients (scaled in place; as they are for
    an upstream gradient of one): no second [V, H] tensor in the backward, and a second
    backward through the same forward, which would scale them again, raises."""
    h, w, y = head_inputs(61, 32, 5003, torch.float32, ignore_every=5, seed=3, device=device)
    h.requires_grad_()
    w.requires_grad_()
    if backend == "reference":
        pytest.skip("the reference backend does not run the fused op")
    norm = torch.ones((), device=h.device)  # reduction "sum"
    rows, gh, gw = torch.ops.fastft.linear_cross_entropy(
        h, w, y, None, norm, -100, 0.0, 0.0, 0.0, 1.0, False, None, None, 0.0, True, True)
    before = gw.clone()
    out = rows.sum() * scale
    out.backward(retain_graph=True)
    assert torch.equal(w.grad, before * scale)
    assert torch.equal(gw, before * scale)  # the buffer itself was scaled
    want_h, want_w = torch.autograd.grad(ref.cross_entropy(h, w, y, reduction="sum") * scale,
                                         (h, w))
    assert rel_err(w.grad, want_w) < 1e-5 and rel_err(h.grad, want_h) < 1e-5
    with pytest.raises(fastft.FastftError, match="backpropagated twice.*retain_graph"):
        out.backward()
