#!/usr/bin/env python
"""SparseAdamW step against dense AdamW (time, bytes moved, GB/s against a plain copy), and
optimizer state per sparse method on a tiny Llama and on Llama-3-8B (meta device).

    python benches/bench_sparse.py [--device cpu|cuda] [--out DIR] [--quick]
"""

import sys

from fastft.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "sparse", *sys.argv[1:]]))
