"""Training: the Trainer loop (its settings, TrainConfig, are fastft.recipe's)."""

from ..recipe import TrainConfig
from .trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]
