"""GreenTrainer's budget: the integer costs never let a selection past the real budget, lose
at most 0.5% of it to rounding, and on a 24-layer model the selection spends the budget."""

import random

import pytest
import torch
import transformers

import fastft
from fastft.methods import green_select
from fastft.methods.green import selection_for
from fastft.profile.green_costs import measure_costs


def random_costs(rng, n):
    # FLOP-like magnitudes, some zero (a bias's weight gradient, an embedding's input gradient)
    pick = lambda: rng.choice([0.0, rng.uniform(1, 10) * 10 ** rng.randint(3, 9)])  # noqa: E731
    return [pick() for _ in range(n)], [pick() for _ in range(n)]


@pytest.mark.parametrize("seed", range(20))
def test_quantized_costs_bound_the_real_ones_within_half_a_percent(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 300)
    dw, dy = random_costs(rng, n)
    dw[0] += 1.0  # at least one nonzero cost
    budget = rng.uniform(0.05, 1.0) * (sum(dw) + sum(dy))
    qdw, qdy, units = green_select.quantize(dw, dy, budget)
    unit = budget / units
    for q, v in zip(qdw + qdy, dw + dy):
        assert q * unit >= v  # rounded up: within the integer budget is within the real one
        assert q * unit - v < unit and (q == 0) == (v == 0)
    # each paid cost loses under a unit, and a unit is 1/200 of the budget per nonzero cost
    nonzero = sum(1 for v in dw + dy if v > 0)
    assert nonzero * unit <= budget / 200 * (1 + 1e-12)


def test_fill_adds_what_fits_most_important_first():
    dw, dy = [5, 4, 3, 2], [10, 1, 1, 1]
    mask = [False, True, False, False]  # dy of 1, 2, 3 and dw of 1: 7
    # 3 (importance 3.0) before 2 (2.0): with 2 to spend, only 3 fits; with 5, both
    assert green_select.fill(mask, [9.0, 0.1, 2.0, 3.0], dw, dy, 7 + 2) == \
        [False, True, False, True]
    assert green_select.fill(mask, [9.0, 0.1, 2.0, 3.0], dw, dy, 7 + 5) == \
        [False, True, True, True]
    assert green_select.fill(mask, [9.0, 0.1, -1.0, 0.0], dw, dy, 100) == mask  # never <= 0
    assert green_select.fill([False] * 4, [1.0] * 4, dw, dy, 100) == [False] * 4


@pytest.fixture(scope="module")
def costs24():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=24, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False)
    return measure_costs(cfg, fastft.Full(), batch_size=2, seq_len=32, dtype=torch.float32)


@pytest.mark.parametrize("rho", [0.5, 0.7])
@pytest.mark.parametrize("importance", ["equal", "random"])
def test_24_layers_spend_the_budget(costs24, rho, importance):
    c = costs24
    assert len(c.names) == 24 * 9 + 3
    rng = random.Random(0)
    imp = [1.0 if importance == "equal" else rng.uniform(-0.2, 1.0) for _ in c.names]
    budget = green_select.backward_budget(rho, c.t_fp, c.t_bp) * c.t_bp
    used = green_select.cost(selection_for(c, imp, rho), c.t_dw, c.t_dy)
    assert 0.98 * budget <= used <= budget
    kept = (c.t_fp + used) / (c.t_fp + c.t_bp)  # of full fine-tuning's FLOPs
    assert rho - 0.02 <= kept <= rho
