"""kernels/lora_matmul.py (interpreter on CPU) and the fastft::lora_linear op against the reference."""

import pytest
import torch
from fastft.kernels import lora_matmul

from fastft.reference import lora as ref

from ..helpers import RTOL, assert_close

pytestmark = pytest.mark.interpreter


def rand(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype)


@pytest.mark.parametrize("M,N,K1,K2", [(37, 50, 70, 5), (64, 64, 64, 16), (1, 33, 17, 3),
                                       (130, 40, 96, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_dual_matmul(device, M, N, K1, K2, dtype, bias):
    a1 = rand(M, K1, dtype=dtype, device=device)
    w = rand(N, K1, dtype=dtype, device=device, seed=1)  # b1 = w.T: a transposed operand
    a2 = rand(M, K2, dtype=dtype, device=device, seed=2) if K2 else None
    b2 = rand(K2, N, dtype=dtype, device=device, seed=3) if K2 else None
    b = rand(N, dtype=dtype, device=device, seed=4) if bias else None
    got = lora_matmul.dual_matmul(a1, w.t(), a2, b2, b)
    want = a1.float() @ w.float().t()
    if K2:
        want += a2.float() @ b2.float()
    if bias:
        want += b.float()
    assert got.dtype == dtype and got.shape == (M, N)
    assert_close(got, want, {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype])


def lora_inputs(T, n_in, n_out, r, dtype, device, bias=False, sb=False, adapter_dtype=None):
    x = rand(T, n_in, dtype=dtype, device=device).requires_grad_()
    w = rand(n_out, n_in, dtype=dtype, device=device, seed=1, scale=n_in**-0.5)
    adt = adapter_dtype or dtype
    a = rand(r, n_in, dtype=adt, device=device, seed=2, scale=n_in**-0.5).requires_grad_(not sb)
    b = rand(n_out, r, dtype=adt, device=device, seed=3, scale=0.5).requires_grad_(not sb)
    rr = rand(r, r, dtype=adt, device=device, seed=5).requires_grad_() if sb else None
    bb = rand(n_out, dtype=dtype, device=device, seed=4).requires_grad_() if bias else None
    return x, w, bb, a, b, rr


def run_both(x, w, bias, a, b, rr, scale):
    y, _ = torch.ops.fastft.lora_linear(x, w, bias, a, b, rr, scale)
    want = ref.lora_linear(x, w, bias, a, b, rr, scale)
    params = [t for t in (x, bias, a, b, rr) if t is not None and t.requires_grad]
    up = torch.randn_like(want)
    got_g = torch.autograd.grad(y, params, up)
    want_g = torch.autograd.grad(want, params, up)
    return y, want, got_g, want_g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,n_in,n_out,r", [(37, 48, 40, 4), (1, 16, 24, 8), (70, 33, 65, 3),
                                          (9, 16, 48, 40)])  # 40: past the fused dy kernel
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_matches_reference(backend, device, dtype, T, n_in, n_out, r, bias):
    x, w, bb, a, b, _ = lora_inputs(T, n_in, n_out, r, dtype, device, bias)
    y, want, got_g, want_g = run_both(x, w, bb, a, b, None, 2.0)
    rtol = RTOL[dtype] if dtype == torch.float32 else RTOL[dtype] * 2
    assert_close(y, want, rtol, "y")
    for i, (g1, g2) in enumerate(zip(got_g, want_g)):
        assert g1.dtype == g2.dtype
        assert_close(g1, g2, rtol, f"grad {i}")


def test_lora_sb_and_fp32_adapter_on_half_base(backend, device):
    """LoRA-SB's R gets the gradient (A, B frozen); fp32 adapters beside an fp16 base (PEFT's way)."""
    x, w, bb, a, b, rr = lora_inputs(29, 32, 40, 6, torch.float32, device, sb=True)
    y, want, got_g, want_g = run_both(x, w, bb, a, b, rr, 1.0)
    assert_close(y, want, 1e-5)
    for g1, g2 in zip(got_g, want_g):
        assert_close(g1, g2, 1e-5)
    x, w, bb, a, b, _ = lora_inputs(29, 32, 40, 6, torch.float16, device,
                                    adapter_dtype=torch.float32)
    y, want, got_g, want_g = run_both(x, w, bb, a, b, None, 0.5)
    assert y.dtype == torch.float16
    for g1, g2 in zip(got_g, want_g):
        assert g1.dtype == g2.dtype
        assert_close(g1, g2, 4e-3)


def test_frozen_base_gets_no_gradient_and_stride_zero_upstream(backend, device):
    x, w, _, a, b, _ = lora_inputs(11, 16, 12, 2, torch.float32, device)
    w.requires_grad_(True)
    y, _ = torch.ops.fastft.lora_linear(x, w, None, a, b, None, 1.0)
    gx, gw, ga = torch.autograd.grad(y.sum(), (x, w, a), allow_unused=True)  # stride-0 upstream
    assert gw is None
    want = torch.autograd.grad(ref.lora_linear(x, w, None, a, b).sum(), (x, a))
    assert_close(gx, want[0], 1e-5)
    assert_close(ga, want[1], 1e-5)


def test_the_checked_layouts_are_the_ones_that_run(monkeypatch):
    """fastft check-kernels compiles dual_matmul with the hints of aot_specs: every stride the
    op passes at LLM shapes (sizes and rank multiples of 16) is 1 where the spec says 1 and
    divisible by 16 where it says 16, in the forward and in the backward for dX."""
    seen = []
    real = lora_matmul.dual_matmul

    def spy(a1, b1, a2, b2, bias=None, out_dtype=None):
        names = ("s_a1m", "s_a1k", "s_b1k", "s_b1n", "s_a2m", "s_a2k", "s_b2k", "s_b2n")
        strides = (*a1.stride(), *b1.stride(), *a2.stride(), *b2.stride())
        seen.append(dict(zip(names, strides)))
        return real(a1, b1, a2, b2, bias, out_dtype)

    monkeypatch.setattr(lora_matmul, "dual_matmul", spy)
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    x, w, b, a, bb, rr = lora_inputs(32, 64, 48, 16, torch.float32, "cpu", bias=True)
    y, _ = torch.ops.fastft.lora_linear(x, w, b, a, bb, rr, 2.0)
    y.sum().backward()
    fwd, dx = seen
    hints = {s["config"].split()[-2]: s["hints"] for s in lora_matmul.aot_specs()}
    for got, layout in ((fwd, hints["fwd"]), (dx, hints["dx"])):
        for name, stride in got.items():
            want = layout.get(name)
            assert want is not None, f"{name} has no hint: the checked variant is not the one that runs"
            assert (stride == 1) if want == 1 else (stride % want == 0), (name, stride, want)


@pytest.mark.parametrize("sb,bias", [(False, True), (True, False)])
def test_the_eager_path_is_the_custom_op_bit_for_bit(backend, device, sb, bias):
    """lora_linear.apply skips the custom-op dispatcher for plain tensors: the same
    implementation, so the same output and gradients, to the bit."""
    from fastft.ops import lora_linear as op

    x, w, bb, a, b, rr = lora_inputs(23, 32, 40, 4, torch.float32, device, bias, sb=sb)
    params = [t for t in (x, bb, a, b, rr) if t is not None and t.requires_grad]
    y = op.apply(x, w, bb, a, b, rr, 1.5)
    want, _ = torch.ops.fastft.lora_linear(x, w, bb, a, b, rr, 1.5)
    up = torch.randn_like(want)
    assert torch.equal(y, want)
    for g1, g2 in zip(torch.autograd.grad(y, params, up), torch.autograd.grad(want, params, up)):
        assert torch.equal(g1, g2)


def test_fake_tensors_and_the_flop_counter_take_the_custom_op():
    """Under a dispatch mode (fake tensors, fastft.profile's FLOP counter) apply runs the
    custom op, whose fake implementation and FLOP formula those modes need."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from fastft import backends
    from fastft.ops import lora_linear as op

    x, w, _, a, b, _ = lora_inputs(8, 16, 24, 4, torch.float32, "cpu")
    assert backends.eager_ok(x, w, None, a, b, None)
    with FlopCounterMode(display=False) as fc:
        assert not backends.eager_ok(x, w, None, a, b, None)
        op.apply(x, w, None, a, b, None, 1.0).sum().backward()
    assert fc.get_total_flops() > 2 * 8 * 16 * 24 * 3
    with FakeTensorMode():
        fx = torch.empty(4096, 1024, requires_grad=True)
        fw, fa, fb = torch.empty(4096, 1024), torch.empty(16, 1024), torch.empty(4096, 16)
        y = op.apply(fx, fw, None, fa.requires_grad_(), fb, None, 2.0)
        (gx,) = torch.autograd.grad(y.sum(), (fx,))
    assert y.shape == (4096, 4096) and gx.shape == fx.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,N,r,splits", [(70, 100, 5, 3), (33, 64, 32, 1), (1, 40, 16, None)])
def test_dy_b_and_db_read_dy_once_and_match_two_gemms(device, dtype, T, N, r, splits):
    """The fused kernel of the backward's two rank-r products against torch's GEMMs (fp32
    accumulation of the same operands), over several N blocks and T spans, odd sizes."""
    from fastft.kernels import lora_matmul

    dy = rand(T, N, dtype=dtype, device=device, seed=7)
    b = rand(N, r, dtype=dtype, device=device, seed=8)
    xs = rand(T, r, dtype=dtype, device=device, seed=9)
    dyb, db = lora_matmul.dy_b_and_db(dy, b, xs, splits=splits)
    assert dyb.dtype == db.dtype == torch.float32 and dyb.shape == (T, r) and db.shape == (N, r)
    assert_close(dyb, dy.float() @ b.float(), 1e-5)
    assert_close(db, dy.float().t() @ xs.float(), 1e-5)
