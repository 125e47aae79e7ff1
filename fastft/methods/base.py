"""The contract between a fine-tuning method and fastft.prepare / fastft.Trainer.

LoRA, LoRA-SB and Full are handled by fastft.patch itself. Any other method
(the sparse masks: LIFT, HFT, LT-SFT) is an object with ``prepare_model`` and
any of the optional hooks below; the trainer calls each hook it finds.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Method(Protocol):
    def prepare_model(self, model: nn.Module) -> list[str]:
        """Freeze / mark what trains (in place); return the paths of the trained modules."""


class Hooks:
    """Optional hooks, all no-ops here; a method overrides what it needs.

    - ``make_optimizer``: the optimizer over the model's trainable parameters, or
      None for the trainer's AdamW (torch's fused one where available);
    - ``phases``: names of the training phases, run one after the other over the
      whole schedule (LT-SFT: "full" then "sparse"); ``on_phase_begin`` may
      return a new optimizer for the phase;
    - ``on_epoch_begin`` / ``on_step_end``: mask refreshes and re-draws;
    - ``state_dict`` / ``load_state_dict``: tensors (and JSON-able values) a
      checkpoint must keep for an exact resume.
    """

    def make_optimizer(self, model: nn.Module, *, lr: float, betas=(0.9, 0.999),
                       eps: float = 1e-8, weight_decay: float = 0.0
                       ) -> torch.optim.Optimizer | None:
        return None

    def phases(self) -> list[str]:
        return ["train"]

    def on_phase_begin(self, model: nn.Module, optimizer, phase: str):
        return None

    def on_epoch_begin(self, model: nn.Module, optimizer, epoch: int) -> None:
        pass

    def on_step_end(self, model: nn.Module, optimizer, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
