"""The kernel backends of fastft::hadamard, fastft::fake_quant_act and fastft::fake_quant_weight.

Each function runs the op's forward on ``backend`` ("triton": kernels/hadamard.py and
kernels/fake_quant.py; "cpp": csrc/hadamard.cpp; "cuda": csrc/hadamard.cu through
fastft/cuda_lib.py) and returns its [R, n] result in the input's dtype, or None when that
backend cannot run this call, so that the op's dispatch point falls through to its torch
path:

- "triton": P <= 32768 (kernels.hadamard.MAX_P), persistent programs over whole-row tiles
  (K = 1, or K <= 32 with H_K by tl.dot) or segments; a larger power of two (n up to 2^20
  when K = 1) takes the torch path;
- "cpp": every size (n = K P, any P); None only if csrc/hadamard.cpp failed to build
  (fastft.extensions records why; FASTFT_REQUIRE_CPP=1 raises instead);
- "cuda": every size where the library builds (P > 8192 folds H_2 factors into H_K); None
  on a machine without a CUDA device or nvcc (fastft.cuda_lib records why).
"""

from __future__ import annotations

import math

from torch import Tensor

from .hadamard_factors import factor, plan


def _kfactor(n: int, device):
    """(K factor [K, K] fp32 on device, or None when K = 1; P) of rows of n."""
    K, P = plan(n)
    return (factor(K, device) if K > 1 else None), P


def hadamard(x2d: Tensor, scale: float, transpose: bool, backend: str) -> Tensor | None:
    h, P = _kfactor(x2d.shape[1], x2d.device)
    if backend == "triton":
        from ..kernels import hadamard as kernel

        return kernel.hadamard(x2d, h, scale, transpose) if P <= kernel.MAX_P else None
    if backend == "cpp":
        from .. import extensions

        ext = extensions.load("hadamard")
        return None if ext is None else ext.hadamard(x2d, h, scale, transpose)
    if backend == "cuda":
        from .. import cuda_lib

        lib = cuda_lib.load("hadamard", x2d.device)
        return None if lib is None else cuda_lib.hadamard_rows(lib, x2d, h, scale, transpose)
    return None


def fake_quant_act(x2d: Tensor, bits: int, symmetric: bool, clip_ratio: float, rotate: bool,
                   backend: str) -> Tensor | None:
    """q(x) per row, or q(H x) with ``rotate`` (H normalised: scale 1 / sqrt(n))."""
    n = x2d.shape[1]
    h, P = _kfactor(n, x2d.device) if rotate else (None, 1)
    scale = 1.0 / math.sqrt(n)
    if backend == "triton":
        from ..kernels import fake_quant as kernel
        from ..kernels.hadamard import MAX_P

        if P > MAX_P:
            return None
        return kernel.fake_quant_act(x2d, h, scale, bits, symmetric, clip_ratio, rotate=rotate)
    if backend == "cpp":
        from .. import extensions

        ext = extensions.load("hadamard")
        if ext is None:
            return None
        return ext.fake_quant_act(x2d, h, scale, bits, symmetric, clip_ratio, rotate, False)
    if backend == "cuda":
        from .. import cuda_lib

        lib = cuda_lib.load("hadamard", x2d.device)
        if lib is None:
            return None
        if not rotate:
            return cuda_lib.quant_rows(lib, x2d, bits, symmetric, clip_ratio)
        return cuda_lib.hadamard_rows(lib, x2d, h, scale, False, (bits, symmetric, clip_ratio))
    return None


def fake_quant_weight(w: Tensor, bits: int, symmetric: bool, clip_ratio: float,
                      group_size: int, backend: str) -> Tensor | None:
    """q(w) per output row of w [out, in], or per group of ``group_size`` (0: whole rows)."""
    if backend == "triton":
        from ..kernels import fake_quant as kernel

        return kernel.fake_quant_weight(w, bits, symmetric, clip_ratio, group_size)
    if backend == "cpp":
        from .. import extensions

        ext = extensions.load("hadamard")
        return None if ext is None else ext.fake_quant_weight(w, bits, symmetric, clip_ratio,
                                                              group_size)
    if backend == "cuda":
        from .. import cuda_lib

        lib = cuda_lib.load("hadamard", w.device)
        if lib is None:
            return None
        g = group_size if 0 < group_size < w.shape[1] else w.shape[1]
        rows = w.contiguous().view(-1, g)
        return cuda_lib.quant_rows(lib, rows, bits, symmetric, clip_ratio).view(w.shape)
    return None
