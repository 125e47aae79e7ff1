"""Fine-tuning methods: adapters (LoRA, LoRA-SB), sparse masks (LIFT, HFT, LT-SFT), RoSTE."""

from .green import GreenTrainer
from .hft import HFT
from .lift import LIFT, principal_mask
from .lora import Full, LoRA, LoRALinear, LoRASB, LoRASBLinear
from .ltsft import LTSFT
from .roste import RoSTE
from .sparse_diff import compose, load_sparse_diff, save_sparse_diff

__all__ = ["GreenTrainer", "HFT", "LIFT", "LTSFT", "Full", "LoRA", "LoRALinear", "LoRASB", "LoRASBLinear",
           "RoSTE", "compose", "load_sparse_diff", "principal_mask", "save_sparse_diff"]
