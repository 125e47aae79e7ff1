"""Fine-tuning methods: adapters (LoRA, LoRA-SB) and, later, sparse masks and selection."""

from .lora import Full, LoRA, LoRALinear, LoRASB, LoRASBLinear

__all__ = ["Full", "LoRA", "LoRALinear", "LoRASB", "LoRASBLinear"]
