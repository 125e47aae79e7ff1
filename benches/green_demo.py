#!/usr/bin/env python
"""GreenTrainer on the demo task: held-out exact match and measured training FLOPs.

    python benches/green_demo.py [--out DIR] [--steps N] [--base-steps M] [--base-rows R]

Full fine-tuning, then GreenTrainer (base full, interval 2 epochs) at rho 0.7, 0.5 and
0.3, each from the same initial model and data order with the demo's SFT recipe.
Training FLOPs are measured per step: torch's FlopCounterMode (with fastft's formulas)
counts one real forward + backward on the run's first batch under each selection the
run made, times the optimizer steps it trained, plus two full forward + backward passes
per importance probe. Every run fine-tunes the same base on the 9000 training problems:
the model first trained with full SFT for M steps on the first R of them (by default the
demo's SFT stage: 800 steps on 700 problems, 82% of the held-out problems right).
GreenTrainer is a fine-tuning method: from random initialisation (``--base-steps 0``) it
never selects the embeddings, whose cost is the whole backward pass. Writes green.json
and green.md under --out.
"""

import argparse
import copy
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import fastft
import fastft.profile  # noqa: F401 (registers the CPU attention FLOP formula)
from fastft.demo import experiments as ex
from fastft.recipe import CausalLMLoss
from fastft.train import TrainConfig, data


def step_flops(model, batch: dict, selected) -> int:
    """FLOPs of one forward + backward of ``batch`` with ``selected`` (None: all) trainable."""
    lm = CausalLMLoss(model, TrainConfig())
    keep = None if selected is None else set(selected)
    for n, p in model.named_parameters():
        p.requires_grad_(keep is None or n in keep)
    n = torch.tensor(float(batch["input_ids"].numel()))
    with FlopCounterMode(display=False) as fc:
        loss, _ = lm(batch, num_items=n)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench-results/green")
    # 800 steps of 64 rows are 5.7 epochs of the 9000 problems: GreenTrainer re-selects at
    # epochs 0, 2 and 4 (with 200 steps, 1.4 epochs, it never re-selects)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--base-steps", type=int, default=800, help="0: every run from random weights")
    p.add_argument("--base-rows", type=int, default=700)
    p.add_argument("--interval", type=int, default=2, help="epochs between selections")
    args = p.parse_args(argv)
    t = ex.task(args.out)
    base = None
    if args.base_steps:
        few = ex.task(t.out / "base", n_train=args.base_rows)  # the first R of t's problems
        base, _ = ex.sft(few, "base", max_steps=args.base_steps, method="full")
        print(f"{'base':<16} {ex.accuracy(t, base):6.1%}  ({args.base_steps} full SFT steps "
              f"on {args.base_rows} problems)", flush=True)
    rows, full = [], None
    tok = t.tok
    recs = data.read_records(str(t.train_path), "data", skip_invalid=False)[:64]
    rows_tok, _ = data.tokenize_sft(recs, tok, max_length=32, truncation=True,
                                    completion_only=True, skip_invalid=False)
    batch = data.collate(rows_tok, tok.pad_token_id)
    for name, extra in [("full", dict(method="full")),
                        *[(f"green rho={r}", dict(method="green", rho=r,
                                                         green_interval=args.interval))
                          for r in (0.7, 0.5, 0.3)]]:
        start = fastft.unpatch(copy.deepcopy(base)) if base is not None else None
        model, summary = ex.sft(t, name.replace(" ", "_").replace("=", ""), model=start,
                                max_steps=args.steps, seed=1 if base is not None else 0,
                                **extra)
        method = model._fastft.method
        if extra["method"] == "full":
            flops = args.steps * step_flops(model, batch, None)
            full = flops
            selections = ""
        else:
            everything = step_flops(model, batch, [n for n, _ in model.named_parameters()])
            flops = sum(h["steps"] * step_flops(model, batch, h["selected"]) + 2 * everything
                        for h in method.history)
            selections = "; ".join(f"epoch {h['epoch']}: {len(h['selected'])} tensors, "
                                   f"{h['steps']} steps" for h in method.history)
        acc = ex.accuracy(t, model)
        rows.append({"run": name, "held_out_exact_match": round(acc, 4), "train_flops": flops,
                     "flops_vs_full": round(flops / full, 3),
                     "wall_seconds": summary["wall_seconds"], "selections": selections})
        print(f"{name:<16} {acc:6.1%}  {flops / 1e12:8.3f} TFLOP  {flops / full:5.2f}x  "
              f"{summary['wall_seconds']:.0f} s  {selections}", flush=True)
    md = ["| run | held-out exact match | training TFLOP | vs full | wall time |",
          "|---|---|---|---|---|"]
    md += [f"| {r['run']} | {r['held_out_exact_match']:.1%} | {r['train_flops'] / 1e12:.2f} | "
           f"{r['flops_vs_full']:.2f}x | {r['wall_seconds']:.0f} s |" for r in rows]
    (t.out / "green.json").write_text(json.dumps(rows, indent=1))
    (t.out / "green.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main(sys.argv[1:])
