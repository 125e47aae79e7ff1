"""Optimizers: SparseAdamW, AdamW with state only for the trained entries of each weight."""

from .io import load, save
from .sparse_adamw import (
    SparseAdamW,
    index_dtype,
    mask_indices,
    random_mask,
    state_bytes_for,
)

__all__ = ["SparseAdamW", "index_dtype", "load", "mask_indices", "random_mask", "save",
           "state_bytes_for"]
