#!/usr/bin/env python
"""fastft.profile's prediction against the real CPU step, on the demo model.

    python benches/profile_check.py [--out DIR] [--device cuda]

CPU: full fine-tuning, LoRA (r 16) and LIFT on the demo model and its SFT batch
(64 x 32 tokens, fp32). CUDA: full and LoRA on a Llama-shaped model (hidden 2048,
8 layers, vocab 32000, bf16, 2 x 1024 tokens). The traced peak and FLOPs beside the
real step's (torch's FlopCounterMode; the CPU allocator's byte counts, or
torch.cuda.max_memory_allocated). Writes profile_check.json/.md; a row's
``within_10pct`` is the target of the profile (predicted peak within 10%).
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
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    rows = []
    if args.device == "cuda":
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                       num_hidden_layers=8, num_attention_heads=16,
                                       num_key_value_heads=4, tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"
        B, S, dtype = 2, 1024, torch.bfloat16
        methods = {"full": fastft.Full, "lora": lambda: fastft.LoRA(r=16)}

        def model_for():  # initialised on the GPU: seconds faster than on the CPU
            torch.manual_seed(0)
            with torch.device("cuda"):
                return transformers.LlamaForCausalLM(cfg).to(dtype).train()
    else:
        tok = ar.tokenizer()
        B, S, dtype, methods = 64, 32, torch.float32, METHODS

        def model_for():
            return ar.model(tok, seed=0).train()
    for name, make in methods.items():
        model = model_for()
        ids = torch.randint(4, model.config.vocab_size, (B, S),
                            generator=torch.Generator().manual_seed(0)).to(args.device)
        real = measure.real_step(model, make(), {"input_ids": ids, "labels": ids.clone()},
                                max_length=S)
        tr = pstep.trace(model.config, make(), batch_size=B, seq_len=S, dtype=dtype,
                         kind=args.device)
        rows.append({"method": name, "device": args.device, "peak_predicted": tr.peak_bytes,
                     "peak_measured": real["peak"], "flops_predicted": tr.flops_total,
                     "flops_measured": real["flops"],
                     "within_10pct": abs(tr.peak_bytes - real["peak"]) <= 0.1 * real["peak"]})
        del model
    md = ["| method | predicted peak | measured peak | ratio | predicted GFLOP | measured GFLOP |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['peak_predicted'] / 2**20:.2f} MiB | "
           f"{r['peak_measured'] / 2**20:.2f} MiB | {r['peak_predicted'] / r['peak_measured']:.3f} | "
           f"{r['flops_predicted'] / 1e9:.3f} | {r['flops_measured'] / 1e9:.3f} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_check.json").write_text(json.dumps(rows, indent=1))
    (out / "profile_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main(sys.argv[1:])
