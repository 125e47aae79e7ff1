"""LoRA and LoRA-SB adapter layers and their configs (METHODS.md §2).

A targeted ``nn.Linear`` is replaced by :class:`LoRALinear` (or
:class:`LoRASBLinear`), which keeps the original layer as ``base_layer``
(frozen) and runs the fused op ``fastft::lora_linear``. With dropout > 0 in
training, the LoRA path runs as the plain composition (dropout on its input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..errors import FastftError, check
from ..ops import lora_linear as _op


@dataclass
class LoRA:
    """y = x W0^T + (alpha / r) (x A^T) B^T; alpha / sqrt(r) with ``rslora``."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    rslora: bool = False

    def __post_init__(self):
        check(isinstance(self.r, int) and self.r >= 1, f"LoRA r must be an int >= 1; got {self.r!r}")
        check(0.0 <= self.dropout < 1.0, f"LoRA dropout must be in [0, 1); got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclass
class LoRASB:
    """y = x W0^T + B R A x with A, B frozen (from the update approximation) and R trained."""

    r: int = 96
    target_modules: str | list[str] = "all-linear"
    n_init: int = 50
    lr: float = 1e-4
    warmup_ratio: float = 0.02

    def __post_init__(self):
        check(isinstance(self.r, int) and self.r >= 1, f"LoRASB r must be an int >= 1; got {self.r!r}")


@dataclass
class Full:
    """Full fine-tuning: every parameter trains; nothing is replaced."""

    target_modules: list[str] = field(default_factory=list)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a LoRA adapter (PEFT's layout: lora_A [r, in], lora_B [out, r])."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        self.base_layer = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha, self.rslora, self.dropout = r, alpha, rslora, dropout
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.disabled = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads .weight of a linear layer sees W0
        return self.base_layer.weight

    def adapter(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
        """(A, B, R or None, scale) of y = x W0^T + scale B R A x."""
        return self.lora_A, self.lora_B, None, self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a dense update of W0, in fp32: scale B R A."""
        a, b, r, s = self.adapter()
        mid = a.float() if r is None else r.float() @ a.float()
        return s * (b.float() @ mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        a, b, r, s = self.adapter()
        w, bias = self.base_layer.weight, self.base_layer.bias
        if self.dropout > 0.0 and self.training:
            from ..reference import lora as ref

            drop = lambda t: F.dropout(t, self.dropout, True)  # noqa: E731
            return ref.lora_linear(x, w, bias, a, b, r, s, dropout=drop)
        if backends.choose(_op.INFO, x.device) == "reference":
            from ..reference import lora as ref

            return ref.lora_linear(x, w, bias, a, b, r, s)
        if x.dtype != w.dtype:
            raise FastftError(f"{type(self).__name__}: input is {x.dtype} but the base weight is "
                              f"{w.dtype}: cast the model or run under torch.autocast")
        lead = x.shape[:-1]
        y, _ = torch.ops.fastft.lora_linear(x.reshape(-1, x.shape[-1]), w, bias, a, b, r, s)
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"


class LoRASBLinear(LoRALinear):
    """LoRA-SB: A [r, in] and B [out, r] frozen, R [r, r] trained; y = x W0^T + B R A x."""

    def __init__(self, base: nn.Linear, r: int):
        super().__init__(base, r, alpha=r, dropout=0.0)
        self.lora_A.requires_grad_(False)
        self.lora_B.requires_grad_(False)
        nn.init.zeros_(self.lora_A)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_R = nn.Parameter(torch.zeros(r, r, device=dev, dtype=dt))
        self.scaling = 1.0
        self.initialized = False  # set by lora_sb.initialize or by loading an adapter

    def adapter(self):
        return self.lora_A, self.lora_B, self.lora_R, 1.0

    def forward(self, x):
        if self.training and not self.disabled and not self.initialized:
            raise FastftError("LoRA-SB adapters are not initialised: call "
                              "fastft.methods.lora_sb.initialize(model, batches, total_steps=...) "
                              "before training (the trainer does it for you)")
        return super().forward(x)


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA / LoRA-SB layer of ``model`` by its module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
