"""The demo task as a bench for recipes: one data set, SFT runs with overrides, held-out accuracy.

Used by the comparison programs in benches/ (recipes_demo.py, roste_demo.py): each
variant trains the demo model from the same start on the same data and reports
held-out exact match and wall time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..train import TrainConfig, Trainer
from . import arithmetic as ar
from .run import SFT, write_jsonl


@dataclass
class Task:
    out: Path
    tok: object
    train_path: Path
    eval_path: Path
    held_out: list


def task(out: str | Path, *, seed: int = 0, n_train: int = 9000, n_eval: int = 300) -> Task:
    out = Path(out)
    held_out = ar.problems(n_eval, seed=seed + 1)
    train = ar.problems(n_train, seed=seed + 2, exclude=set(held_out))
    data = out / "data"
    return Task(out=out, tok=ar.tokenizer(),
                train_path=write_jsonl(ar.sft_records(train), data / "train.jsonl"),
                eval_path=write_jsonl(ar.sft_records(held_out[:100]), data / "eval.jsonl"),
                held_out=held_out)


def sft(t: Task, name: str, *, seed: int = 0, model=None, **overrides):
    """Train the demo model (fresh from ``seed`` unless ``model`` is given) with the demo's
    SFT recipe and ``overrides``; returns (model, summary with wall seconds)."""
    model = model if model is not None else ar.model(t.tok, seed=seed)
    cfg = TrainConfig(**{**SFT, "seed": seed, "output_dir": str(t.out / name), "overwrite": True,
                         "progress": False, **overrides})
    t0 = time.perf_counter()
    summary = Trainer(model, t.tok, str(t.train_path), cfg).train()
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return model, summary


def accuracy(t: Task, model) -> float:
    with torch.no_grad():
        return ar.accuracy(model, t.tok, t.held_out)


class Results:
    """Rows of (what, held-out exact match, wall time): printed as they come, then written
    as ``<name>.json`` and ``<name>.md`` in the task's folder."""

    def __init__(self, t: Task, label: str):
        self.t, self.label, self.rows = t, label, []

    def add(self, name: str, model, wall: float | None = None) -> float:
        acc = accuracy(self.t, model)
        self.rows.append({self.label: name, "held_out_exact_match": round(acc, 4),
                          "wall_seconds": wall})
        print(f"{name:<40} {acc:6.1%}  {'' if wall is None else f'{wall:.0f} s'}", flush=True)
        return acc

    def write(self, name: str) -> str:
        import json

        (self.t.out / f"{name}.json").write_text(json.dumps(self.rows, indent=1))
        md = [f"| {self.label} | held-out exact match | wall time |", "|---|---|---|"]
        md += [f"| {r[self.label]} | {r['held_out_exact_match']:.1%} | "
               f"{'-' if r['wall_seconds'] is None else str(round(r['wall_seconds'])) + ' s'} |"
               for r in self.rows]
        text = "\n".join(md) + "\n"
        (self.t.out / f"{name}.md").write_text(text)
        print(text)
        return text
