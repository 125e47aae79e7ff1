"""fastft: fine-tuning on fused kernels, each proven against a plain PyTorch reference."""

from . import losses, optim, quantize
from .adapters import load_adapter, save_adapter
from .errors import FastftError
from .merging import lines
from .methods import HFT, LIFT, LTSFT, Full, GreenTrainer, LoRA, LoRASB, RoSTE, compose
from .patch import disable_adapters, merge, prepare, unmerge, unpatch
from .soups import greedy_soup, uniform_soup
from .train import TrainConfig, Trainer

__version__ = "0.1.0"
__all__ = ["GreenTrainer", "HFT", "LIFT", "LTSFT", "FastftError", "Full", "LoRA", "LoRASB", "RoSTE",
           "TrainConfig", "Trainer", "__version__", "compose", "disable_adapters", "greedy_soup",
           "lines", "load_adapter", "losses", "merge", "optim", "prepare", "quantize",
           "save_adapter", "uniform_soup", "unmerge", "unpatch"]
