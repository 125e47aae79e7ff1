#!/usr/bin/env python
"""A whole training step (LoRA SFT, full SFT, GRPO) of fastft against transformers + PEFT,
Liger (CUDA) and TRL's trainers, on a Llama-shaped model with random weights.

    python benches/bench_step.py [--device cpu|cuda] [--out DIR] [--quick] [--op lora_sft]
"""

import sys

from fastft.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "step", *sys.argv[1:]]))
