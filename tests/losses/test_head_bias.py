"""An output head with a bias (Phi-1/Phi-2): every fused loss takes ``bias`` [V].

The logits h W^T + b are (h|1)(W|b)^T: each loss with ``bias`` equals the same
loss on the explicitly augmented inputs, its gradients reach hidden, weight and
bias (the bias's is the last column of the augmented weight's), and CE and the
log-probabilities equal torch's on the explicit logits.
"""

import pytest
import torch
import torch.nn.functional as F

from fastft import losses

from ..helpers import assert_close

B, S, H, V, K = 2, 5, 8, 19, 3


@pytest.fixture(params=["default", "torch", "triton", "reference"])
def any_backend(request, monkeypatch):
    if request.param != "default":
        monkeypatch.setenv("FASTFT_BACKEND", request.param)
    return request.param


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    y = torch.randint(0, V, (B, S), generator=g)
    y[0, :2] = -100
    return h, w, b, y


def augmented(h, w, b):
    """Leaves (h|1) and (W|b), detached from h, w, b."""
    ha = torch.cat([h.detach(), torch.ones(*h.shape[:-1], 1)], -1).requires_grad_()
    wa = torch.cat([w.detach(), b.detach()[:, None]], 1).requires_grad_()
    return ha, wa


def call(name, h, w, y, bias=None, ref=None):
    g = torch.Generator().manual_seed(5)
    if name == "cross_entropy":
        return losses.cross_entropy(h, w, y, bias=bias)
    if name == "dft":
        return losses.dft(h, w, y, bias=bias)
    if name == "asft":
        return losses.asft(h, w, y, ref_hidden=ref, kl_coef=0.3, bias=bias)
    if name == "otr":
        samples = torch.randint(0, V, (B, S, K), generator=g)
        return losses.otr(h, w, y, k=K, samples=samples, bias=bias)
    if name == "grpo":
        adv = torch.randn(B, generator=g)
        mask = (y != -100).float()
        old = torch.randn(B, S, generator=g) * 0.1 - 3.0
        return losses.grpo(h, w, y.clamp(min=0), adv, mask=mask, old_logps=old, bias=bias)[0]
    raise ValueError(name)


@pytest.mark.parametrize("name", ["cross_entropy", "dft", "asft", "otr", "grpo"])
def test_bias_is_the_augmented_head(name, any_backend):
    h, w, b, y = inputs()
    ref = torch.randn(B, S, H, generator=torch.Generator().manual_seed(3))
    ha, wa = augmented(h, w, b)
    ref_a = torch.cat([ref, torch.ones(B, S, 1)], -1)
    got = call(name, h, w, y, bias=b, ref=ref)
    want = call(name, ha, wa, y, ref=ref_a)
    assert_close(got, want, 1e-5, "loss")
    got.backward()
    want.backward()
    assert_close(h.grad, ha.grad[..., :H], 1e-5, "d hidden")
    assert_close(w.grad, wa.grad[:, :H], 1e-5, "d weight")
    assert_close(b.grad, wa.grad[:, H], 1e-5, "d bias")
    assert b.grad.abs().max() > 0
    # and the bias matters: without it the loss differs
    assert (call(name, h, w, y, ref=ref) - got).abs() > 1e-4


def test_cross_entropy_with_bias_equals_torch(any_backend):
    h, w, b, y = inputs(1)
    got = losses.cross_entropy(h, w, y, bias=b)
    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (h, w, b))
    want = F.cross_entropy((h2 @ w2.t() + b2).flatten(0, 1), y.flatten())
    assert_close(got, want, 1e-5)
    for g1, g2, n in zip(torch.autograd.grad(got, (h, w, b)),
                         torch.autograd.grad(want, (h2, w2, b2)), ("h", "w", "b")):
        assert_close(g1, g2, 1e-5, n)


def test_selective_logprobs_with_bias(any_backend):
    h, w, b, y = inputs(2)
    tokens = y.clamp(min=0)
    got = losses.selective_logprobs(h, w, tokens, bias=b)
    want = torch.log_softmax(h @ w.t() + b, -1).gather(-1, tokens[..., None])[..., 0]
    assert_close(got, want.detach(), 1e-5)


def test_asft_reference_head_with_its_own_bias():
    """ref_weight with ref_bias; and a reference without a bias beside a biased head."""
    h, w, b, y = inputs(3)
    g = torch.Generator().manual_seed(4)
    ref_h, ref_w, ref_b = torch.randn(B, S, H, generator=g), torch.randn(V, H, generator=g), \
        torch.randn(V, generator=g)
    ha, wa = augmented(h, w, b)
    ones = torch.ones(B, S, 1)
    for rb in (ref_b, None):
        got = losses.asft(h, w, y, ref_hidden=ref_h, ref_weight=ref_w, ref_bias=rb, bias=b)
        col = (ref_b if rb is not None else torch.zeros(V))[:, None]
        want = losses.asft(ha, wa, y, ref_hidden=torch.cat([ref_h, ones], -1),
                           ref_weight=torch.cat([ref_w, col], 1))
        assert_close(got, want, 1e-5, f"ref_bias={'given' if rb is not None else None}")


def test_bias_errors():
    h, w, b, y = inputs()
    with pytest.raises(Exception, match=r"bias must be the output head's bias, shape \(19,\)"):
        losses.cross_entropy(h, w, y, bias=b[:5])
    with pytest.raises(Exception, match="bias is torch.float16"):
        losses.cross_entropy(h, w, y, bias=b.half())
