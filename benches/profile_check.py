#!/usr/bin/env python
"""fastft.profile's prediction against the real CPU step, on the demo model.

    python benches/profile_check.py [--out DIR]

For full fine-tuning, LoRA (r 16) and LIFT on the demo model and its SFT batch
(64 x 32 tokens, fp32): the traced peak and FLOPs beside the real step's (torch's
FlopCounterMode, the CPU allocator's byte counts). Writes profile_check.json/.md.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import fastft
from fastft.demo import arithmetic as ar
from fastft.profile import measure
from fastft.profile import step as pstep

METHODS = {"full": fastft.Full, "lora": lambda: fastft.LoRA(r=16),
           "lift": lambda: fastft.LIFT(lora_rank=16, filter_rank=16)}


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench-results/profile")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = ar.tokenizer()
    B, S = 64, 32
    rows = []
    for name, make in METHODS.items():
        model = ar.model(tok, seed=0).train()
        ids = torch.randint(4, len(tok), (B, S), generator=torch.Generator().manual_seed(0))
        real = measure.cpu_step(model, make(), {"input_ids": ids, "labels": ids.clone()},
                                max_length=S)
        tr = pstep.trace(model.config, make(), batch_size=B, seq_len=S, dtype=torch.float32,
                         kind="cpu")
        rows.append({"method": name, "peak_predicted": tr.peak_bytes, "peak_measured": real["peak"],
                     "flops_predicted": tr.flops_total, "flops_measured": real["flops"]})
    md = ["| method | predicted peak | measured peak | ratio | predicted GFLOP | measured GFLOP |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['peak_predicted'] / 2**20:.2f} MiB | "
           f"{r['peak_measured'] / 2**20:.2f} MiB | {r['peak_predicted'] / r['peak_measured']:.3f} | "
           f"{r['flops_predicted'] / 1e9:.3f} | {r['flops_measured'] / 1e9:.3f} |" for r in rows]
    (out / "profile_check.json").write_text(json.dumps(rows, indent=1))
    (out / "profile_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main(sys.argv[1:])
