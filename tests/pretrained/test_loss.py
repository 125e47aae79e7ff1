"""The fused loss head on the real model, fp32, on chat turns whose prompt rows are masked:
transformers' own loss and gradients, and the same model computed in fp64.

transformers' fp32 loss is itself a few 1e-6 off (torch's CPU log_softmax over 49152 fp32
logits; a logsumexp of the same logits is not): the fused loss is checked against it at
that level, and against the fp64 model, to which it is 3 to 70 times closer than
transformers' fp32 (measured on the head alone: loss 3e-8 vs 3e-6, grad_hidden 3e-6 vs
9e-6, grad_head 1e-6 vs 2e-5 of the largest entry).
"""

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

import fastft
from fastft.patch import decoder, next_token_labels

from ..helpers import assert_close


def fp64_loss(model, ids, labels):
    """transformers' model in fp64, and the loss on its fp64 logits (its own loss would cast
    the logits to fp32 first)."""
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float64
    return F.cross_entropy(logits.flatten(0, 1), next_token_labels(labels).flatten())


@pytest.fixture(scope="module")
def fused(smollm2):
    """fastft's loss head on the real model (Full: every weight trains): the batch, the loss
    and every parameter's gradient."""
    ids, labels = smollm2.batch(2, 64)
    ours = smollm2.fresh()
    fastft.prepare(ours, fastft.Full())
    out = ours(input_ids=ids, labels=labels)
    assert out.logits is None  # the [2, 64, 49152] logits were never built
    out.loss.backward()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # one tied gradient
    grads = {name: p.grad for name, p in ours.named_parameters()}
    assert len(grads) == 272
    return ids, labels, out.loss.detach(), grads


def max_rel(a, b):
    """The largest difference over the largest entry of the reference (fp32 arithmetic where
    both are fp32: its rounding, 6e-8, is far below the tolerances)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype), b.to(dtype)
    return ((a - b).abs().max() / b.abs().max()).item()


def check_grads(grads, model, tol, what):
    """Each gradient within ``tol`` of ``model``'s, relative to that tensor's largest entry;
    returns the worst."""
    worst = 0.0
    for name, p in model.named_parameters():
        err = max_rel(grads[name], p.grad.float())
        assert err <= tol, f"{name}: grad {err:.2e} off {what}'s (tolerance {tol:.0e})"
        worst = max(worst, err)
    return worst


@pytest.mark.pretrained
def test_fused_loss_and_every_gradient_equal_transformers(smollm2, fused):
    ids, labels, loss, grads = fused
    theirs = smollm2.fresh()
    want = theirs(input_ids=ids, labels=labels).loss
    assert_close(loss, want, 1e-5, "loss")
    want.backward()
    # 30 layers down, transformers' fp32 is up to 3.3e-4 off fp64 (of a tensor's largest
    # entry), fastft up to 2.4e-5: they differ by up to 3.5e-4
    check_grads(grads, theirs, 1e-3, "transformers")


@pytest.mark.pretrained
def test_fused_loss_and_every_gradient_equal_the_fp64_model(smollm2, fused):
    ids, labels, loss, grads = fused
    exact = smollm2.fresh().double()
    truth = fp64_loss(exact, ids, labels)
    assert_close(loss.double(), truth, 1e-6, "loss")  # measured 2e-8
    truth.backward()
    assert check_grads(grads, exact, 1e-4, "fp64") < 5e-5  # measured 2.4e-5


@pytest.mark.pretrained
def test_fused_cross_entropy_gradients_of_hidden_and_head(smollm2):
    """The loss op alone on the model's real final hidden states and its 49152-row head,
    against transformers' ForCausalLMLoss on the materialised logits, and in fp64."""
    ids, labels = smollm2.batch(2, 128, skip=2)
    with torch.no_grad():
        hidden = decoder(smollm2.model)(input_ids=ids).last_hidden_state
    weight = smollm2.model.lm_head.weight.detach()

    def run(loss_fn, dtype):
        h = hidden.to(dtype).clone().requires_grad_()
        w = weight.to(dtype).clone().requires_grad_()
        loss = loss_fn(h, w)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    got = run(lambda h, w: fastft.losses.cross_entropy(h, w, next_token_labels(labels)),
              torch.float32)
    want = run(lambda h, w: ForCausalLMLoss(h @ w.T, labels, vocab_size=w.shape[0]),
               torch.float32)
    exact = run(lambda h, w: F.cross_entropy((h @ w.T).flatten(0, 1),
                                             next_token_labels(labels).flatten()), torch.float64)
    for name, a, b, c, tol in zip(("loss", "grad_hidden", "grad_head"), got, want, exact,
                                  (1e-6, 1e-5, 1e-5)):
        assert_close(a, b, 1e-4 if name != "loss" else 1e-5, name)
        assert_close(a.double(), c, tol, name + " vs fp64")
        assert max_rel(a, c) < max_rel(b, c), name  # transformers' fp32 is the one off
    prompt = int((labels[0] == -100).sum())
    assert got[1][0, :prompt - 1].abs().max() == 0  # rows predicting prompt tokens: no gradient
    assert got[1][0, prompt - 1].abs().max() > 0  # the first answer token's
