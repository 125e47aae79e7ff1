"""fastft.losses.grpo against the reference (TRL's formulas) and against Liger-Kernel."""

import itertools

import pytest
import torch

import fastft
from fastft.reference import losses as ref

from ..helpers import assert_close

pytestmark = pytest.mark.interpreter
GRID = list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"], ["token", "sequence"],
                              [0.0, 0.05], [False, True], [None, 1.5]))
IDS = [f"{lt}-{lvl}-beta{b}-{'old' if o else 'noold'}-delta{d}" for lt, lvl, b, o, d in GRID]


def rollout(B=3, S=7, H=16, V=300, seed=0, device="cpu", dtype=torch.float32, old=True,
            beta=0.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, H, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.3).to(device, dtype).requires_grad_()
    tok = torch.randint(0, V, (B, S), generator=g).to(device)
    mask = (torch.rand(B, S, generator=g) > 0.2).float().to(device)
    mask[0, -2:] = 0
    adv = torch.randn(B, generator=g).to(device)
    with torch.no_grad():
        lp = ref.token_logprobs(h, w, tok)
    old_lp = (lp + 0.3 * torch.randn(B, S, generator=g).to(device)) if old else None
    ref_lp = (lp + 0.2 * torch.randn(B, S, generator=g).to(device)) if beta else None
    return h, w, tok, adv, dict(mask=mask, old_logps=old_lp, ref_logps=ref_lp, beta=beta)


def compare(h, w, tok, adv, rtol, **kw):
    loss, metrics = fastft.losses.grpo(h, w, tok, adv, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    expect, emetrics = ref.grpo(h, w, tok, adv, **kw)
    eh, ew = torch.autograd.grad(expect, (h, w))
    assert_close(loss, expect, rtol, "loss")
    assert_close(gh, eh, rtol, "grad_hidden")
    assert_close(gw, ew, rtol, "grad_weight")
    for name, value in emetrics.items():
        assert_close(metrics[name], value, 1e-5, name)
    return metrics


@pytest.mark.parametrize("loss_type,level,beta,old,delta", GRID, ids=IDS)
def test_every_variant_matches_reference(backend, device, loss_type, level, beta, old, delta):
    h, w, tok, adv, kw = rollout(device=device, old=old, beta=beta)
    metrics = compare(h, w, tok, adv, 2e-5, loss_type=loss_type, importance_level=level,
                      delta=delta, max_completion_length=10, **kw)
    assert set(metrics) == {"kl", "clip_low", "clip_high", "ratio"}
    assert all(v.dim() == 0 for v in metrics.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, device, dtype):
    h, w, tok, adv, kw = rollout(device=device, dtype=dtype, beta=0.04)
    compare(h, w, tok, adv, 2e-3 if dtype == torch.float16 else 2e-2, **kw)


def test_temperature_and_entropy_metric(backend, device):
    h, w, tok, adv, kw = rollout(device=device, beta=0.04)
    metrics = compare(h, w, tok, adv, 2e-5, temperature=0.7, entropy=True, **kw)
    with torch.no_grad():
        s = ref.logits(h.reshape(-1, h.shape[-1]), w, temperature=0.7)
        ent = -(torch.softmax(s, -1) * torch.log_softmax(s, -1)).sum(-1)
        m = kw["mask"].reshape(-1)
    assert_close(metrics["entropy"], (ent * m).sum() / m.sum(), 1e-5)


def test_dapo_gradient_accumulation_with_num_items(backend, device):
    h, w, tok, adv, kw = rollout(B=4, device=device)
    n = kw["mask"].sum()
    full, _ = fastft.losses.grpo(h, w, tok, adv, **kw)
    gh, gw = torch.autograd.grad(full, (h, w))
    acc_h, acc_w, total = torch.zeros_like(h), torch.zeros_like(w), 0.0
    for a, b in ((0, 1), (1, 4)):
        part_kw = dict(mask=kw["mask"][a:b], old_logps=kw["old_logps"][a:b])
        part, _ = fastft.losses.grpo(h[a:b], w, tok[a:b], adv[a:b], num_items_in_batch=n,
                                     **part_kw)
        ph, pw = torch.autograd.grad(part, (h, w))
        acc_h, acc_w, total = acc_h + ph, acc_w + pw, total + part
    assert_close(total, full, 1e-5)
    assert_close(acc_h, gh, 1e-5)
    assert_close(acc_w, gw, 1e-5)


def test_all_tokens_masked(backend, device):
    h, w, tok, adv, kw = rollout(device=device)
    kw["mask"] = torch.zeros_like(kw["mask"])
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        loss, metrics = fastft.losses.grpo(h, w, tok, adv, loss_type=loss_type, **kw)
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert loss.item() == 0 and not gh.any() and not gw.any()
        assert all(torch.isfinite(v) for v in metrics.values())


def test_selective_logprobs(backend, device):
    h, w, tok, _, _ = rollout(device=device)
    for t in (1.0, 0.6):
        got = fastft.losses.selective_logprobs(h, w, tok, temperature=t)
        assert got.shape == tok.shape and got.grad_fn is None
        assert_close(got, ref.token_logprobs(h, w, tok, temperature=t), 1e-5)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = fastft.losses.group_advantages(r, 4, "group")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    torch.testing.assert_close(a[:4], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (std + 1e-4))
    torch.testing.assert_close(a[4:], torch.zeros(4))
    b = fastft.losses.group_advantages(r, 4, "batch")
    torch.testing.assert_close(b[:4], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (r.std() + 1e-4))
    torch.testing.assert_close(fastft.losses.group_advantages(r, 4, "none")[:2],
                               torch.tensor([0.5, -0.5]))


@pytest.mark.peers
@pytest.mark.parametrize("loss_type,level,beta,old,delta", GRID, ids=IDS)
def test_matches_liger_fused_grpo(device, loss_type, level, beta, old, delta):
    """Liger-Kernel's LigerFusedLinearGRPOLoss (pure torch, follows TRL) for the same inputs."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    h, w, tok, adv, kw = rollout(device=device, old=old, beta=beta, seed=5)
    loss, metrics = fastft.losses.grpo(h, w, tok, adv, loss_type=loss_type,
                                       importance_level=level, delta=delta,
                                       max_completion_length=10, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    peer = liger.LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta > 0, loss_type=loss_type,
        max_completion_length=10, importance_sampling_level=level, delta=delta)
    out = peer(h, w, tok, kw["mask"], adv, ref_per_token_logps=kw["ref_logps"],
               old_per_token_logps=kw["old_logps"])
    eh, ew = torch.autograd.grad(out[0], (h, w))
    assert_close(loss, out[0], 2e-5, "loss")
    assert_close(gh, eh, 2e-5, "grad_hidden")
    assert_close(gw, ew, 2e-5, "grad_weight")
    clip = out[1][-1]  # Liger reports one clip ratio: low and high together
    assert_close(metrics["clip_low"] + metrics["clip_high"], clip, 1e-6, "clip")
    if beta:
        assert_close(metrics["kl"], out[1][0], 1e-5, "kl")
