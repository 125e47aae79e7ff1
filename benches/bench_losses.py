#!/usr/bin/env python
"""The fused loss head against the materialising reference (and Liger on CUDA).

    python benches/bench_losses.py [--device cpu|cuda] [--out DIR] [--quick]
"""

import sys

from fastft.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "losses", *sys.argv[1:]]))
