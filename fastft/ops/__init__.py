"""Fused ops, one file each. Importing this package registers them all."""

from . import linear_cross_entropy  # noqa: F401
