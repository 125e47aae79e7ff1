"""LIFT: principal masks against a direct SVD, budgets, refreshes, and training a tiny model."""

import pytest
import torch

import fastft
from fastft import FastftError
from fastft.methods.lift import budget, principal_mask
from fastft.optim import SparseAdamW

from ..tiny_models import tiny
from .sparse_loop import batches, mean_loss, one_thread, snapshot, train  # noqa: F401


def direct_top(w, filter_rank, k, largest=True):
    """The k entries of largest (smallest) |W_r| by a float64 SVD, as a set of flat indices."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    w_r = (u[:, :filter_rank] * s[:filter_rank]) @ vh[:filter_rank]
    return set(torch.topk(w_r.abs().flatten(), k, largest=largest).indices.tolist())


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("shape,lora_rank,filter_rank", [((24, 40), 2, 3), ((50, 17), 1, 5)])
def test_principal_mask_selects_the_top_entries_of_the_low_rank_approximation(
        shape, lora_rank, filter_rank, largest):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = principal_mask(w, lora_rank, filter_rank, largest)
    k = min((shape[0] + shape[1]) * lora_rank, shape[0] * shape[1])
    assert mask.dtype == torch.bool and mask.shape == w.shape and int(mask.sum()) == k
    assert set(mask.flatten().nonzero().squeeze(1).tolist()) == \
        direct_top(w, filter_rank, k, largest)


def test_fast_svd_agrees_on_a_low_rank_matrix():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(60, 4, generator=g) @ torch.randn(4, 50, generator=g)  # rank 4
    assert torch.equal(principal_mask(w, 2, 4, fast_svd=True), principal_mask(w, 2, 4))


def test_mask_sizes_are_the_budget_per_matrix():
    model = tiny("llama")
    method = fastft.LIFT(lora_rank=2, filter_rank=4)
    paths = fastft.prepare(model, method)._fastft.targets
    opt = method.make_optimizer(model, lr=1e-3)
    assert isinstance(opt, SparseAdamW)
    mods = dict(model.named_modules())
    assert len(paths) == 14 and not any("lm_head" in p for p in paths)
    for i, p in enumerate(opt.params):
        assert opt.indices(i).numel() == budget(p.shape, 2) == \
            min((p.shape[0] + p.shape[1]) * 2, p.numel())
    big = fastft.LIFT(lora_rank=64, filter_rank=4)  # (m + n) r above m n: the whole matrix
    model2 = tiny("llama")
    fastft.prepare(model2, big)
    opt2 = big.make_optimizer(model2, lr=1e-3)
    assert all(opt2.indices(i).numel() == p.numel() for i, p in enumerate(opt2.params))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.weight" for p in paths}
    assert all(not m.weight.requires_grad for n, m in mods.items() if n == "lm_head")


def test_optimizer_defaults_from_the_paper():
    model = tiny("llama")
    method = fastft.LIFT(lora_rank=1, filter_rank=2)
    fastft.prepare(model, method)
    opt = method.make_optimizer(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["eps"] == 1e-6
    method.betas, method.eps = None, None
    opt = method.make_optimizer(model, lr=1e-3, betas=(0.8, 0.9), eps=1e-7)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["eps"] == 1e-7


def test_filter_rank_above_the_matrix_rank_is_an_error():
    with pytest.raises(FastftError, match="filter_rank 40 is above the rank"):
        principal_mask(torch.randn(30, 50), 2, 40)
    model = tiny("llama")  # k_proj is 16 x 32: rank at most 16
    with pytest.raises(FastftError, match=r"filter_rank 20 is above the rank of .*k_proj"):
        fastft.prepare(model, fastft.LIFT(lora_rank=2, filter_rank=20))
    with pytest.raises(FastftError, match="lora_rank must be an int >= 1"):
        fastft.LIFT(lora_rank=0)
    with pytest.raises(FastftError, match="call fastft.prepare"):
        fastft.LIFT().make_optimizer(model, lr=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_training_lowers_the_loss_and_touches_only_masked_entries(arch):
    model = tiny(arch)
    data = batches()
    before, start = mean_loss(model, data), snapshot(model)
    method = fastft.LIFT(lora_rank=1, filter_rank=2, refresh_every=3)
    seen: dict[int, torch.Tensor] = {}
    refreshed = []

    def record(phase, epoch, step, opt):
        for i, p in enumerate(opt.params):  # every entry ever in a mask
            m = torch.zeros(p.numel(), dtype=torch.bool)
            m[opt.indices(i).long()] = True
            seen[i] = seen.get(i, m) | m
        refreshed.append(step)

    opt = train(model, method, data, epochs=2, lr=1e-2, micro=2, record=record)
    assert mean_loss(model, data) < before - 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {names[id(p)]: seen[i].view(p.shape) for i, p in enumerate(opt.params)}
    changed = 0
    for n, p in model.named_parameters():
        if n in trained:
            m = trained[n]
            assert torch.equal(p[~m], start[n][~m]), n  # outside every mask: bit-identical
            changed += int((p != start[n]).sum())
        else:
            assert torch.equal(p, start[n]), n  # embeddings, norms, biases, head
    assert changed > 0
    assert all(opt.state[p]["step"] == 6 for p in opt.params)  # refreshes keep the count


def test_refresh_every_n_steps_recomputes_masks_from_current_weights(monkeypatch):
    model = tiny("llama")
    method = fastft.LIFT(lora_rank=1, filter_rank=2, refresh_every=2)
    calls = []
    monkeypatch.setattr(fastft.LIFT, "refresh",
                        lambda self, opt: calls.append(opt) or SparseAdamW.refresh(
                            opt, (self.mask(p) for p in opt.params)))
    train(model, method, batches(), epochs=2)  # 6 steps: refreshes after steps 2, 4, 6
    assert len(calls) == 3
    opt = calls[-1]
    for i, p in enumerate(opt.params):  # the last refresh used the weights after step 6
        want = method.mask(p).flatten().nonzero().squeeze(1)
        assert torch.equal(opt.indices(i).long(), want)
