"""The same --seed gives the same run, bit for bit on the CPU (CLI and API); modes follow the model."""

import json

import torch

import fastft
from fastft.cli import main

from ..tiny_models import tiny
from .helpers import tiny_setup, write_data

TIMING = ("tokens_per_s", "peak_memory_mb",  # wall-clock measurements, not results
          "time_generate_s", "time_logprobs_s", "time_update_s")


def metrics(folder):
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_two_cli_runs_with_one_seed_are_identical(tmp_path):
    model, tok = tiny_setup()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    sft = write_data(tmp_path, n=8)
    prompts = write_data(tmp_path, n=4, kind="grpo")
    (tmp_path / "reward.py").write_text(
        "def reward(prompts, completions, **_):\n"
        "    return [float(len(c) % 3) for c in completions]\n")

    def run(out, *extra):
        args = ["train", "--model", tmp_path / "model", "--output", tmp_path / out,
                "--max-steps", "3", "--batch-size", "4", "--max-length", "32", "--no-progress",
                "--seed", "7", *extra]
        assert main([str(a) for a in args]) == 0
        return metrics(tmp_path / out)

    # LoRA with dropout: A's initialisation and the dropout masks both come from the seed
    sft_args = ["--data", sft, "--lora-dropout", "0.1", "--lr", "1e-2"]
    a, b = run("a", *sft_args), run("b", *sft_args)
    assert len(a) == 3 and a == b
    assert run("c", *sft_args[:-2], "--lr", "1e-2", "--seed", "8") != a  # the seed matters
    grpo = ["--data", prompts, "--objective", "grpo", "--reward", f"{tmp_path}/reward.py:reward",
            "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-length", "4"]
    g1, g2 = run("g1", *grpo), run("g2", *grpo)  # sampling too
    assert len(g1) == 3 and g1 == g2


def test_prepared_layers_follow_the_models_mode():
    ids = torch.randint(0, 97, (2, 9))
    model = tiny("llama").eval()
    fastft.prepare(model, fastft.LoRA(r=4, dropout=0.5))
    layers = fastft.methods.lora.adapter_layers(model)
    assert layers and not any(layer.training for layer in layers.values())
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_()
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second)  # eval: no dropout
    model.train()
    assert all(layer.training for layer in layers.values())
    plain = fastft.merge(model.eval())
    assert not any(m.training for m in plain.modules())
