#!/usr/bin/env python
"""Fused LoRA linear against the plain composition, PEFT, and the frozen base GEMMs.

    python benches/bench_lora.py [--device cpu|cuda] [--out DIR] [--quick]
"""

import sys

from fastft.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "lora", *sys.argv[1:]]))
