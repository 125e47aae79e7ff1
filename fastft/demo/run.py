"""``fastft train`` with no arguments (and ``make demo``): SFT, then GRPO, on arithmetic.

Builds the task, tokenizer and a small model locally, measures held-out exact
match before training, after SFT and after GRPO (exact-answer reward), and
writes the run folder: data, per-stage config, metrics JSONL and checkpoint,
and ``summary.json``. SFT sees 700 worked solutions, too few to learn addition
for every pair of numbers (about four held-out problems in five come out right);
GRPO then trains on 4500 other problems that carry only their answer, rewarded
for an exact final sum, as verifiable-reward training does with a model that
has seen a few demonstrations.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..train import TrainConfig, Trainer
from ..train.runlog import summary_table
from . import arithmetic as ar

SFT = dict(objective="sft", loss="ce", method="full", lr=1e-3, batch_size=64, grad_accum=1,
           max_steps=800, warmup_ratio=0.05, schedule="cosine", weight_decay=0.01,
           max_grad_norm=1.0, max_length=32, log_every=20)
GRPO = dict(objective="grpo", method="full", lr=1e-4, batch_size=256, prompts_per_step=32,
            num_generations=8, max_completion_length=10, sampling_temperature=0.7, beta=0.0,
            loss_type="dapo", max_steps=400, warmup_ratio=0.0, schedule="constant",
            max_grad_norm=1.0, log_every=20)
# worked solutions SFT learns from (too few for every pair: SFT stops short of perfect, so
# GRPO has mistakes to fix) and answer-only problems GRPO trains on
SFT_PROBLEMS, GRPO_PROBLEMS = 700, 4500


def write_jsonl(rows, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def markdown(summary: dict) -> str:
    """The README's table of a demo run (benches/readme_tables.py puts it there)."""
    steps = {s["name"]: s["steps"] for s in summary["stages"]}
    acc = {s["name"]: s["accuracy"] for s in summary["stages"]}
    sft = f"after SFT ({steps['sft']} steps on {summary['sft_problems']} worked solutions)"
    grpo = (f"after GRPO ({steps['grpo']} steps on {summary['grpo_problems']} answer-only "
            "problems)")
    return ("| stage | held-out exact match (300 unseen problems) |\n|---|---|\n"
            f"| before training | {summary['baseline_accuracy']:.1%} |\n"
            f"| {sft} | {acc['sft']:.1%} |\n"
            f"| {grpo} | {acc['grpo']:.1%} |\n"
            f"| wall time, 2 CPU cores | {summary['wall_seconds']:.0f} s |\n")


def run_demo(output: str | None = None, *, quick: bool = False, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(output or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-demo")
    out.mkdir(parents=True, exist_ok=True)
    n_sft = SFT_PROBLEMS
    n_grpo, n_eval = (500, 100) if quick else (GRPO_PROBLEMS, 300)
    held_out = ar.problems(n_eval, seed=seed + 1)
    train = ar.problems(n_sft + n_grpo, seed=seed + 2, exclude=set(held_out))
    data = out / "data"
    write_jsonl(ar.sft_records(train[:n_sft]), data / "train.jsonl")
    write_jsonl(ar.prompt_records(train[n_sft:]), data / "prompts.jsonl")
    write_jsonl(ar.prompt_records(held_out), data / "eval.jsonl")

    tok = ar.tokenizer()
    tok.save_pretrained(out / "tokenizer")
    model = ar.model(tok, seed=seed)
    print(f"fastft demo: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter "
          f"Llama-config model; SFT on {n_sft} worked solutions, GRPO on {n_grpo} answers; "
          f"run folder {out}")
    stages = []
    baseline = ar.accuracy(model, tok, held_out)
    print(f"held-out exact match before training: {baseline:.1%}")

    # the demo owns its folder: a second run into it replaces the first one's stages
    sft_cfg = dict(SFT, seed=seed, output_dir=str(out / "sft"), overwrite=True)
    grpo_cfg = dict(GRPO, seed=seed, output_dir=str(out / "grpo"), overwrite=True)
    if quick:
        sft_cfg.update(max_steps=60, log_every=10)
        grpo_cfg.update(max_steps=4, prompts_per_step=4, log_every=1)
    sft = Trainer(model, tok, str(data / "train.jsonl"), TrainConfig(**sft_cfg)).train()
    acc = ar.accuracy(model, tok, held_out)
    stages.append({"name": "sft", "accuracy": acc, "final_loss": sft["final_loss"],
                   "steps": sft["steps"], "checkpoint": sft["checkpoint"]})
    print(f"held-out exact match after SFT: {acc:.1%}")

    grpo = Trainer(model, tok, str(data / "prompts.jsonl"), TrainConfig(**grpo_cfg),
                   reward_fn=ar.exact_reward).train()
    acc = ar.accuracy(model, tok, held_out)
    stages.append({"name": "grpo", "accuracy": acc, "reward_mean": grpo["reward_mean"],
                   "steps": grpo["steps"], "checkpoint": grpo["checkpoint"]})
    print(f"held-out exact match after GRPO: {acc:.1%}")

    summary = {"stages": stages, "baseline_accuracy": baseline, "sft_problems": n_sft,
               "grpo_problems": n_grpo,
               "wall_seconds": round(time.perf_counter() - t0, 1), "output_dir": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    rows = {"baseline": f"{baseline:.1%}"}
    rows.update({s["name"]: f"{s['accuracy']:.1%}" for s in stages})
    rows["wall time"] = f"{summary['wall_seconds']:.0f} s"
    print(summary_table(f"held-out exact match ({ar.DIGITS}-digit addition)", rows))
    print(f"run folder: {out} (summary.json, sft/, grpo/, data/, tokenizer/)")
    return summary
