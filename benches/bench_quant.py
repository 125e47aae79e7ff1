#!/usr/bin/env python
"""RoSTE's kernels: the Walsh-Hadamard transform (fastft, torch path, dense matmul, copy) and the
fused rotate + fake-quant against the unfused torch composition (time, peak memory, GB/s).

    python benches/bench_quant.py [--device cpu|cuda] [--out DIR] [--quick]
"""

import sys

from fastft.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "quant", *sys.argv[1:]]))
