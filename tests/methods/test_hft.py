"""HFT: exactly half of each category per stage, seeded re-draws, no gradient for frozen ones."""

from collections import Counter

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastft
from fastft import FastftError
from fastft.methods.hft import ATTENTION, MLP, draw

from ..tiny_models import batch, tiny
from .sparse_loop import batches, mean_loss, one_thread, snapshot, train  # noqa: F401


def categories(paths):
    names = Counter(p.rsplit(".", 1)[-1] for p in paths)
    return sum(names[n] for n in ATTENTION), sum(names[n] for n in MLP)


@pytest.mark.parametrize("layers", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("stage", [0, 1, 5])
def test_half_of_each_category(layers, stage):
    """Half of the attention matrices; half of the 3L MLP matrices, rounded up (odd L)."""
    picks = draw(list(range(layers)), seed=3, stage=stage)
    assert all(len(a) == 2 for a, _ in picks.values())
    two = -(-layers // 2)
    assert sorted(len(m) for _, m in picks.values()) == [1] * (layers - two) + [2] * two
    assert sum(len(a) for a, _ in picks.values()) == 4 * layers // 2
    assert sum(len(m) for _, m in picks.values()) == -(-3 * layers // 2)


def test_prepare_trains_the_draw_and_freezes_the_rest():
    model = tiny("llama", num_hidden_layers=4)
    method = fastft.HFT(seed=1)
    fastft.prepare(model, method)
    paths = model._fastft.targets
    assert categories(paths) == (8, 6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.weight" for p in paths}  # no embedding, norm or head
    again = tiny("llama", num_hidden_layers=4)
    fastft.prepare(again, fastft.HFT(seed=1))
    assert again._fastft.targets == paths  # reproducible from the seed
    stages = [tuple(method.apply(s)) for s in range(6)]
    assert len(set(stages)) > 1 and stages[0] == tuple(paths)


def test_frozen_matrices_get_no_weight_gradient_gemm():
    """Backward FLOPs drop by exactly the weight-gradient GEMMs of the frozen matrices (the
    embedding trains in both runs, so every activation gradient is formed in both)."""
    ids, labels = batch()
    tokens = ids.numel()
    counts = {}
    for kind in ("all", "hft"):
        model = tiny("qwen2", num_hidden_layers=4)  # q/k/v biases freeze along with weights
        method = fastft.HFT(seed=2)
        fastft.prepare(model, method)
        model.model.embed_tokens.weight.requires_grad_(True)
        if kind == "all":
            for _, mod in (m for mods in method._targets.values() for m in mods.values()):
                mod.weight.requires_grad_(True)
        with FlopCounterMode(display=False) as fc:
            model(input_ids=ids, labels=labels).loss.backward()
        counts[kind] = fc.get_total_flops()
        frozen = [mod for mods in method._targets.values() for _, mod in mods.values()
                  if not mod.weight.requires_grad]
        assert all(mod.weight.grad is None and (mod.bias is None or mod.bias.grad is None)
                   for mod in frozen)
        if kind == "hft":
            saved = sum(2 * tokens * m.in_features * m.out_features for m in frozen)
    assert counts["all"] - counts["hft"] == saved


def test_training_lowers_the_loss_and_redraws_each_epoch():
    model = tiny("llama", num_hidden_layers=4)
    data = batches()
    before, start = mean_loss(model, data), snapshot(model)
    method = fastft.HFT(seed=0)
    boundary = {}

    def record(phase, epoch, step, opt):
        boundary[epoch] = (snapshot(model), {n for n, p in model.named_parameters()
                                             if p.requires_grad})

    train(model, method, data, epochs=3, lr=1e-2, record=record)
    assert mean_loss(model, data) < before - 0.05
    ever = set().union(*(t for _, t in boundary.values()))
    for n, p in model.named_parameters():
        if n not in ever:
            assert torch.equal(p, start[n]), n  # never trained: bit-identical
    assert len({frozenset(t) for _, t in boundary.values()}) > 1  # re-drawn
    for epoch in (1, 2):  # within an epoch, the frozen half does not move
        prev, _ = boundary[epoch - 1]
        now, trained = boundary[epoch]
        for n in now:
            if n not in trained:
                assert torch.equal(now[n], prev[n]), (epoch, n)
    assert method.state_dict() == {"stage_index": 2}


def test_state_dict_restores_the_stage():
    model = tiny("llama", num_hidden_layers=4)
    method = fastft.HFT(seed=5)
    fastft.prepare(model, method)
    method.on_epoch_begin(model, None, 3)
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    other = tiny("llama", num_hidden_layers=4)
    fresh = fastft.HFT(seed=5)
    fastft.prepare(other, fresh)
    fresh.load_state_dict(method.state_dict())
    assert {n for n, p in other.named_parameters() if p.requires_grad} == want


def test_step_stages_and_bad_input():
    model = tiny("llama", num_hidden_layers=2)
    method = fastft.HFT(stage=2)
    fastft.prepare(model, method)
    method.on_step_end(model, None, 1)
    assert method._stage_index == 0
    method.on_step_end(model, None, 4)
    assert method._stage_index == 2
    with pytest.raises(FastftError, match="HFT stage must be"):
        fastft.HFT(stage="week")
    with pytest.raises(FastftError, match="HFT found no layer"):
        fastft.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), fastft.HFT())
