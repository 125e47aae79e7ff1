"""The Walsh-Hadamard transform and the fake quantizers against formulas written here."""

import math

import pytest
import torch

import fastft
from fastft import FastftError
from fastft.ops import fake_quant_act, fake_quant_weight, hadamard
from fastft.ops.hadamard_factors import MAX_K, construction, is_hadamard, kfactor, plan
from fastft.reference import quant as ref

SHIPPED_K = [k for k in range(4, MAX_K + 1, 4) if construction(k)]


def entries(n: int, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Output entries ``rows`` of the normalised transform of x [n], by the closed form
    H[k, j] = H_K[k // P, j // P] (-1)^popcount((k % P) & (j % P)), in fp64."""
    K, P = plan(n)
    hk = kfactor(K)
    j = torch.arange(n)
    out = []
    for k in rows.tolist():
        bits = (k % P) & (j % P)
        sign = 1.0 - 2.0 * (torch.tensor([bin(b).count("1") for b in bits.tolist()]) % 2)
        out.append((hk[k // P, j // P] * sign * x.double()).sum() / math.sqrt(n))
    return torch.stack(out)


@pytest.mark.parametrize("n", [2**e for e in range(16)] + [k * 4 for k in SHIPPED_K]
                         + [43 * 256, 28 * 512, 148 * 128, 80, 96, 192])
def test_transform_matches_the_closed_form(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, generator=g)
    y = hadamard(x)
    rows = torch.randint(0, n, (6,), generator=g)
    for r in range(2):
        torch.testing.assert_close(y[r, rows].double(), entries(n, rows, x[r]), rtol=1e-5,
                                   atol=1e-5)
    torch.testing.assert_close(hadamard(y, transpose=True), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3),
                                       (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("n", [1, 64, 12 * 8, 20 * 4, 43 * 4, 4096])
def test_transform_matches_the_dense_reference_and_inverts(n, dtype, tol):
    x = torch.randn(3, 5, n).to(dtype).requires_grad_()
    y = hadamard(x)
    assert y.dtype == dtype and y.shape == x.shape
    expect = ref.hadamard(x.detach().double())
    torch.testing.assert_close(y.double(), expect, rtol=tol, atol=tol * expect.abs().max())
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)  # the backward is the transposed transform
    ge = ref.hadamard(g.double(), transpose=True)
    torch.testing.assert_close(gx.double(), ge, rtol=tol, atol=tol * ge.abs().max())
    back = hadamard(y.detach().float(), transpose=True)
    torch.testing.assert_close(back, x.detach().float(), rtol=tol, atol=4 * tol)


@pytest.mark.parametrize("K", SHIPPED_K + [43, 7, 3])
def test_factors_are_orthogonal(K):
    h = kfactor(K)
    torch.testing.assert_close(h @ h.t(), K * torch.eye(K, dtype=torch.float64), atol=1e-9,
                               rtol=0)
    if is_hadamard(K):
        assert bool((h.abs() == 1).all())


def test_real_model_sizes_have_factors():
    """Hidden, head and intermediate sizes of the common families."""
    for n in (64, 80, 96, 128, 192, 256, 896, 1536, 2048, 2304, 2560, 3072, 3584, 4096,
              4864, 5120, 5632, 8192, 8960, 9216, 11008, 13824, 14336, 18944, 28672, 32768):
        K, P = plan(n)
        assert K * P == n and K <= MAX_K


def torch_quant(x, bits, symmetric, c):
    """METHODS.md §4 written out: q(x) = (clamp(round(x / s) + z, qmin, qmax) - z) s."""
    out = torch.empty_like(x, dtype=torch.float32)
    for i, row in enumerate(x.float()):
        if symmetric:
            s = max(c * float(row.abs().max()) / (2 ** (bits - 1) - 1), 1e-8)
            q = torch.clamp(torch.round(row / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            out[i] = q * s
        else:
            s = max(c * float(row.max() - row.min()) / (2**bits - 1), 1e-8)
            z = round(-c * float(row.min()) / s)  # Python's round: half to even, as torch
            out[i] = (torch.clamp(torch.round(row / s) + z, 0, 2**bits - 1) - z) * s
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip", [1.0, 0.85])
def test_fake_quant_equals_the_formula_and_passes_gradients_straight(bits, symmetric, clip):
    x = (torch.randn(7, 40) * 3).requires_grad_()
    x.data[3] = 0.25  # a constant row: zero range
    y = fake_quant_act(x, bits, symmetric, clip)
    torch.testing.assert_close(y, torch_quant(x.detach(), bits, symmetric, clip), rtol=0,
                               atol=1e-6)
    assert len(torch.unique(y[0].detach())) <= 2**bits
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], g)
    w = torch.randn(6, 32, requires_grad=True)
    for group in (None, 8):
        q = fake_quant_weight(w, bits, symmetric, clip, group)
        rows = w.detach().reshape(-1, group) if group else w.detach()
        expect = torch_quant(rows, bits, symmetric, clip).reshape(6, 32)
        torch.testing.assert_close(q, expect, rtol=0, atol=1e-6)
        assert torch.equal(torch.autograd.grad(q, w, g[:6, :32])[0], g[:6, :32])


@pytest.mark.parametrize("symmetric", [False, True])
def test_torch_quantizer_scale_is_the_correctly_rounded_division(device, symmetric):
    """s = c range / (2^b - 1) divided as the kernels divide (IEEE, correctly rounded: the
    float64 quotient rounded to fp32 is). CUDA divides a tensor by a Python number as
    x * (1 / d), an ulp off for some rows, and the export then rejected the Triton
    quantizer's weights (on an H200); on the CPU the division was already exact."""
    from fastft.ops.fake_quant import row_qparams
    from fastft.quantize.packing import codes

    w = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)).to(device)
    for bits in (3, 4, 8):
        s, _ = row_qparams(w, bits, symmetric, 0.9)
        num = 0.9 * (w.abs().amax(1) if symmetric else w.amax(1) - w.amin(1))
        den = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
        assert torch.equal(s.flatten(), (num.double() / den).float().clamp(min=1e-8))
        codes(w, fake_quant_weight(w, bits, symmetric, 0.9, None), bits, symmetric, 0.9)


def test_rotated_fake_quant_is_quant_of_the_transform_with_the_transposed_gradient():
    x = torch.randn(4, 96, requires_grad=True)
    y = fake_quant_act(x, 4, False, 1.0, rotate=True)
    rotated = hadamard(x.detach())
    expect = torch_quant(rotated, 4, False, 1.0)
    step = (rotated.amax(1) - rotated.amin(1)) / 15
    # a rounding tie may fall either way within fp32 of the transform: at most one step
    assert bool(((y.detach() - expect).abs() <= step[:, None] * 1.001 + 1e-6).all())
    assert float((y.detach() - expect).abs().gt(1e-5).float().mean()) < 0.02
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0],
                               hadamard(g, transpose=True), rtol=1e-5, atol=1e-6)


def test_bad_input():
    with pytest.raises(FastftError, match="no orthogonal factor is shipped for size 1028"):
        hadamard(torch.randn(2, 257 * 4))
    with pytest.raises(FastftError, match="bits must be an integer in 2..8"):
        fake_quant_act(torch.randn(2, 8), bits=9)
    with pytest.raises(FastftError, match="bits must be an integer in 2..8"):
        fake_quant_weight(torch.randn(2, 8), bits=1)
    with pytest.raises(FastftError, match="clip_ratio must be in"):
        fake_quant_act(torch.randn(2, 8), clip_ratio=0.0)
    with pytest.raises(FastftError, match="group_size must divide"):
        fake_quant_weight(torch.randn(2, 8), group_size=3)
    with pytest.raises(FastftError, match="float32, float16 or bfloat16"):
        hadamard(torch.arange(8))


def test_meta_and_flops():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.empty(8, 96, device="meta")
    assert fastft.ops.hadamard(x).shape == (8, 96)
    with FlopCounterMode(display=False) as fc:
        hadamard(torch.randn(8, 96))
    assert fc.get_total_flops() > 0
