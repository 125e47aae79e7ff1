"""Fused ops, one file each. Importing this package registers them all."""

from . import linear_cross_entropy, linear_grpo, linear_otr, lora_linear, sparse_adam  # noqa: F401
