"""The SFT losses against torch.nn.functional and formulas written here, not fastft.reference.

Every expected value below is computed on the materialised logits z = h W^T by
torch.nn.functional.cross_entropy or by a formula written out in this file from
METHODS.md §1, and differentiated by torch autograd. With s = softcap(z) / tau,
softcap(z) = c tanh(z / c):

- CE: F.cross_entropy(s, y, ignore_index=-100, label_smoothing=eps).
- z_loss: z_loss * lse(s)^2 added to each unmasked row's loss, where lse is the
  logsumexp of the same logits s the CE uses (after softcap and temperature);
  it is multiplied by the row weight and divided by the same normaliser as the CE.
- per-row ``weights`` multiply each row's loss; "mean" still divides by the
  number of unmasked rows (or by ``num_items_in_batch`` when given).
- DFT: sg(p_y) * CE, dz = p_y (p - e_y).
- ASFT: sg(p_y) * CE + lambda * KL(p_ref || p), p_ref = softmax(h_ref W_ref^T).
- OTR: -(1/K') sum_k r_k log p(a_k), r_k = 1 if a_k = y else -beta, the label as
  one more rollout with reward 1 when include_target (K' = K + 1), log p from s.
"""

import pytest
import torch
import torch.nn.functional as F

import fastft

from ..helpers import assert_close

RTOL = 1e-5


def make(T=11, H=16, V=37, seed=0, lead=None, ignore=(2, 7)):
    g = torch.Generator().manual_seed(seed)
    shape = lead or (T,)
    h = torch.randn(*shape, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, V, shape, generator=g)
    flat = y.view(-1)
    for i in ignore:
        flat[i] = -100
    return h, w, y


def logits(h, w, softcap=None, temperature=1.0):
    z = h.reshape(-1, h.shape[-1]) @ w.t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def grads(loss, inputs, seed=1):
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed)) \
        if loss.dim() else torch.tensor(1.3)
    return torch.autograd.grad(loss, inputs, up)


def compare(got, want, h, w, rtol=RTOL):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert_close(got, want, rtol, "loss")
    gh, gw = grads(got, (h, w))
    eh, ew = grads(want, (h, w))
    assert_close(gh, eh, rtol, "grad_hidden")
    assert_close(gw, ew, rtol, "grad_weight")
    return gh, gw


# ---- cross-entropy against torch.nn.functional.cross_entropy -------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_matches_torch_cross_entropy(reduction, smoothing):
    h, w, y = make(lead=(3, 4))
    got = fastft.losses.cross_entropy(h, w, y, reduction=reduction, label_smoothing=smoothing)
    want = F.cross_entropy(logits(h, w), y.reshape(-1), ignore_index=-100,
                           label_smoothing=smoothing, reduction=reduction)
    if reduction == "none":
        want = want.reshape(y.shape)
        assert (got[y == -100] == 0).all()
    compare(got, want, h, w)


def test_ce_num_items_in_batch_divides_the_sum():
    h, w, y = make()
    got = fastft.losses.cross_entropy(h, w, y, num_items_in_batch=23)
    want = F.cross_entropy(logits(h, w), y, reduction="sum") / 23
    compare(got, want, h, w)
    # as a tensor too (the trainer passes the accumulated count as a tensor)
    got_t = fastft.losses.cross_entropy(h, w, y, num_items_in_batch=torch.tensor(23))
    assert_close(got_t, want, RTOL, "loss with a tensor num_items_in_batch")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_row_weights_multiply_each_row(reduction):
    h, w, y = make()
    wt = torch.rand(y.shape, generator=torch.Generator().manual_seed(3)) * 2
    got = fastft.losses.cross_entropy(h, w, y, weights=wt, reduction=reduction)
    rows = F.cross_entropy(logits(h, w), y, reduction="none") * wt
    want = rows.sum() / ((y != -100).sum() if reduction == "mean" else 1)
    compare(got, want, h, w)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_ce_temperature_and_softcap(temperature, softcap):
    h, w, y = make(seed=4)
    with torch.no_grad():
        w.mul_(4)  # logits well beyond the cap, so the softcap bends them
    got = fastft.losses.cross_entropy(h, w, y, temperature=temperature, softcap=softcap)
    want = F.cross_entropy(logits(h, w, softcap, temperature), y)
    compare(got, want, h, w)


def test_ce_z_loss_is_on_the_lse_of_the_transformed_logits():
    h, w, y = make(seed=5)
    wt = torch.rand(y.shape, generator=torch.Generator().manual_seed(6)) + 0.5
    s = logits(h, w, softcap=4.0, temperature=0.8)
    keep = y != -100
    rows = (F.cross_entropy(s, y, reduction="none", label_smoothing=0.05)
            + 0.01 * torch.logsumexp(s, -1) ** 2) * wt
    want = torch.where(keep, rows, 0.0).sum() / keep.sum()
    got = fastft.losses.cross_entropy(h, w, y, z_loss=0.01, softcap=4.0, temperature=0.8,
                                      label_smoothing=0.05, weights=wt)
    compare(got, want, h, w)
    # and not on the lse of the raw logits z = h W^T
    raw = (F.cross_entropy(s, y, reduction="none", label_smoothing=0.05)
           + 0.01 * torch.logsumexp(logits(h, w), -1) ** 2) * wt
    assert (got - torch.where(keep, raw, 0.0).sum() / keep.sum()).abs() > 1e-3


def test_ce_all_rows_ignored():
    h, w, y = make(T=5, ignore=range(5))
    got = fastft.losses.cross_entropy(h, w, y)
    # a mean over no rows: fastft divides the (zero) sum by max(count, 1) where torch gives nan
    want = F.cross_entropy(logits(h, w), y, reduction="sum")
    assert want.item() == 0.0
    gh, gw = compare(got, want, h, w)
    assert not gh.any() and not gw.any()


# ---- DFT ------------------------------------------------------------------------------------

def dft_rows(s, y):
    keep = y != -100
    ce = F.cross_entropy(s, y, reduction="none")
    p_y = torch.exp(-ce).detach()  # softmax(s)[y] = exp(-CE); 1 at ignored rows, times 0
    return torch.where(keep, p_y * ce, 0.0), keep


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dft_is_detached_target_probability_times_ce(reduction):
    h, w, y = make(seed=7)
    rows, keep = dft_rows(logits(h, w, temperature=0.9), y)
    want = {"mean": rows.sum() / keep.sum(), "sum": rows.sum(), "none": rows}[reduction]
    got = fastft.losses.dft(h, w, y, reduction=reduction, temperature=0.9)
    compare(got, want, h, w)


def test_dft_gradient_is_p_y_times_p_minus_onehot():
    """METHODS.md: dz = p_y (p - e_y) per row, so grad_h = dz W / n and grad_W = dz^T h / n."""
    h, w, y = make(seed=8)
    got = fastft.losses.dft(h, w, y)
    gh, gw = torch.autograd.grad(got, (h, w))
    with torch.no_grad():
        keep = y != -100
        p = torch.softmax(logits(h, w), -1)
        onehot = F.one_hot(torch.where(keep, y, 0), w.shape[0]).float()
        p_y = (p * onehot).sum(-1, keepdim=True)
        dz = torch.where(keep[:, None], p_y * (p - onehot), 0.0) / keep.sum()
    assert_close(gh, dz @ w, RTOL, "grad_hidden")
    assert_close(gw, dz.t() @ h, RTOL, "grad_weight")


def test_dft_num_items_and_weights():
    h, w, y = make(seed=9)
    wt = torch.rand(y.shape, generator=torch.Generator().manual_seed(2))
    rows, _ = dft_rows(logits(h, w), y)
    got = fastft.losses.dft(h, w, y, weights=wt, num_items_in_batch=40)
    compare(got, (rows * wt).sum() / 40, h, w)


# ---- ASFT -----------------------------------------------------------------------------------

def asft_expected(h, w, y, h_ref, w_ref, lam):
    rows, keep = dft_rows(logits(h, w), y)
    log_p = torch.log_softmax(logits(h, w), -1)
    with torch.no_grad():
        log_p_ref = torch.log_softmax(logits(h_ref, w_ref), -1)
    kl = (log_p_ref.exp() * (log_p_ref - log_p)).sum(-1)  # forward KL(p_ref || p)
    return torch.where(keep, rows + lam * kl, 0.0), keep


@pytest.mark.parametrize("separate_head", [True, False])
def test_asft_is_dft_plus_forward_kl_to_the_reference(separate_head):
    h, w, y = make(seed=10)
    g = torch.Generator().manual_seed(11)
    h_ref = h.detach() + 0.5 * torch.randn(h.shape, generator=g)
    w_ref = w.detach() + 0.3 * torch.randn(w.shape, generator=g) if separate_head else None
    rows, keep = asft_expected(h, w, y, h_ref, w if w_ref is None else w_ref.detach(), 0.3)
    got = fastft.losses.asft(h, w, y, ref_hidden=h_ref, ref_weight=w_ref, kl_coef=0.3)
    compare(got, rows.sum() / keep.sum(), h, w)
    if separate_head:  # the reference head changes the loss: it is really read
        same = fastft.losses.asft(h, w, y, ref_hidden=h_ref, kl_coef=0.3)
        assert (same - got).abs() > 1e-3


def test_asft_reference_gets_no_gradient_and_default_lambda():
    h, w, y = make(seed=12)
    h_ref = (h.detach() * 0.8).requires_grad_()
    w_ref = (w.detach() * 1.1).requires_grad_()
    got = fastft.losses.asft(h, w, y, ref_hidden=h_ref, ref_weight=w_ref, reduction="sum")
    rows, _ = asft_expected(h, w, y, h_ref.detach(), w_ref.detach(), 0.1)  # METHODS.md: 0.1
    compare(got, rows.sum(), h, w)
    assert got.requires_grad
    gr = torch.autograd.grad(got, (h_ref, w_ref), allow_unused=True)
    assert all(g is None or not g.any() for g in gr)


# ---- OTR ------------------------------------------------------------------------------------

def otr_expected(h, w, y, samples, beta, include_target, temperature):
    """-(1/K') sum_k r_k log p(a_k) per row (METHODS.md §1), log p at ``temperature``."""
    log_p = torch.log_softmax(logits(h, w, temperature=temperature), -1)
    keep = y != -100
    y0 = torch.where(keep, y, 0)
    a = samples.reshape(y.shape[0], -1)
    r = torch.where(a == y0[:, None], 1.0, -beta)
    terms = r * log_p.gather(1, a)
    total, count = terms.sum(1), a.shape[1]
    if include_target:
        total = total + log_p.gather(1, y0[:, None])[:, 0]
        count += 1
    return torch.where(keep, -total / count, 0.0), keep


def otr_samples(y, V, K, seed):
    """K ids per row, about a third of them equal to the row's label."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, V, (*y.shape, K), generator=g)
    hit = torch.rand(a.shape, generator=g) < 0.35
    return torch.where(hit, y.clamp(min=0)[..., None], a)


@pytest.mark.parametrize("include_target", [True, False])
@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_otr_with_given_samples_matches_the_formula(include_target, temperature):
    h, w, y = make(seed=13)
    a = otr_samples(y, w.shape[0], 5, seed=14)
    assert (a == y[:, None]).any() and (a != y[:, None]).any()
    rows, keep = otr_expected(h, w, y, a, 0.25, include_target, temperature)
    got = fastft.losses.otr(h, w, y, k=5, samples=a, beta=0.25, include_target=include_target,
                            temperature=temperature)
    compare(got, rows.sum() / keep.sum(), h, w)
    rows, _ = otr_expected(h, w, y, a, 0.25, include_target, temperature)
    none = fastft.losses.otr(h, w, y, k=5, samples=a, beta=0.25,
                             include_target=include_target, temperature=temperature,
                             reduction="none")
    compare(none, rows, h, w)


def test_otr_gradient_is_rbar_p_minus_reward_weighted_onehots():
    """METHODS.md: dz/ds = rbar p - (1/K') sum_k r_k e_{a_k}; ds/dz = 1/tau."""
    h, w, y = make(seed=15)
    tau, beta, K = 0.8, 0.1, 4
    a = otr_samples(y, w.shape[0], K, seed=16)
    got = fastft.losses.otr(h, w, y, k=K, samples=a, beta=beta, temperature=tau,
                            reduction="sum")
    gh, gw = torch.autograd.grad(got, (h, w))
    with torch.no_grad():
        keep = y != -100
        y0 = torch.where(keep, y, 0)
        allk = torch.cat([a, y0[:, None]], 1)  # include_target: the label with reward 1
        r = torch.where(allk == y0[:, None], 1.0, -beta)
        r[:, -1] = 1.0
        p = torch.softmax(logits(h, w, temperature=tau), -1)
        hot = torch.zeros_like(p).scatter_add_(1, allk, r)
        ds = r.mean(1, keepdim=True) * p - hot / (K + 1)
        dz = torch.where(keep[:, None], ds / tau, 0.0)
    assert_close(gh, dz @ w, RTOL, "grad_hidden")
    assert_close(gw, dz.t() @ h, RTOL, "grad_weight")


def test_otr_weights_and_num_items():
    h, w, y = make(seed=17)
    a = otr_samples(y, w.shape[0], 3, seed=18)
    wt = torch.rand(y.shape, generator=torch.Generator().manual_seed(19))
    rows, _ = otr_expected(h, w, y, a, 0.1, True, 1.0)
    got = fastft.losses.otr(h, w, y, k=3, samples=a, weights=wt, num_items_in_batch=30)
    compare(got, (rows * wt).sum() / 30, h, w)


# ---- the Triton kernels (interpreter), one small case each ---------------------------------

@pytest.mark.interpreter
def test_triton_backend_matches_torch_formulas(monkeypatch):
    from fastft import backends
    from fastft.ops import linear_cross_entropy, linear_otr

    if not backends.interpreter_on():
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 (on CUDA each loss's backend "
                    "tests run these kernels)")
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    cpu = torch.device("cpu")
    assert backends.choose(linear_cross_entropy.INFO, cpu) == "triton"
    assert backends.choose(linear_otr.INFO, cpu) == "triton"
    h, w, y = make(T=7, H=16, V=37, seed=20, ignore=(3,))
    wt = torch.rand(y.shape, generator=torch.Generator().manual_seed(21)) + 0.5
    s = logits(h, w, softcap=4.0, temperature=0.8)
    keep = y != -100
    rows = (F.cross_entropy(s, y, reduction="none", label_smoothing=0.1)
            + 0.02 * torch.logsumexp(s, -1) ** 2) * wt
    got = fastft.losses.cross_entropy(h, w, y, label_smoothing=0.1, z_loss=0.02, softcap=4.0,
                                      temperature=0.8, weights=wt)
    compare(got, torch.where(keep, rows, 0.0).sum() / keep.sum(), h, w)

    rows, keep = dft_rows(logits(h, w), y)
    compare(fastft.losses.dft(h, w, y, num_items_in_batch=9), rows.sum() / 9, h, w)

    g = torch.Generator().manual_seed(22)
    h_ref = h.detach() + 0.5 * torch.randn(h.shape, generator=g)
    w_ref = w.detach() + 0.3 * torch.randn(w.shape, generator=g)
    rows, keep = asft_expected(h, w, y, h_ref, w_ref, 0.2)
    got = fastft.losses.asft(h, w, y, ref_hidden=h_ref, ref_weight=w_ref, kl_coef=0.2)
    compare(got, rows.sum() / keep.sum(), h, w)

    a = otr_samples(y, w.shape[0], 4, seed=23)
    rows, keep = otr_expected(h, w, y, a, 0.2, True, 0.7)
    got = fastft.losses.otr(h, w, y, k=4, samples=a, beta=0.2, temperature=0.7)
    compare(got, rows.sum() / keep.sum(), h, w)
