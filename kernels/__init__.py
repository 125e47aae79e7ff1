"""Triton kernels of fastft (installed as ``fastft.kernels``).

One kernel family per file. Each file holds only ``@triton.jit`` kernels and
small launch helpers that take and return tensors, plus ``aot_specs()``: every
(kernel, signature, constexprs, options) it ships, which ``fastft
check-kernels`` compiles ahead of time for sm_90 and sm_80.
"""

import os

# Triton 3.9 warns when this is unset; keep its current default (fusion on).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

KERNEL_FILES = (
    "loss_rows", "gumbel_sample", "lora_matmul", "sparse_adam", "hadamard", "fake_quant",
)
