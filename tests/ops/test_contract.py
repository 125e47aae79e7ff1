"""The op contract: backend choice and fallback, fake tensors, meta device, FLOP counting."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import fastft
from fastft import backends
from fastft.ops import linear_cross_entropy as ce_op


def test_every_op_is_registered_with_known_backends():
    ops = backends.registered()
    assert {"fastft::linear_cross_entropy", "fastft::linear_otr", "fastft::linear_grpo",
            "fastft::linear_logprobs"} <= set(ops)
    for info in ops.values():
        assert set(info.backends) <= set(backends.BACKENDS)
        assert hasattr(torch.ops.fastft, info.name.split("::")[1])


def test_default_choice_by_device(monkeypatch):
    monkeypatch.delenv("FASTFT_BACKEND", raising=False)
    assert backends.choose(ce_op.INFO, torch.device("cpu")) == "cpp"
    assert backends.choose(ce_op.INFO, torch.device("cuda")) == "triton"


def test_requested_backend_falls_back_along_the_chain(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    b, note = backends.explain(ce_op.INFO, torch.device("cpu"))
    assert b == "cpp"
    assert "TRITON_INTERPRET=1" in note and "cuda:" in note
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.choose(ce_op.INFO, torch.device("cpu")) == "triton"
    monkeypatch.setenv("FASTFT_BACKEND", "cuda")
    b, note = backends.explain(ce_op.INFO, torch.device("cpu"))
    assert b == "cpp" and "cuda:" in note
    assert backends.choose(ce_op.INFO, torch.device("cuda")) == "torch"
    monkeypatch.setenv("FASTFT_BACKEND", "reference")
    assert backends.choose(ce_op.INFO, torch.device("cuda")) == "reference"


def test_fake_tensors_trace_forward_and_backward_without_kernels():
    with FakeTensorMode():
        h = torch.empty(4096, 512, requires_grad=True)
        w = torch.empty(32768, 512, requires_grad=True)
        y = torch.zeros(4096, dtype=torch.long)
        loss = fastft.losses.cross_entropy(h, w, y)
        gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.shape == () and gh.shape == h.shape and gw.shape == w.shape


def test_meta_device_shapes_per_reduction():
    h = torch.empty(2, 3, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(100, 16, device="meta", dtype=torch.bfloat16)
    y = torch.zeros(2, 3, device="meta", dtype=torch.long)
    out = fastft.losses.cross_entropy(h, w, y, reduction="none")
    assert out.shape == (2, 3) and out.dtype == torch.float32
    (gh,) = torch.autograd.grad(out.sum(), (h,))
    assert gh.shape == h.shape and gh.dtype == torch.bfloat16


def test_flop_counter_sees_the_fused_gemms():
    T, H, V = 64, 32, 500
    h = torch.randn(T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (T,))
    with FlopCounterMode(display=False) as fc:
        fastft.losses.cross_entropy(h, w, y).backward()
    assert fc.get_total_flops() == 3 * 2 * T * V * H
    w.requires_grad_(False)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fastft.losses.cross_entropy(h, w, y)
    assert fc.get_total_flops() == 2 * T * V * H


def test_fake_tensors_trace_every_loss():
    with FakeTensorMode():
        h = torch.empty(2, 64, 32, requires_grad=True)
        w = torch.empty(500, 32, requires_grad=True)
        y = torch.zeros(2, 64, dtype=torch.long)
        losses = [
            fastft.losses.dft(h, w, y),
            fastft.losses.asft(h, w, y, ref_hidden=torch.empty(2, 64, 32)),
            fastft.losses.otr(h, w, y, k=4),
            fastft.losses.grpo(h, w, y, torch.zeros(2), mask=torch.ones(2, 64))[0],
        ]
        for loss in losses:
            gh, gw = torch.autograd.grad(loss, (h, w))
            assert loss.shape == () and gh.shape == h.shape and gw.shape == w.shape
        lp = fastft.losses.selective_logprobs(h, w, y)
    assert lp.shape == (2, 64)


def test_flop_counter_for_the_loss_family():
    T, H, V = 32, 16, 200
    unit = 2 * T * V * H
    h = torch.randn(T, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (T,))
    cases = [(lambda: fastft.losses.otr(h, w, y, k=2), 3),
             (lambda: fastft.losses.asft(h, w, y, ref_hidden=h.detach()), 4),
             (lambda: fastft.losses.grpo(h[None], w, y[None], torch.ones(1),
                                         mask=torch.ones(1, T))[0], 3),
             (lambda: fastft.losses.grpo(h[None], w, y[None], torch.ones(1),
                                         mask=torch.ones(1, T), old_logps=torch.zeros(1, T),
                                         importance_level="sequence")[0], 4)]
    for fn, units in cases:
        with FlopCounterMode(display=False) as fc:
            fn().backward()
        assert fc.get_total_flops() == units * unit
