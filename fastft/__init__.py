"""fastft: fine-tuning on fused kernels, each proven against a plain PyTorch reference."""

from . import losses
from .errors import FastftError

__version__ = "0.1.0"
__all__ = ["FastftError", "losses", "__version__"]
