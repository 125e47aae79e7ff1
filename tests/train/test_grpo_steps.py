"""A GRPO step split into micro-batches equals the same step in one call, for every loss_type.

Each micro-batch is normalised by the whole step's counts (sequences for grpo and
dr_grpo, completion tokens for bnpo and dapo), as TRL normalises an accumulated
step, so a short last chunk weighs the same per sequence as the others.
"""

import pytest
import torch

import fastft
from fastft import TrainConfig, Trainer

from .helpers import tiny_setup, write_data

N = 12  # completions per step: 3 prompts x 4 generations


def varied_reward(prompts, completions, **_):
    return [float(len(c) % 3) + 0.5 * c.count("1") for c in completions]


def one_step(tmp_path, batch_size, **cfg):
    model, tok = tiny_setup()
    config = TrainConfig(objective="grpo", method="full", prompts_per_step=3, num_generations=4,
                         batch_size=batch_size, max_completion_length=6, lr=1e-3,
                         progress=False, output_dir=str(tmp_path / f"run{batch_size}"),
                         bf16="false", **cfg)  # fp32 on CUDA too: the sums must agree to 1e-5
    trainer = Trainer(model, tok, str(write_data(tmp_path, n=6, kind="grpo")), config,
                      reward_fn=varied_reward)
    torch.manual_seed(0)  # the same rollouts for every split
    metrics, _ = trainer._grpo_step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, metrics


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_give_the_gradient_of_one_batch(tmp_path, loss_type, level):
    whole, m_whole = one_step(tmp_path, N, loss_type=loss_type, importance_level=level)
    assert float(m_whole["reward_std"]) > 0  # the advantages are not all zero
    for size in (N // 4, 5):  # equal chunks, and 5 + 5 + 2
        split, m_split = one_step(tmp_path, size, loss_type=loss_type, importance_level=level)
        assert whole.keys() == split.keys() and len(whole) > 0
        worst = max(float((split[k] - whole[k]).abs().max() / whole[k].abs().max().clamp(min=1e-12))
                    for k in whole)
        assert worst < 1e-5, (loss_type, size, worst)
        for key in ("loss", "kl", "clip_low", "clip_high", "ratio"):
            torch.testing.assert_close(m_split[key], m_whole[key], rtol=1e-5, atol=1e-7)


def test_delta_reaches_the_loss(tmp_path, monkeypatch):
    """GRPO's two-sided cap is a TrainConfig field the loss receives."""
    seen = {}
    real = fastft.losses.grpo

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastft.losses, "grpo", spy)
    one_step(tmp_path, N, delta=1.5)
    assert seen["delta"] == 1.5
