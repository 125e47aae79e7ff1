#!/usr/bin/env python
"""The seed recipes on the demo task: held-out exact match (and wall time) of each.

    python benches/recipes_demo.py [--out DIR] [--steps N] [--train N]

SFT (three seeds of the data order, one initialisation), SFT + Masked Thought,
SFT with UDS keeping 50% of twice as many candidates, a uniform and a greedy soup
of the three SFT runs (greedy scored on 100 validation problems), and LiNeS
(alpha 0.5, beta 0.5) from the initial model to the first SFT run. Prints a
table and writes recipes.json and recipes.md under --out.
"""

import argparse
import copy
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM

import fastft
from fastft.demo import arithmetic as ar
from fastft.demo import experiments as ex


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench-results/recipes")
    p.add_argument("--steps", type=int, default=800)  # the demo's SFT recipe
    p.add_argument("--train", type=int, default=9000)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t = ex.task(args.out, n_train=args.train)
    valid = ar.problems(100, seed=99, exclude=set(t.held_out))
    init = ar.model(t.tok, seed=0)
    init.save_pretrained(t.out / "init")
    t.tok.save_pretrained(t.out / "init")
    results = ex.Results(t, "recipe")
    add = results.add

    runs = []
    for seed in (0, 1, 2):
        model, s = ex.sft(t, f"sft-seed{seed}", seed=seed, model=copy.deepcopy(init),
                          max_steps=args.steps)
        add(f"SFT (seed {seed})", model, s["wall_seconds"])
        runs.append(t.out / f"sft-seed{seed}")
    model, s = ex.sft(t, "masked-thought", model=copy.deepcopy(init), max_steps=args.steps,
                      masked_thought=0.4)
    add("SFT + Masked Thought 0.4", model, s["wall_seconds"])
    model, s = ex.sft(t, "uds", model=copy.deepcopy(init), max_steps=args.steps, select="uds",
                      select_ratio=0.5)
    add("SFT + UDS 50%", model, s["wall_seconds"])

    def load(folder):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    def valid_score(folder):
        with torch.no_grad():
            return ar.accuracy(load(folder), t.tok, valid)

    for name in ("soup-uniform", "soup-greedy", "lines"):  # a run's outputs before this one
        shutil.rmtree(t.out / name, ignore_errors=True)
    add("uniform soup of 3", load(fastft.uniform_soup(runs, t.out / "soup-uniform")))
    greedy = fastft.greedy_soup(runs, t.out / "soup-greedy", valid_score)
    add(f"greedy soup (kept {len(greedy['kept'])})", load(greedy["out"]))
    add("LiNeS a=0.5 b=0.5 (seed 0)",
        load(fastft.lines(t.out / "init", runs[0], t.out / "lines", alpha=0.5, beta=0.5)))
    results.write("recipes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
