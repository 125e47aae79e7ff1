#!/usr/bin/env python
"""RoSTE on the demo task at W4A4KV4: held-out exact match of four ways to a 4-bit model.

    python benches/roste_demo.py [--out DIR] [--steps N] [--train N] [--hidden H]

1. SFT in full precision (the demo's recipe);
2. that model quantized after training, round-to-nearest (fake W4A4KV4, no rotations);
3. QAT without rotations: SFT under fake W4A4KV4 (RoSTE with rotations="none");
4. RoSTE: SFT under fake W4A4KV4 with the adaptive rotations.
Prints a table and writes roste.json and roste.md under --out.
"""

import argparse
import copy
import sys

import torch

import fastft
from fastft.demo import arithmetic as ar
from fastft.demo import experiments as ex

BITS = dict(w_bits=4, a_bits=4, kv_bits=4)


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench-results/roste")
    p.add_argument("--steps", type=int, default=800)  # the demo's SFT recipe
    p.add_argument("--train", type=int, default=9000)
    p.add_argument("--hidden", type=int, default=128)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t = ex.task(args.out, n_train=args.train)
    init = ar.model(t.tok, seed=0, hidden=args.hidden)
    results = ex.Results(t, "model")
    add = results.add

    fp, s = ex.sft(t, "sft-fp", model=copy.deepcopy(init), max_steps=args.steps)
    add("SFT, full precision", fp, s["wall_seconds"])
    rtn = fastft.prepare(fastft.unpatch(copy.deepcopy(fp)), fastft.RoSTE(**BITS, rotations="none"))
    add("SFT, then round-to-nearest W4A4KV4", rtn)
    qat, s = ex.sft(t, "qat", model=copy.deepcopy(init), max_steps=args.steps, method="roste",
                    rotations="none", **BITS)
    add("QAT W4A4KV4, no rotations", qat, s["wall_seconds"])
    roste, s = ex.sft(t, "roste", model=copy.deepcopy(init), max_steps=args.steps,
                      method="roste", rotations="adaptive", **BITS)
    add("RoSTE W4A4KV4 (adaptive rotations)", roste, s["wall_seconds"])
    results.write("roste")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
