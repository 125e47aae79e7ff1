"""fastft: fine-tuning on fused kernels, each proven against a plain PyTorch reference."""

from . import losses, optim
from .adapters import load_adapter, save_adapter
from .errors import FastftError
from .methods import HFT, LIFT, LTSFT, Full, LoRA, LoRASB, compose
from .patch import disable_adapters, merge, prepare, unmerge, unpatch
from .train import TrainConfig, Trainer

__version__ = "0.1.0"
__all__ = ["HFT", "LIFT", "LTSFT", "FastftError", "Full", "LoRA", "LoRASB", "TrainConfig",
           "Trainer", "__version__", "compose", "disable_adapters", "load_adapter", "losses",
           "merge", "optim", "prepare", "save_adapter", "unmerge", "unpatch"]
