"""Triton kernels of fastft (installed as ``fastft.kernels``).

One kernel family per file. Each file holds only ``@triton.jit`` kernels and
small launch helpers that take and return tensors, plus ``aot_specs()``: every
(kernel, signature, constexprs, options) it ships, which ``fastft
check-kernels`` compiles ahead of time for sm_90 and sm_80.
"""

import os
import sys

if __name__ == "kernels":
    # Imported by the top-level name: a checkout's root is on sys.path (``python -m ...`` or
    # ``python -c`` run there) and this folder hides the library named ``kernels`` that
    # transformers imports. Hand that library over instead, so a checkout works like an install.
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = PathFinder.find_spec(__name__, [p for p in sys.path
                                            if os.path.abspath(p or ".") != _root])
    if _spec is None:
        # That library is not installed. Stay an empty module that reads like a stray folder
        # of that name (no __file__, no version, no submodules), so that probes such as
        # transformers' is_kernels_available() answer "not installed" instead of failing,
        # and ``from kernels import x`` raises ImportError as it would without this folder.
        __file__ = None
        __path__ = []
    else:
        _real = module_from_spec(_spec)
        sys.modules[__name__] = _real
        _spec.loader.exec_module(_real)
else:
    # Triton 3.9 warns when this is unset; keep its current default (fusion on).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    KERNEL_FILES = (
        "loss_rows", "gumbel_sample", "grad_scale", "lora_matmul", "sparse_adam", "hadamard",
        "fake_quant",
    )
