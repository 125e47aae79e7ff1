"""What the trainer hands to a method and a loss: LoRA-SB's defaults and initialisation,
OTR's sampling temperature and seeds, GRPO's group size."""

import pytest
import torch

import fastft
from fastft import FastftError, TrainConfig, Trainer
from fastft.methods import lora_sb
from fastft.recipe import make_method
from fastft.reference import losses as ref

from ..helpers import assert_close, head_inputs
from .helpers import tiny_setup, write_data


def test_lora_sb_takes_its_own_rank_unless_set():
    assert make_method(TrainConfig(method="lora-sb")).r == 96
    assert make_method(TrainConfig(method="lora")).r == 16
    assert make_method(TrainConfig(method="lora-sb", lora_r=8)).r == 8
    m = make_method(TrainConfig(method="lora-sb", lr=3e-4, warmup_ratio=0.1))
    assert (m.lr, m.warmup_ratio) == (3e-4, 0.1)


def test_lora_sb_initialisation_uses_the_runs_lr_and_warmup(tmp_path, monkeypatch):
    seen = {}
    real = lora_sb.initialize

    def spy(model, batches, **kw):
        seen.update(kw)
        return real(model, batches, **kw)

    monkeypatch.setattr(lora_sb, "initialize", spy)
    model, tok = tiny_setup()
    cfg = TrainConfig(method="lora-sb", lora_r=4, lr=5e-3, warmup_ratio=0.25, max_steps=4,
                      batch_size=4, progress=False, max_length=16,
                      output_dir=str(tmp_path / "run"))
    Trainer(model, tok, str(write_data(tmp_path, n=8)), cfg).train()
    assert seen["lr"] == 5e-3 and seen["warmup_ratio"] == 0.25 and seen["total_steps"] == 4


def test_otr_temperature_shapes_only_the_sampling():
    """log p(a_k) comes from the model's distribution (METHODS §1); tau only from where the
    samples are drawn: the same draws as sampling the tau-tempered distribution."""
    h, w, y = head_inputs(9, 16, 37, seed=2)
    loss, drawn = fastft.losses.otr(h, w, y, k=5, seed=7, sampling_temperature=2.0,
                                    return_samples=True)
    _, tempered = fastft.losses.otr(h.detach(), w.detach(), y, k=5, seed=7, temperature=2.0,
                                    return_samples=True)
    assert torch.equal(drawn, tempered)
    expect = ref.otr(h, w, y, samples=drawn, temperature=1.0)
    assert_close(loss, expect, 1e-5, "loss at the model's temperature")
    gh, gw = torch.autograd.grad(loss, (h, w))
    eh, ew = torch.autograd.grad(expect, (h, w))
    assert_close(gh, eh, 1e-5, "grad_hidden")
    assert_close(gw, ew, 1e-5, "grad_weight")


def test_trainer_passes_otr_temperature_as_sampling_temperature(tmp_path, monkeypatch):
    seen = {}
    real = fastft.losses.otr

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(fastft.losses, "otr", spy)
    model, tok = tiny_setup()
    cfg = TrainConfig(loss="otr", otr_temperature=1.7, max_steps=1, batch_size=4,
                      progress=False, max_length=16, output_dir=str(tmp_path / "run"))
    Trainer(model, tok, str(write_data(tmp_path, n=4)), cfg).train()
    assert seen["sampling_temperature"] == 1.7 and seen["temperature"] == 1.0


def test_otr_without_a_seed_draws_fresh_samples():
    h, w, y = head_inputs(16, 8, 50, seed=1)
    h, w = h.detach(), w.detach()
    _, a = fastft.losses.otr(h, w, y, k=6, return_samples=True)
    _, b = fastft.losses.otr(h, w, y, k=6, return_samples=True)
    assert not torch.equal(a, b)
    torch.manual_seed(3)
    _, c = fastft.losses.otr(h, w, y, k=6, return_samples=True)
    torch.manual_seed(3)
    _, d = fastft.losses.otr(h, w, y, k=6, return_samples=True)
    assert torch.equal(c, d)  # torch.manual_seed decides


def test_a_group_of_one_is_an_error_not_nan():
    with pytest.raises(FastftError, match="group_size must be >= 2"):
        fastft.losses.group_advantages(torch.tensor([1.0, 2.0, 3.0]), 1)
    with pytest.raises(FastftError, match="num_generations must be >= 2"):
        TrainConfig(objective="grpo", num_generations=1)
    TrainConfig(objective="sft", num_generations=1)  # irrelevant outside GRPO
