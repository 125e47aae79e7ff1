"""fastft: fine-tuning on fused kernels, each proven against a plain PyTorch reference."""

from . import losses
from .adapters import load_adapter, save_adapter
from .errors import FastftError
from .methods import Full, LoRA, LoRASB
from .patch import disable_adapters, merge, prepare, unpatch

__version__ = "0.1.0"
__all__ = ["FastftError", "Full", "LoRA", "LoRASB", "__version__", "disable_adapters",
           "load_adapter", "losses", "merge", "prepare", "save_adapter", "unpatch"]
