#!/usr/bin/env python
"""A GRPO step's time split on the demo task: generation, log-probs, update.

    python benches/grpo_split.py [--out DIR] [--steps N]

GRPO with LoRA (r=16, every linear layer) on the demo's prompts, twice from the same
start: sampling with the adapters folded into a working copy of the weights (what
the trainer does), and with the adapters applied on every decoded token (the fold
replaced by a no-op: how rollouts ran before it). The demo model (hidden 128) and a
wider one (hidden 512), beta 0.04 so that the reference log-probs are computed too.
Medians over the steps after the first two. Writes grpo_split.json and .md.
"""

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch

from fastft.demo import arithmetic as ar
from fastft.demo.run import GRPO, write_jsonl
from fastft.train import TrainConfig, Trainer, rollout

KEYS = ("time_generate_s", "time_logprobs_s", "time_update_s")


def run(out: Path, prompts: Path, hidden: int, fold: bool, steps: int) -> dict:
    tok = ar.tokenizer()
    model = ar.model(tok, hidden=hidden, seed=0)
    cfg = TrainConfig(**{**GRPO, "method": "lora", "lora_r": 16, "beta": 0.04,
                         "max_steps": steps, "log_every": 1, "progress": False, "seed": 0,
                         "output_dir": str(out), "overwrite": True})
    real = rollout.folded_adapters
    if not fold:
        rollout.folded_adapters = lambda model: contextlib.nullcontext()
    try:
        Trainer(model, tok, str(prompts), cfg, reward_fn=ar.exact_reward).train()
    finally:
        rollout.folded_adapters = real
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time_generate_s" in r][2:]
    return {k: statistics.median(r[k] for r in rows) for k in KEYS}


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench-results/grpo-split")
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args(argv)
    out = Path(args.out)
    held_out = ar.problems(300, seed=1)
    prompts = write_jsonl(ar.prompt_records(ar.problems(2000, seed=2, exclude=set(held_out))),
                          out / "prompts.jsonl")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = []
    for hidden in (128, 512):
        for fold in (False, True):
            name = "adapters folded for sampling" if fold else "adapters per decoded token"
            r = run(out / f"h{hidden}-{'fold' if fold else 'unfolded'}", prompts, hidden, fold,
                    args.steps)
            results.append({"hidden": hidden, "rollout": name, **r})
            print(f"hidden {hidden:4d}  {name:<30} " + "  ".join(
                f"{k[5:-2]} {r[k]:.3f} s" for k in KEYS), flush=True)
    md = ["| model | rollout | generation | log-probs | update | step |", "|---|---|---|---|---|---|"]
    md += [f"| hidden {r['hidden']} | {r['rollout']} | {r['time_generate_s']:.3f} s | "
           f"{r['time_logprobs_s']:.3f} s | {r['time_update_s']:.3f} s | "
           f"{sum(r[k] for k in KEYS):.3f} s |" for r in results]
    (out / "grpo_split.json").write_text(json.dumps(results, indent=1))
    (out / "grpo_split.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main(sys.argv[1:])
