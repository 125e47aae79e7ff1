"""fastft.losses.otr: exact parity with given samples, and the in-kernel sampler itself."""

import os

import pytest
import torch
from fastft.kernels import gumbel_sample

import fastft
from fastft.ops import gumbel_torch, row_backends
from fastft.reference import losses as ref

from ..helpers import RTOL, assert_close, check_pair, grads_of, head_inputs

pytestmark = pytest.mark.interpreter


def draws(T, V, k, seed=5, device="cpu"):
    return torch.randint(0, V, (T, k), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,H,V,k", [(37, 24, 1000, 8), (1, 16, 77, 1), (67, 8, 5003, 3)])
@pytest.mark.parametrize("include_target", [True, False])
def test_given_samples_match_reference(backend, device, dtype, T, H, V, k, include_target):
    h, w, y = head_inputs(T, H, V, dtype, ignore_every=4, device=device)
    s = draws(T, V, k, device=device)
    s[0, 0] = y[0] if y[0] >= 0 else 0  # one sample that hits its target
    otr_k = lambda *a, **kw: fastft.losses.otr(*a, k=k, **kw)  # noqa: E731
    check_pair(otr_k, ref.otr, h, w, RTOL[dtype], y, samples=s, beta=0.3,
               include_target=include_target)


@pytest.mark.parametrize("kw", [dict(reduction="none"), dict(reduction="sum"),
                                dict(temperature=0.7, softcap=4.0), dict(beta=0.0)], ids=str)
def test_options_match_reference(backend, device, kw):
    h, w, y = head_inputs(29, 16, 300, ignore_every=3, seed=2, device=device)
    s = draws(29, 300, 4, device=device)
    check_pair(lambda *a, **k: fastft.losses.otr(*a, k=4, **k), ref.otr, h, w, 1e-5, y,
               samples=s, **kw)


def test_drawn_samples_are_the_ones_the_loss_used(backend, device):
    h, w, y = head_inputs(25, 16, 200, ignore_every=5, device=device)
    loss, s = fastft.losses.otr(h, w, y, k=6, seed=11, temperature=0.9, return_samples=True)
    assert s.shape == (25, 6) and s.dtype == torch.int64 and ((s >= 0) & (s < 200)).all()
    expect = ref.otr(h, w, y, samples=s, temperature=0.9)
    assert_close(loss, expect, 1e-5)
    gh, gw = grads_of(loss, (h, w))
    eh, ew = grads_of(expect, (h, w), torch.full_like(expect, 1.3))
    assert_close(gh, eh, 1e-5)
    assert_close(gw, ew, 1e-5)


def test_same_seed_same_samples_whatever_the_chunking(backend, device, monkeypatch):
    h, w, y = head_inputs(30, 8, 100, device=device)
    with torch.no_grad():
        _, a = fastft.losses.otr(h, w, y, k=5, seed=42, return_samples=True)
        monkeypatch.setenv("FASTFT_LOSS_CHUNK", "7")
        _, b = fastft.losses.otr(h, w, y, k=5, seed=42, return_samples=True)
        _, c = fastft.losses.otr(h, w, y, k=5, seed=43, return_samples=True)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.5


# The Triton sampler draws the torch one's stream (test_triton_sampler_draws_the_torch_stream)
# and passes the chi-square itself. The C++ sampler draws a stream of its own (inverse CDF),
# proven by its distribution and its determinism.
ON_CUDA = os.environ.get("FASTFT_TEST_DEVICE") == "cuda"
SAMPLERS = ["torch", "triton"] if ON_CUDA else ["torch", "triton", "cpp"]
SLOW = {"triton"} if not ON_CUDA else set()  # the interpreter: ~20 s a case, one case here


def chi_square(samples, probs):
    counts = torch.bincount(samples.reshape(-1).cpu(), minlength=probs.numel()).double()
    expected = probs.double().cpu() * samples.numel()
    return ((counts - expected) ** 2 / expected).sum().item()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("temperature,softcap", [(1.0, 0.0), (0.5, 0.0), (0.8, 1.5)])
def test_sampler_follows_softmax_chi_square(device, sampler, temperature, softcap):
    """Many draws of one small distribution: chi-square against softmax(softcap(z) / t)."""
    if sampler in SLOW and not softcap:
        pytest.skip("the interpreter runs the softcap case of the Triton sampler only")
    V, rows, k = 10, 400, 8
    z = torch.linspace(-2.0, 1.5, V, device=device)
    chunk = z.expand(rows, V).contiguous()
    fn = row_backends.get(sampler).sample
    s = fn(chunk, k, seed=1234, row_offset=0, softcap=softcap, temperature=temperature)
    zd = z.double().cpu()
    if softcap:
        zd = torch.tanh(zd / softcap) * softcap
    assert chi_square(s, torch.softmax(zd / temperature, 0)) < 27.88  # p = 0.001, 9 dof
    # the K draws of a row are independent streams, not copies
    assert (s[:, 0] != s[:, 1]).float().mean() > 0.3


@pytest.mark.parametrize("k,splits", [(3, 1), (7, 3), (12, 2)])  # 12: two sweeps of 8
def test_triton_sampler_draws_the_torch_stream(device, k, splits):
    """The exponential race over spans of the row draws the samples of Gumbel-max with the
    same Philox stream (gumbel_torch), whatever the spans."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(40, 2500, generator=g) * 2).to(device)
    kw = dict(seed=2**40 + 17, row_offset=3, softcap=5.0, temperature=0.8)
    a = gumbel_sample.sample(z, k, splits=splits, **kw)
    b = gumbel_torch.sample(z, k, **kw)
    assert gumbel_sample.spans(40, 2500, splits)[0] == splits
    assert (a == b).float().mean() > 0.995  # ties in fp32 rounding are the only way to differ


@pytest.mark.parametrize("temps,splits", [((0.8, 0.8), 1), ((1.0, 0.6), 3)],
                         ids=["one-temperature", "two-temperatures-3-spans"])
def test_triton_sampler_gives_the_row_stats_of_its_samples_and_the_target(device, temps,
                                                                         splits):
    """The logsumexp at the model's temperature, and the gathered entries at the samples
    (drawn at their own temperature) then the target, as the row-stats kernel gives them."""
    from fastft.kernels import loss_rows

    temp, stemp = temps
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(17, 2600, generator=g) * 3).to(device)
    target = torch.randint(0, 2600, (17,), generator=g).to(device)
    target[::5] = -1  # masked rows
    s, idx, (lse, gathered, _, _) = gumbel_sample.sample_stats(
        z, 5, target, seed=7, row_offset=11, softcap=4.0, temperature=temp,
        sample_temperature=stemp, splits=splits)
    assert torch.equal(s, gumbel_sample.sample(z, 5, seed=7, row_offset=11, softcap=4.0,
                                               temperature=stemp, splits=splits))
    assert torch.equal(idx, torch.cat([s, target[:, None]], dim=1))
    want = loss_rows.row_stats(z, idx, softcap=4.0, temperature=temp, want_sum=False,
                               want_entropy=False)
    torch.testing.assert_close(lse, want[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(gathered, want[1])


@pytest.fixture(scope="module")
def cpp_sample():
    """The C++ sampler itself (never the torch fallback)."""
    from fastft import extensions

    assert extensions.load("gumbel_sample") is not None, "csrc/gumbel_sample.cpp did not build"
    return row_backends.get("cpp").sample


def test_cpp_sampler_is_a_pure_function_of_seed_row_and_k(cpp_sample):
    """The same draws whatever the chunking, the number of threads or K; another seed or
    another row draws others."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 1001, generator=g) * 2
    kw = dict(softcap=5.0, temperature=0.8)
    a = cpp_sample(z, 7, seed=2**40 + 17, row_offset=3, **kw)
    assert a.shape == (40, 7) and a.dtype == torch.int64 and ((a >= 0) & (a < 1001)).all()
    assert torch.equal(a, cpp_sample(z, 7, seed=2**40 + 17, row_offset=3, **kw))
    parts = [cpp_sample(z[i:j], 7, seed=2**40 + 17, row_offset=3 + i, **kw)
             for i, j in ((0, 13), (13, 14), (14, 40))]
    assert torch.equal(torch.cat(parts), a)
    assert torch.equal(cpp_sample(z, 4, seed=2**40 + 17, row_offset=3, **kw), a[:, :4])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpp_sample(z, 7, seed=2**40 + 17, row_offset=3, **kw), a)
    finally:
        torch.set_num_threads(threads)
    assert (cpp_sample(z, 7, seed=2**40 + 18, row_offset=3, **kw) != a).float().mean() > 0.5
    assert (cpp_sample(z, 7, seed=2**40 + 17, row_offset=4, **kw)[:-1] != a[1:]).float().mean() \
        > 0.5
    assert (a[:, 0] != a[:, 1]).float().mean() > 0.5


def test_cpp_sampler_over_a_large_vocabulary(cpp_sample):
    """Mass in a few entries spread over the blocks of a row of 33001 (the last block
    partial): chi-square over them, and nothing drawn elsewhere."""
    V, rows, k = 33001, 64, 50
    hot = torch.tensor([0, 127, 128, 16000, 32999, 33000])
    z = torch.full((rows, V), -40.0)
    z[:, hot] = torch.tensor([0.5, 1.0, -0.5, 0.0, 1.5, 0.2])
    s = cpp_sample(z, k, seed=5, row_offset=0, softcap=0.0, temperature=0.9)
    assert torch.isin(s, hot).all()
    pos = torch.searchsorted(hot, s)
    assert chi_square(pos, torch.softmax(z[0, hot].double() / 0.9, 0)) < 20.52  # p = .001, 5 dof


def test_gradient_accumulation_with_given_samples(backend, device):
    h, w, y = head_inputs(40, 16, 211, ignore_every=3, seed=3, device=device)
    s = draws(40, 211, 4, device=device)
    full = fastft.losses.otr(h, w, y, k=4, samples=s)
    gh, gw = grads_of(full, (h, w), torch.ones_like(full))
    n = (y != -100).sum()
    acc_h, acc_w, total = torch.zeros_like(h), torch.zeros_like(w), 0.0
    for a, b in ((0, 17), (17, 40)):
        part = fastft.losses.otr(h[a:b], w, y[a:b], k=4, samples=s[a:b], num_items_in_batch=n)
        ph, pw = grads_of(part, (h, w), torch.ones_like(part))
        acc_h, acc_w, total = acc_h + ph, acc_w + pw, total + part
    assert_close(total, full, 1e-5)
    assert_close(acc_h, gh, 1e-5)
    assert_close(acc_w, gw, 1e-5)


def test_all_rows_masked(backend, device):
    h, w, y = head_inputs(5, 8, 40, device=device)
    y[:] = -100
    out = fastft.losses.otr(h, w, y, k=3)
    gh, gw = grads_of(out, (h, w))
    assert out.item() == 0 and not gh.any() and not gw.any()


def test_cpp_backend_is_the_default_on_cpu_and_its_samples_give_the_torch_loss(monkeypatch):
    """The cpp backend draws its own stream (the same for the same seed); with those samples
    given, the torch backend computes the same loss."""
    h, w, y = head_inputs(20, 8, 150, ignore_every=4)
    monkeypatch.delenv("FASTFT_BACKEND", raising=False)
    from fastft import backends
    from fastft.ops import linear_otr

    assert backends.choose(linear_otr.INFO, torch.device("cpu")) == "cpp"
    with torch.no_grad():
        a, sa = fastft.losses.otr(h, w, y, k=5, seed=9, return_samples=True)
        again, s_again = fastft.losses.otr(h, w, y, k=5, seed=9, return_samples=True)
        monkeypatch.setenv("FASTFT_BACKEND", "torch")
        b = fastft.losses.otr(h, w, y, k=5, samples=sa)
    assert torch.equal(sa, s_again) and torch.equal(a, again)
    assert_close(a, b, 1e-6)


def test_the_sampler_compiles_once_whatever_the_seed():
    """Triton specialises integer arguments on their value (== 1, divisible by 16): a fresh
    seed per call compiled a new sampler in the middle of training (about 2 s each, an H200's
    OTR step measured at 10x its 96 ms). The seed and the chunk's row offset are exempt."""
    import os
    import subprocess
    import sys

    code = ("from fastft.kernels import gumbel_sample as g\n"
            "print(sorted(p.name for p in g.race_kernel.params "
            "if p.do_not_specialize))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real JIT
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "['row_offset', 'seed']"
