"""The row kernels against the torch rows: Triton (kernels/loss_rows.py, interpreter) and
C++ (csrc/loss_rows.cpp, the "cpp" backend)."""

import pytest
import torch
from fastft.kernels import loss_rows

from fastft.ops import loss_rows_torch

from ..helpers import assert_close

interpreter = pytest.mark.interpreter


def inputs(C, V, J, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(C, V, generator=g) * 3).to(dtype)
    idx = torch.randint(0, V, (C, J), generator=g)
    idx[0, 0] = -1  # "no entry"
    if C > 2:
        idx[2, -1] = V + 5  # out of range: must read nothing
    return z.to(device), idx.to(device)


@interpreter
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


@interpreter
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


@interpreter
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


@interpreter
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


# ---- the C++ rows (csrc/loss_rows.cpp) against the torch rows --------------------------------

TRANSFORMS = [(0.0, 1.0), (0.0, 0.7), (5.0, 0.8), (30.0, 1.0)]


@pytest.fixture(scope="module")
def cpp():
    """The "cpp" rows, built here (never the torch fallback: that would compare torch to torch)."""
    from fastft import extensions
    from fastft.ops import row_backends

    assert extensions.load("loss_rows") is not None, "csrc/loss_rows.cpp did not build"
    rows = row_backends.get("cpp")
    assert rows.row_stats is not loss_rows_torch.row_stats
    return rows


def _entropy(z, softcap, temperature):
    """The entropy of softmax(s) in float64 (the torch rows' lse - E[s] in fp32 cancels: at
    V = 33001 it is off by 1e-4, where the C++ rows keep E[s - max] and are exact)."""
    s = z.double()
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s / temperature
    return -(torch.softmax(s, 1) * torch.log_softmax(s, 1)).sum(1)


def _stats_close(got, want, z, kw, rtol=1e-5):
    for name, a, b in zip(("lse", "gathered", "row_sum", "entropy"), got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        if name == "entropy":
            b = _entropy(z, kw["softcap"], kw["temperature"])
        assert_close(a, b, rtol, name)


# V = 7, 13, 1000, 5003, 33001: not multiples of the 8 lanes, and 33001 spans 65 blocks
@pytest.mark.parametrize("C,V,J", [(1, 7, 1), (3, 13, 2), (5, 1000, 1), (4, 5003, 3),
                                   (2, 33001, 2)])
@pytest.mark.parametrize("softcap,temperature", TRANSFORMS)
@pytest.mark.parametrize("want_sum,want_entropy", [(True, True), (False, False), (True, False),
                                                   (False, True)])
def test_cpp_row_stats(cpp, C, V, J, softcap, temperature, want_sum, want_entropy):
    z, idx = inputs(C, V, J)  # idx holds a -1 and (C > 2) an index past V
    kw = dict(softcap=softcap, temperature=temperature, want_sum=want_sum,
              want_entropy=want_entropy)
    _stats_close(cpp.row_stats(z, idx, **kw), loss_rows_torch.row_stats(z, idx, **kw), z, kw)


def test_cpp_row_stats_when_the_maximum_moves_across_blocks(cpp):
    """The online logsumexp raises its maximum block after block (ramps, a late spike)."""
    V = 4099
    ramp = torch.linspace(-60.0, 60.0, V)
    z = torch.stack([ramp, ramp.flip(0), torch.zeros(V), torch.full((V,), -3.0)])
    z[2, -1] = 80.0  # one spike in the last (partial) block
    z[3, ::997] = torch.tensor([5.0, 40.0, 41.0, 39.0, 70.0])
    idx = torch.tensor([[V - 1, 0], [0, V - 1], [V - 1, 5], [997, 3988]])
    kw = dict(softcap=0.0, temperature=1.0, want_sum=True, want_entropy=True)
    _stats_close(cpp.row_stats(z, idx, **kw), loss_rows_torch.row_stats(z, idx, **kw), z, kw)


def test_cpp_row_stats_reads_half_precision_and_strided_logits(cpp):
    z, idx = inputs(3, 1001, 2, torch.bfloat16)
    kw = dict(softcap=5.0, temperature=0.8, want_sum=True, want_entropy=True)
    _stats_close(cpp.row_stats(z, idx, **kw), loss_rows_torch.row_stats(z, idx, **kw), z, kw)
    zt = inputs(1001, 3, 1)[0].t()  # column stride 3: made contiguous before the kernel
    _stats_close(cpp.row_stats(zt, idx, **kw), loss_rows_torch.row_stats(zt, idx, **kw), zt,
                 kw)


def test_cpp_row_stats_match_the_reference_formulas(cpp):
    """lse and entropy of the reference's logits (fastft.reference), gathered labels."""
    from fastft.reference import losses as ref

    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(6, 32, generator=g), torch.randn(517, 32, generator=g) / 3
    y = torch.randint(0, 517, (6, 1), generator=g)
    s = ref.logits(h, w, softcap=4.0, temperature=0.9)
    lse, gathered, _, entropy = cpp.row_stats(h @ w.t(), y, softcap=4.0, temperature=0.9,
                                              want_sum=False, want_entropy=True)
    assert_close(lse, torch.logsumexp(s, 1), 1e-5, "lse")
    assert_close(gathered[:, 0], s.gather(1, y)[:, 0], 1e-5, "gathered")
    p = torch.softmax(s.double(), 1)
    assert_close(entropy, -(p * p.log()).sum(1), 1e-5, "entropy")


def _grad_inputs(C, V, J, softcap, temperature, seed=1):
    z, idx = inputs(C, V, J)
    if J > 1:
        idx[-1, 1] = idx[-1, 0]  # a repeated entry: both terms add up
    g = torch.Generator().manual_seed(seed)
    zr = z + torch.randn(C, V, generator=g)
    kw = dict(softcap=softcap, temperature=temperature, want_sum=False, want_entropy=False)
    lse = loss_rows_torch.row_stats(z, idx, **kw)[0]
    lse_r = loss_rows_torch.row_stats(zr, idx, **kw)[0]
    c, u, lam = torch.rand(C, generator=g), torch.randn(C, generator=g) * 1e-3, \
        torch.rand(C, generator=g)
    w = torch.rand(C, J, generator=g)
    return z, idx, zr, lse, lse_r, c, u, lam, w


def _grad_exact(z, lse, c, u, idx, w, softcap, temperature, ref):
    """dz and KL of the row_grad contract in float64 (the fp32 torch rows round c p - lam p_ref
    about as far off as the C++ rows, in other places)."""
    def transform(x):
        x = x.double()
        if softcap:
            t = torch.tanh(x / softcap)
            return t * softcap / temperature, (1.0 - t * t) / temperature
        return x / temperature, torch.full_like(x, 1.0 / temperature)

    s, chain = transform(z)
    log_p = s - lse.double()[:, None]
    ds = c.double()[:, None] * log_p.exp() + u.double()[:, None]
    kl = None
    if ref is not None:
        log_pr = transform(ref[0])[0] - ref[1].double()[:, None]
        kl = (log_pr.exp() * (log_pr - log_p)).sum(1)
        ds = ds - ref[2].double()[:, None] * log_pr.exp()
    V = z.shape[1]
    ok = (idx >= 0) & (idx < V)
    ds.scatter_add_(1, idx.clamp(0, V - 1), torch.where(ok, -w.double(), 0.0))
    return ds * chain, kl


@pytest.mark.parametrize("C,V,J", [(1, 7, 1), (3, 13, 2), (5, 1000, 2), (3, 9001, 3)])
@pytest.mark.parametrize("softcap,temperature", TRANSFORMS)
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("out", ["new", "in_place", "bf16", "none"])
def test_cpp_row_grad(cpp, C, V, J, softcap, temperature, with_ref, out):
    """dz (into a new buffer, over the logits themselves, into bf16, or not at all) and the
    KL of the reference rows."""
    z, idx, zr, lse, lse_r, c, u, lam, w = _grad_inputs(C, V, J, softcap, temperature)
    kw = dict(softcap=softcap, temperature=temperature)
    want = None if out == "none" else torch.empty(C, V)
    kl_want = loss_rows_torch.row_grad(z, lse, c, u, idx, w, want,
                                       ref=(zr, lse_r, lam) if with_ref else None, **kw)
    zz = z.clone()
    got = {"new": torch.empty(C, V), "in_place": zz, "none": None,
           "bf16": torch.empty(C, V, dtype=torch.bfloat16)}[out]
    kl = cpp.row_grad(zz, lse, c, u, idx, w, got, ref=(zr, lse_r, lam) if with_ref else None,
                      **kw)
    dz_exact, kl_exact = _grad_exact(z, lse, c, u, idx, w, softcap, temperature,
                                     (zr, lse_r, lam) if with_ref else None)
    if with_ref:
        assert kl.shape == (C,) and kl.dtype == torch.float32
        assert_close(kl, kl_want, 1e-5, "kl")
        assert_close(kl, kl_exact, 1e-5, "kl (float64)")
    else:
        assert kl is None and kl_want is None
    if out == "none":
        assert torch.equal(zz, z)  # nothing written
    elif out == "bf16":
        assert_close(got, want, 1e-2, "dz")
    else:
        assert_close(got, want, 2e-6, "dz")
        assert_close(got, dz_exact, 1e-6, "dz (float64)")


def test_cpp_row_grad_in_place_over_logits_with_row_stride(cpp):
    """A row-strided view of the logits, overwritten by dz; the padding stays untouched."""
    z, idx = inputs(4, 300, 2)
    big = torch.zeros(4, 320)
    big[:, :300] = z
    view = big[:, :300]
    kw = dict(softcap=5.0, temperature=0.8)
    lse = loss_rows_torch.row_stats(z, idx, **kw, want_sum=False, want_entropy=False)[0]
    c, u, w = torch.ones(4), torch.zeros(4), torch.ones(4, 2)
    want = torch.empty_like(z)
    loss_rows_torch.row_grad(z, lse, c, u, idx, w, want, **kw)
    assert cpp.row_grad(view, lse, c, u, idx, w, view, **kw) is None
    assert_close(view, want, 1e-6)
    assert torch.all(big[:, 300:] == 0)


def test_cpp_row_grad_matches_autograd_of_cross_entropy(cpp):
    """dz of sum_t CE_t = p - e_y through the softcap, as autograd differentiates it."""
    import torch.nn.functional as F

    z, idx = inputs(5, 777, 1)
    idx[0, 0] = 3
    idx[2, 0] = 10
    zg = z.clone().requires_grad_()
    s = torch.tanh(zg / 6.0) * 6.0 / 0.9
    F.cross_entropy(s, idx[:, 0], reduction="sum").backward()
    lse = cpp.row_stats(z, idx, softcap=6.0, temperature=0.9, want_sum=False,
                        want_entropy=False)[0]
    ones, zeros = torch.ones(5), torch.zeros(5)
    dz = torch.empty_like(z)
    cpp.row_grad(z, lse, ones, zeros, idx, ones[:, None], dz, softcap=6.0, temperature=0.9)
    assert_close(dz, zg.grad, 1e-5)


def test_cpp_rows_use_64_bit_row_offsets(cpp, tmp_path):
    """Rows 2**31 + 64 floats apart (a sparse file mapped in memory: nothing is allocated)."""
    V, stride = 1003, 2**31 + 64
    path = tmp_path / "rows.bin"
    with open(path, "wb") as f:
        f.truncate((stride + V) * 4)
    try:
        base = torch.from_file(str(path), shared=True, size=stride + V, dtype=torch.float32)
    except RuntimeError as e:  # a file system without sparse files or mmap
        pytest.skip(f"cannot map a sparse file here: {e}")
    z = base.as_strided((2, V), (stride, 1))
    z0, idx = inputs(2, V, 2)
    z.copy_(z0)
    kw = dict(softcap=5.0, temperature=0.8)
    _stats_close(cpp.row_stats(z, idx, **kw, want_sum=True, want_entropy=True),
                 loss_rows_torch.row_stats(z0, idx, **kw, want_sum=True, want_entropy=True), z0,
                 kw)
    lse = loss_rows_torch.row_stats(z0, idx, **kw, want_sum=False, want_entropy=False)[0]
    c, u, w = torch.rand(2), torch.zeros(2), torch.rand(2, 2)
    want = torch.empty_like(z0)
    loss_rows_torch.row_grad(z0, lse, c, u, idx, w, want, **kw)
    cpp.row_grad(z, lse, c, u, idx, w, z, **kw)  # in place, over the mapped rows
    assert_close(z, want, 1e-6)
    drawn = cpp.sample(z0, 5, seed=3, row_offset=0, **kw)
    z.copy_(z0)
    assert torch.equal(cpp.sample(z, 5, seed=3, row_offset=0, **kw), drawn)
    del z, base
