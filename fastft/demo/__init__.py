"""The embedded default run: arithmetic, a small model built locally, SFT then GRPO."""

from .run import run_demo

__all__ = ["run_demo"]
