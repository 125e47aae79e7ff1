#!/usr/bin/env python
"""The kernels behind the largest GPU misses: a short torch.profiler table per case.

    python benches/kernel_profile.py [--device cuda|cpu] [--quick] [--out DIR]

Cases: the fused loss head with the head trained (cross-entropy, GRPO, OTR), fastft's
provider of the losses suite at its shape (``--quick``: the suite's small shape). Each
case runs twice to warm up, then three times under the profiler; the table lists the
ten kernels (CUDA) or operators (CPU) with the most self time, their calls and their
share of the case's time. Writes ``kernel_profile.json`` and ``.md`` under ``--out``
as each case ends (a run cut short keeps what it measured).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from fastft.bench.suites import losses

CASES = ("cross_entropy", "grpo", "otr")


def table(prof, device: str, top: int = 10) -> list[dict]:
    events = prof.key_averages()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    rows = [e for e in events if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in rows) or 1
    rows.sort(key=lambda e: -getattr(e, attr))
    return [{"name": e.key[:90], "calls": e.count, "self_ms": round(getattr(e, attr) / 1e3, 3),
             "share": round(getattr(e, attr) / total, 3)} for e in rows[:top]]


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench-results/kernel-profile")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes, dtype = losses._shapes(args.device, args.quick)
    shape = shapes[0]
    activities = [ProfilerActivity.CUDA] if args.device == "cuda" else [ProfilerActivity.CPU]
    result = {}
    for loss in CASES:
        run = losses._build(loss, "fastft", shape["T"], shape["H"], shape["V"], dtype,
                            args.device, True)
        for _ in range(2):
            run()
        if args.device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(3):
                run()
            if args.device == "cuda":
                torch.cuda.synchronize()
        result[loss] = {"params": dict(shape, head="train"), "dtype": dtype,
                        "kernels": table(prof, args.device)}
        (out / "kernel_profile.json").write_text(json.dumps(result, indent=1))
        md = []
        for name, r in result.items():
            md += [f"### {name} ({r['params']}, {r['dtype']}, 3 runs)", "",
                   "| kernel | calls | self ms | share |", "|---|---|---|---|"]
            md += [f"| {k['name']} | {k['calls']} | {k['self_ms']:.3f} | {k['share']:.1%} |"
                   for k in r["kernels"]]
            md.append("")
        (out / "kernel_profile.md").write_text("\n".join(md))
        print(f"{loss}: " + ", ".join(f"{k['name'][:40]} {k['share']:.0%}"
                                      for k in result[loss]["kernels"][:3]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
