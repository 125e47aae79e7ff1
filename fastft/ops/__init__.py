"""Fused ops, one file each. Importing this package registers them all.

``fastft.ops.hadamard``, ``fake_quant_act`` and ``fake_quant_weight`` are the
functions of the RoSTE ops (the modules stay importable by their full names).
"""

from . import (  # noqa: F401
    fake_quant,
    linear_cross_entropy,
    linear_grpo,
    linear_otr,
    lora_linear,
    sparse_adam,
)
from .fake_quant import fake_quant_act, fake_quant_weight  # noqa: F401
from .hadamard import hadamard  # noqa: F401  (the function; the module: fastft.ops.hadamard)
