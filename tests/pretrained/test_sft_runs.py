"""Two short SFT runs of the real model with one seed are the same run, bit for bit: the
logged losses and every final weight (LoRA with dropout: the adapters' initialisation, the
data order and the dropout masks all come from the seed).

transformers' from_pretrained returns a model in eval mode; the Trainer puts it in training
mode (as transformers' Trainer does), so its LoRA dropout draws masks: the last test.
"""

import json

import pytest
import torch

import fastft
from fastft.methods.lora import adapter_layers

TIMING = ("tokens_per_s", "peak_memory_mb")  # wall-clock measurements, not results


def train(model, tokenizer, records, out, steps):
    """Train ``model`` for ``steps``; the training flag of its first LoRA layer at each
    forward."""
    cfg = fastft.TrainConfig(method="lora", lora_r=8, lora_dropout=0.1, max_steps=steps,
                             batch_size=2, lr=2e-3, max_length=64, seed=11, progress=False,
                             output_dir=str(out))
    trainer = fastft.Trainer(model, tokenizer, records, cfg)
    modes = []
    layer = next(iter(adapter_layers(model).values()))
    layer.register_forward_hook(lambda mod, args, output: modes.append(mod.training))
    trainer.train()
    return modes


def run(smollm2, out):
    model = smollm2.fresh()
    modes = train(model, smollm2.tokenizer, smollm2.records(8, skip=10), out, steps=3)
    assert modes == [True] * 3  # dropout drew its masks at every step
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows], model.state_dict()


@pytest.mark.pretrained
def test_two_runs_with_one_seed_are_identical(smollm2, tmp_path):
    (a, wa), (b, wb) = run(smollm2, tmp_path / "a"), run(smollm2, tmp_path / "b")
    assert len(a) == 3 and a == b
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    lora_b = [k for k in wa if k.endswith("lora_B")]
    assert len(lora_b) == 30 * 7 and all(wa[k].abs().max() > 0 for k in lora_b)  # trained


@pytest.mark.pretrained
def test_a_from_pretrained_model_trains_with_its_dropout_on(smollm2, tmp_path):
    model = smollm2.fresh()
    assert not model.training  # as from_pretrained returns it
    assert train(model, smollm2.tokenizer, smollm2.records(2, skip=10), tmp_path,
                 steps=1) == [True]
