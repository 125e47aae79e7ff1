"""LT-SFT: the two phases, the global top-k mask, sparse differences and their composition."""

import copy

import pytest
import torch

import fastft
from fastft import FastftError
from fastft.methods.sparse_diff import load_sparse_diff, save_sparse_diff
from fastft.optim import SparseAdamW

from ..tiny_models import tiny
from .sparse_loop import batches, mean_loss, one_thread, snapshot, train  # noqa: F401


def targets(method):
    return method._targets


def test_phases_run_in_order_and_reset_to_theta0():
    model = tiny("llama")
    base = snapshot(model)
    method = fastft.LTSFT(proportion=0.05)
    fastft.prepare(model, method)
    assert method.phases() == ["full", "sparse"]
    opt = method.make_optimizer(model, lr=1e-2)
    with pytest.raises(FastftError, match="phase 'sparse' run out of order"):
        method.on_phase_begin(model, opt, "sparse")
    assert method.on_phase_begin(model, opt, "full") is None
    with pytest.raises(FastftError, match="phase 'full' run out of order"):
        method.on_phase_begin(model, opt, "full")
    data = batches(2)
    for b in data:  # a little full fine-tuning
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = {n: p.detach().clone() for n, p in targets(method).items()}
    sparse = method.on_phase_begin(model, opt, "sparse")
    assert isinstance(sparse, SparseAdamW)
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n  # every maskable weight back at theta0
    # the global top-K of |theta - theta0|, K = proportion x N over all maskable weights
    names = list(moved)
    dist = torch.cat([(moved[n] - base[n]).abs().flatten() for n in names])
    k = round(0.05 * dist.numel())
    assert method.mask_size == k
    offsets = torch.tensor([0] + [moved[n].numel() for n in names]).cumsum(0)
    chosen = torch.cat([sparse.indices(i).long() + offsets[i] for i in range(len(names))])
    assert set(chosen.tolist()) == set(torch.topk(dist, k).indices.tolist())
    sizes = [sparse.indices(i).numel() for i in range(len(names))]
    assert len(set(sizes)) > 1  # global, not the same proportion per matrix
    with pytest.raises(FastftError, match="run out of order"):
        method.on_phase_begin(model, sparse, "sparse")


def test_bad_settings():
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(FastftError, match=r"proportion .* must be in \(0, 1\]"):
            fastft.LTSFT(proportion=bad)
    with pytest.raises(FastftError, match="l1 must be >= 0"):
        fastft.LTSFT(l1=-1.0)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_training_lowers_the_loss_and_leaves_unmasked_entries_at_theta0(arch, tmp_path):
    model = tiny(arch)
    base_model = copy.deepcopy(model)
    data = batches()
    before, start = mean_loss(model, data), snapshot(model)
    method = fastft.LTSFT(proportion=0.1)
    losses = {}

    def record(phase, epoch, step, opt):
        losses[phase] = mean_loss(model, data)

    opt = train(model, method, data, epochs=2, lr=3e-2, micro=2, record=record)
    assert isinstance(opt, SparseAdamW)
    assert losses["sparse"] < before - 0.05
    trained = {}
    for i, (n, p) in enumerate(targets(method).items()):
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        mask[opt.indices(i).long()] = True
        trained[n] = mask.view(p.shape)
    for n, p in model.named_parameters():
        if n in trained:
            assert torch.equal(p[~trained[n]], start[n][~trained[n]]), n
        else:
            assert torch.equal(p, start[n]), n
    # the result as a sparse difference, composed onto the base model: the trained weights
    path = method.save_diff(model, tmp_path / "task.safetensors")
    fastft.compose(base_model, [path])
    for (n, p), (_, q) in zip(model.named_parameters(), base_model.named_parameters()):
        assert torch.equal(p, q), n


def test_compose_adds_several_differences_and_checks_them(tmp_path):
    model = tiny("llama")
    start = snapshot(model)
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    shapes = {n: list(start[n].shape) for n in names}
    diffs, want = [], {n: start[n].clone() for n in names}
    for j in range(2):
        part = {}
        for n in names:
            idx = torch.randperm(start[n].numel(), generator=g)[:50].sort().values.int()
            val = torch.randn(50, generator=g)
            part[n] = (idx, val)
            want[n].view(-1)[idx.long()] += val
        diffs.append(save_sparse_diff(part, shapes, tmp_path / f"d{j}.safetensors"))
    fastft.compose(model, diffs)
    for n, p in model.named_parameters():
        if n in names:
            torch.testing.assert_close(p, want[n], rtol=0, atol=1e-6)
        else:
            assert torch.equal(p, start[n])
    loaded = load_sparse_diff(diffs[0])
    assert set(loaded["params"]) == set(names) and loaded["shapes"] == shapes
    wrong = save_sparse_diff({"model.layers.0.mlp.up_proj.weight": (torch.tensor([0]),
                                                                    torch.tensor([1.0]))},
                             {"model.layers.0.mlp.up_proj.weight": [7, 7]},
                             tmp_path / "wrong.safetensors")
    with pytest.raises(FastftError, match="is for shape"):
        fastft.compose(model, wrong)
    unknown = save_sparse_diff({"nope.weight": (torch.tensor([0]), torch.tensor([1.0]))},
                               {"nope.weight": [1]}, tmp_path / "unknown.safetensors")
    with pytest.raises(FastftError, match="does not have"):
        fastft.compose(model, [unknown])


def test_l1_penalty_is_added_once_per_step():
    model = tiny("llama")
    method = fastft.LTSFT(proportion=0.1, l1=0.5)
    fastft.prepare(model, method)
    opt = method.make_optimizer(model, lr=1e-2)
    method.on_phase_begin(model, opt, "full")
    b = batches(1)[0]
    model(**b).loss.backward()
    opt.step()
    opt.zero_grad()
    method.on_step_end(model, opt, 1)
    plain = tiny("llama")  # the same weights, no penalty hooks
    plain.load_state_dict(model.state_dict())
    fastft.prepare(plain, fastft.Full())
    for _ in range(2):  # two micro-batches
        model(**b).loss.backward()
        plain(**b).loss.backward()
    for n, p in targets(method).items():
        q = dict(plain.named_parameters())[n]
        sign = torch.sign(p.detach() - method._theta0[n])
        assert sign.abs().sum() > 0
        torch.testing.assert_close(p.grad, q.grad + 0.5 * sign, rtol=1e-6, atol=1e-6)


def test_state_dict_resumes_the_sparse_phase():
    model = tiny("llama")
    method = fastft.LTSFT(proportion=0.02)
    opt = train(model, method, batches(2), epochs=1)
    state = method.state_dict()
    assert state["phase"] == "sparse"
    other = tiny("llama", seed=1)  # different weights: theta0 comes from the state
    fresh = fastft.LTSFT(proportion=0.02)
    fastft.prepare(other, fresh)
    fresh.load_state_dict(state)
    resumed = fresh.make_optimizer(other, lr=1e-2)
    assert isinstance(resumed, SparseAdamW)
    for i in range(len(opt.params)):
        assert torch.equal(resumed.indices(i), opt.indices(i))
    for n in fresh._theta0:
        assert torch.equal(fresh._theta0[n], method._theta0[n])
