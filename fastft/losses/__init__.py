"""Fused losses computed from hidden states and the output head, never from full logits."""

from .cross_entropy import asft, cross_entropy, dft
from .grpo import group_advantages, grpo, selective_logprobs
from .otr import otr

__all__ = ["asft", "cross_entropy", "dft", "group_advantages", "grpo", "otr",
           "selective_logprobs"]
