"""SparseAdamW against the reference masked AdamW, on every backend of fastft::sparse_adam_step."""

import pytest
import torch
from torch import nn

from fastft import FastftError, backends
from fastft.ops import sparse_adam as op
from fastft.optim import SparseAdamW, index_dtype, random_mask, state_bytes_for
from fastft.reference.optim import MaskedAdamW

from ..helpers import assert_close

SHAPES = [(37, 29), (5, 64), (300,)]  # odd sizes, a short matrix, a 1-d weight
HP = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)


@pytest.fixture(params=["triton", "cpp", "torch"])
def sparse_backend(request, monkeypatch):
    """Each fast backend of the op (Triton runs under the interpreter on the CPU)."""
    monkeypatch.setenv("FASTFT_BACKEND", request.param)
    if request.param == "triton":
        request.applymarker(pytest.mark.interpreter)
    return request.param


def make(shapes, dtype, device, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]
    masks = [random_mask(s, density, generator=g, device=device) for s in shapes]
    return params, masks


def clones(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def grads_for(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype) for p in params]


def check_against(opt, ref, params, ref_params, dtype):
    for i, (p, q) in enumerate(zip(params, ref_params)):
        if dtype == torch.float32:
            assert_close(p, q, 1e-6, f"weight {i}")
        else:  # within one rounding of the weight's dtype
            tol = torch.finfo(dtype).eps * q.float().abs() + torch.finfo(dtype).tiny
            assert ((p.float() - q.float()).abs() <= tol).all(), f"weight {i}"
        idx = opt.indices(i).long()
        st = opt.state[p]
        assert_close(st["exp_avg"], ref.exp_avg[i].view(-1)[idx], 1e-6, f"m {i}")
        assert_close(st["exp_avg_sq"], ref.exp_avg_sq[i].view(-1)[idx], 1e-6, f"v {i}")


@pytest.mark.parametrize("hooks", [False, True], ids=["grad", "hooks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_twenty_steps_match_the_reference(sparse_backend, device, dtype, hooks):
    """Gradients in .grad (one kernel per weight), or gathered by the hooks (one launch for
    all the weights of the bucket)."""
    params, masks = make(SHAPES, dtype, device)
    init = [p.detach().clone() for p in params]
    ref_params = clones(params)
    opt = SparseAdamW(params, masks, **HP)
    if hooks:
        opt.attach_hooks()
    ref = MaskedAdamW(ref_params, masks, **HP)
    for step in range(20):
        grads = grads_for(params, step)
        if hooks:
            torch.autograd.backward(params, grads)
        else:
            for p, g in zip(params, grads):
                p.grad = g
        opt.step()
        opt.zero_grad()
        ref.step(grads)
    check_against(opt, ref, params, ref_params, dtype)
    for p, p0, m in zip(params, init, masks):
        assert torch.equal(p[~m], p0[~m])  # untrained entries: bit-identical
        assert not torch.equal(p[m], p0[m])
    assert all(opt.state[p]["step"] == 20 for p in params)


def test_reference_backend_and_reference_equals_torch_adamw(device, monkeypatch):
    """The reference path of the op, and the reference itself against torch.optim.AdamW."""
    monkeypatch.setenv("FASTFT_BACKEND", "reference")
    params, masks = make(SHAPES[:2], torch.float32, device)
    ref_params = clones(params)
    opt, ref = SparseAdamW(params, masks, **HP), MaskedAdamW(ref_params, masks, **HP)
    for step in range(5):
        grads = grads_for(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads)
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    dense, theirs = clones(params), clones(params)
    ref = MaskedAdamW(dense, [None, None], **HP)
    torch_opt = torch.optim.AdamW(theirs, **HP)
    for step in range(20):
        grads = grads_for(dense, step)
        ref.step(grads)
        for p, g in zip(theirs, grads):
            p.grad = g
        torch_opt.step()
    for p, q in zip(dense, theirs):
        assert_close(p, q, 1e-6)


def test_a_parameter_without_gradient_is_skipped(sparse_backend, device):
    params, masks = make(SHAPES, torch.float32, device)
    ref_params = clones(params)
    opt = SparseAdamW(params, masks, **HP).attach_hooks()
    ref = MaskedAdamW(ref_params, masks, **HP)
    for step in range(4):
        grads = grads_for(params, step)
        if step % 2:
            grads[1] = None  # parameter 1 gets no gradient on odd steps
        torch.autograd.backward([p for p, g in zip(params, grads) if g is not None],
                                [g for g in grads if g is not None])
        opt.step()
        opt.zero_grad()
        ref.step(grads)
    assert [opt.state[p]["step"] for p in params] == [4, 2, 4]
    check_against(opt, ref, params, ref_params, torch.float32)


def test_dense_parameters_use_torchs_adamw(device):
    params, masks = make(SHAPES, torch.float32, device)
    masks[1] = None
    ref_params = clones(params)
    opt = SparseAdamW(params, masks, **HP)
    theirs = torch.optim.AdamW([ref_params[1]], fused=True, **HP)
    for step in range(5):
        grads = grads_for(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        ref_params[1].grad = grads[1].clone()
        opt.step()
        theirs.step()
    assert torch.equal(params[1], ref_params[1])
    assert not opt.masked(1) and opt.indices(1) is None


def test_int64_indices_give_the_same_update(sparse_backend, device):
    w = torch.randn(40, 30, device=device)
    idx = torch.randperm(1200)[:300].sort().values.to(device)
    outs = []
    for it in (torch.int32, torch.int64):
        wc, m, v = w.clone(), torch.zeros(300, device=device), torch.zeros(300, device=device)
        g = torch.randn(40, 30, generator=torch.Generator().manual_seed(3)).to(device)
        for step in (1, 2):
            torch.ops.fastft.sparse_adam_step([wc], [g], idx.to(it), m, v, [0, 300], 1e-2, 0.9,
                                              0.999, 1e-8, 0.01, step, False)
        outs.append((wc, m, v))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(2**31) == torch.int64


def test_hooks_gather_accumulate_and_free_the_dense_gradients(sparse_backend, device):
    """Two micro-batches through hooks equal the summed .grad without hooks, bit for bit."""
    params, masks = make(SHAPES, torch.float32, device)
    other = clones(params)
    hooked = SparseAdamW(params, masks, **HP).attach_hooks()
    plain = SparseAdamW(other, masks, **HP)
    for step in range(3):
        for micro in range(2):
            up = grads_for(params, 10 * step + micro)
            torch.autograd.backward(params, up)
            torch.autograd.backward(other, up)
            assert all(p.grad is None for p in params)  # consumed and freed at once
        norm_h, norm_p = hooked.grad_norm_sq(), plain.grad_norm_sq()
        assert_close(norm_h, norm_p, 1e-6)
        hooked.step()
        plain.step()
        hooked.zero_grad()
        plain.zero_grad()
    for p, q in zip(params, other):
        assert torch.equal(p, q)


def test_at_most_one_dense_gradient_is_alive(device):
    """Backward through a chain of masked linears: with hooks, each dense weight gradient
    is gone before the next one is formed."""
    torch.manual_seed(0)
    layers = [nn.Linear(16, 16, bias=False).to(device) for _ in range(5)]
    params = [layer.weight for layer in layers]
    masks = [random_mask(p.shape, 0.2, device=device) for p in params]
    alive = []
    for p in params:  # runs before each gradient is accumulated
        p.register_hook(lambda g: alive.append(sum(q.grad is not None for q in params)))
    x = torch.randn(4, 16, device=device)
    opt = SparseAdamW(params, masks)

    def backward():
        h = x
        for layer in layers:
            h = torch.tanh(layer(h))
        h.sum().backward()

    backward()
    assert max(alive) == 4  # without hooks every dense gradient stays
    opt.zero_grad()
    alive.clear()
    opt.attach_hooks()
    backward()
    assert max(alive) == 0


def test_clipping_without_dense_gradients(device):
    params, masks = make(SHAPES, torch.float32, device)
    masks[2] = None
    opt = SparseAdamW(params, masks).attach_hooks()
    up = grads_for(params, 0)
    torch.autograd.backward(params, up)
    want = sum(float(g[m].pow(2).sum()) for g, m in zip(up[:2], masks[:2])) + \
        float(up[2].pow(2).sum())
    assert_close(opt.grad_norm_sq().cpu(), torch.tensor(want), 1e-6)
    norm = opt.clip_grad_norm_(0.5)
    assert_close(norm.cpu(), torch.tensor(want).sqrt(), 1e-6)
    assert_close(opt.grad_norm_sq().sqrt().cpu(), torch.tensor(0.5), 1e-5)


def test_refresh_keeps_survivors_state_and_the_step_count(sparse_backend, device):
    params, masks = make(SHAPES, torch.float32, device, density=0.4)
    ref_params = clones(params)
    opt, ref = SparseAdamW(params, masks, **HP), MaskedAdamW(ref_params, masks, **HP)
    for phase in range(3):
        for step in range(4):
            grads = grads_for(params, 10 * phase + step)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            ref.step(grads)
        new, _ = make(SHAPES, torch.float32, device, density=0.4, seed=phase + 1)
        old_m = {i: dict(zip(opt.indices(i).tolist(), opt.state[p]["exp_avg"].tolist()))
                 for i, p in enumerate(params)}
        new_masks = [random_mask(p.shape, 0.4, generator=torch.Generator().manual_seed(7 + phase),
                                 device=device) for p in params]
        opt.refresh(iter(new_masks))  # any iterable, one mask at a time
        ref.refresh(new_masks)
        for i, p in enumerate(params):
            for j, m in zip(opt.indices(i).tolist(), opt.state[p]["exp_avg"].tolist()):
                assert m == old_m[i].get(j, 0.0)
            assert opt.state[p]["step"] == 4 * (phase + 1)
        del new
    check_against(opt, ref, params, ref_params, torch.float32)


def test_state_round_trips_exactly_through_safetensors(tmp_path, device):
    from fastft import optim

    params, masks = make(SHAPES, torch.bfloat16, device)
    masks[1] = None
    opt = SparseAdamW(params, masks, **HP).attach_hooks()
    for step in range(3):
        torch.autograd.backward(params, grads_for(params, step))
        opt.step()
        opt.zero_grad()
    opt.param_groups[0]["lr"] = 7e-3  # as a scheduler leaves it
    optim.save(opt, tmp_path / "opt.safetensors")
    twin_params = clones(params)
    other_masks = [random_mask(p.shape, 0.1, device=device) if m is not None else None
                   for p, m in zip(params, masks)]
    twin = SparseAdamW(twin_params, other_masks, lr=1.0).attach_hooks()
    optim.load(twin, tmp_path / "opt.safetensors")
    sd, sd2 = opt.state_dict(), twin.state_dict()
    assert sd.keys() == sd2.keys() and sd["steps"] == sd2["steps"] == [3, None, 3]
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v.cpu(), sd2[k].cpu()) and v.dtype == sd2[k].dtype, k
    assert twin.param_groups[0]["lr"] == 7e-3 and twin.param_groups[0]["betas"] == (0.9, 0.95)
    for step in range(3, 6):
        up = grads_for(params, step)
        torch.autograd.backward(params, up)
        torch.autograd.backward(twin_params, up)
        opt.step()
        twin.step()
        opt.zero_grad()
        twin.zero_grad()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


def test_state_bytes_are_indices_plus_two_fp32_per_entry(device):
    params, masks = make(SHAPES, torch.bfloat16, device)
    opt = SparseAdamW(params, masks)
    want = sum(state_bytes_for(p.numel(), int(m.sum())) for p, m in zip(params, masks))
    assert opt.state_bytes() == want == sum(int(m.sum()) * 12 for m in masks)


def test_bad_input_raises_clear_errors(device):
    p = nn.Parameter(torch.randn(8, 4, device=device))
    with pytest.raises(FastftError, match=r"mask 0 has shape \(4, 8\).*\(8, 4\)"):
        SparseAdamW([p], [torch.ones(4, 8, dtype=torch.bool)])
    with pytest.raises(FastftError, match="bool tensor"):
        SparseAdamW([p], [torch.ones(8, 4)])
    with pytest.raises(FastftError, match="got 1 masks for 2 parameters"):
        SparseAdamW([p, nn.Parameter(torch.randn(3))], [None])
    with pytest.raises(FastftError, match="more masks"):
        SparseAdamW([p], [None, None])
    with pytest.raises(FastftError, match="not contiguous"):
        SparseAdamW([nn.Parameter(torch.randn(4, 8).t())], [torch.ones(8, 4, dtype=torch.bool)])
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(FastftError, match=r"density must be in \(0, 1\]"):
            random_mask((8, 4), bad)
    with pytest.raises(FastftError, match="betas"):
        SparseAdamW([p], [None], betas=(0.9, 1.0))
    opt = SparseAdamW([p], [torch.ones(8, 4, dtype=torch.bool, device=device)])
    with pytest.raises(FastftError, match="shape"):
        opt.refresh([torch.ones(2, 2, dtype=torch.bool)])
    with pytest.raises(FastftError, match="not a SparseAdamW state dict"):
        opt.load_state_dict({"state": {}})


def test_fake_tensors_and_default_backend():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(64, 64, dtype=torch.bfloat16)
        idx = torch.zeros(100, dtype=torch.int32)
        m, v = torch.empty(100), torch.empty(100)
        torch.ops.fastft.sparse_adam_step([w, w], [torch.empty(100)], idx, m, v, [0, 60, 100],
                                          1e-3, 0.9, 0.999, 1e-8, 0.0, 1, True)
    assert op.INFO.name in backends.registered()
    assert backends.choose(op.INFO, torch.device("cuda")) == "triton"
    b, _ = backends.explain(op.INFO, torch.device("cpu"))
    assert b in ("cpp", "torch")  # torch only where the C++ build failed (and says why)


def test_cpp_kernel_threads_over_large_updates(monkeypatch):
    """Over 32768 entries the C++ kernel splits the work across threads: same numbers."""
    monkeypatch.setenv("FASTFT_BACKEND", "cpp")
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        params, masks = make([(400, 300)], torch.bfloat16, "cpu", density=0.9)
        ref_params = clones(params)
        opt, ref = SparseAdamW(params, masks, **HP), MaskedAdamW(ref_params, masks, **HP)
        assert opt.indices(0).numel() > 2 * 32768
        for step in range(3):
            grads = grads_for(params, step)
            params[0].grad = grads[0]
            opt.step()
            ref.step(grads)
        check_against(opt, ref, params, ref_params, torch.bfloat16)
    finally:
        torch.set_num_threads(old)
