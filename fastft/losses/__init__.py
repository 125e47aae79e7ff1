"""Fused losses computed from hidden states and the output head, never from full logits."""

from .cross_entropy import cross_entropy

__all__ = ["cross_entropy"]
