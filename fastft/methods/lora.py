"""LoRA and LoRA-SB adapter layers and their configs (METHODS.md §2).

A targeted ``nn.Linear`` (or transformers' ``Conv1D``, the GPT-2 family's
linear layer, whose weight is stored [in, out]) is replaced by
:class:`LoRALinear` (or :class:`LoRASBLinear`), which keeps the original layer
as ``base_layer`` (frozen) and runs the fused op ``fastft::lora_linear``. With
dropout > 0 in training, the LoRA path runs as the plain composition (dropout
on its input).
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
    adapter_dtype: str = "float32"  # float32 (as PEFT keeps them) | base (the weights' dtype)

    def __post_init__(self):
        check(isinstance(self.r, int) and self.r >= 1, f"LoRA r must be an int >= 1; got {self.r!r}")
        check(0.0 <= self.dropout < 1.0, f"LoRA dropout must be in [0, 1); got {self.dropout}")
        check_adapter_dtype(self.adapter_dtype)

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
    adapter_dtype: str = "float32"  # float32 | base

    def __post_init__(self):
        check(isinstance(self.r, int) and self.r >= 1, f"LoRASB r must be an int >= 1; got {self.r!r}")
        check(self.lr > 0 and 0 <= self.warmup_ratio < 1, "LoRASB needs lr > 0 and warmup_ratio "
              f"in [0, 1); got lr={self.lr}, warmup_ratio={self.warmup_ratio}")
        check_adapter_dtype(self.adapter_dtype)


def check_adapter_dtype(value: str) -> None:
    check(value in ("float32", "base"), "adapter_dtype must be 'float32' (adapters in fp32 on a "
          f"bf16/fp16 model, as PEFT keeps them) or 'base' (the weights' dtype); got {value!r}")


def adapter_dtype(base_dtype: torch.dtype, choice: str = "float32") -> torch.dtype:
    """The dtype of new adapter parameters beside a base weight of ``base_dtype``."""
    if choice == "float32" and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


def linear_types() -> tuple[type, ...]:
    """The module types adapted as linear layers: nn.Linear and transformers' Conv1D."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is what fastft patches; without it only nn.Linear exists
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """True for a linear layer whose weight is stored [in, out] (Conv1D): y = x W + b."""
    return isinstance(module, linear_types()) and not isinstance(module, nn.Linear)


@dataclass
class Full:
    """Full fine-tuning: every parameter trains; nothing is replaced."""

    target_modules: list[str] = field(default_factory=list)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a LoRA adapter (PEFT's layout: lora_A [r, in], lora_B [out, r]).

    The base may also be a transformers ``Conv1D`` (GPT-2 family), whose weight
    is stored [in, out]: ``fan_in_fan_out`` is then True, the fused op gets the
    transposed view [out, in] of W0 (no copy), and ``weight`` / ``delta_weight``
    are in the base's own layout, as PEFT's ``fan_in_fan_out`` does it.
    ``merged`` (set by ``fastft.merge(model, keep=True)``): the adapter is
    folded into W0 and the forward runs the base layer alone.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        check(isinstance(base, linear_types()), "LoRA adapts nn.Linear or transformers' Conv1D "
              f"layers; got {type(base).__name__}")
        self.base_layer = base
        self.fan_in_fan_out = is_fan_in_fan_out(base)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        dev, dt = base.weight.device, dtype or adapter_dtype(base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha, self.rslora, self.dropout = r, alpha, rslora, dropout
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.disabled = False
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.weight.shape[0 if self.fan_in_fan_out else 1]

    @property
    def out_features(self) -> int:
        return self.base_layer.weight.shape[1 if self.fan_in_fan_out else 0]

    @property
    def weight(self) -> torch.Tensor:  # code that reads .weight of a linear layer sees W0
        return self.base_layer.weight  # in the base's layout: [in, out] for a Conv1D

    def w0(self) -> torch.Tensor:
        """W0 as [out, in] (for a Conv1D base a transposed view, not a copy)."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def adapter(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
        """(A, B, R or None, scale) of y = x W0^T + scale B R A x."""
        return self.lora_A, self.lora_B, None, self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a dense update of ``weight``, in fp32: scale B R A (its transpose
        for a Conv1D base, whose weight is [in, out])."""
        a, b, r, s = self.adapter()
        mid = a.float() if r is None else r.float() @ a.float()
        delta = s * (b.float() @ mid)
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += delta (fp32 math, rounded once to W0's dtype); the forward then uses W0 alone."""
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 -= the same delta (fp32 math): W0 back to within one rounding (see fastft.unmerge)."""
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x)
        a, b, r, s = self.adapter()
        w, bias = self.w0(), self.base_layer.bias
        if self.dropout > 0.0 and self.training:
            from ..reference import lora as ref

            drop = lambda t: F.dropout(t, self.dropout, True)  # noqa: E731
            return ref.lora_linear(x, w, bias, a, b, r, s, dropout=drop)
        if backends.choose(_op.INFO, x.device) == "reference":
            from ..reference import lora as ref

            return ref.lora_linear(x, w, bias, a, b, r, s)
        dt = backends.autocast_dtype(x.device)
        if dt is not None:
            # the op is opaque to autocast: cast as F.linear would (the adapters keep their dtype)
            x, w = x.to(dt), w.to(dt)
            bias = None if bias is None else bias.to(dt)
        elif x.dtype != w.dtype:
            raise FastftError(f"{type(self).__name__}: input is {x.dtype} but the base weight is "
                              f"{w.dtype}: cast the model or run under torch.autocast")
        lead = x.shape[:-1]
        y = _op.apply(x.reshape(-1, x.shape[-1]), w, bias, a, b, r, s)
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"
                + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (", merged=True" if self.merged else ""))


class LoRASBLinear(LoRALinear):
    """LoRA-SB: A [r, in] and B [out, r] frozen, R [r, r] trained; y = x W0^T + B R A x."""

    def __init__(self, base: nn.Module, r: int, dtype: torch.dtype | None = None):
        super().__init__(base, r, alpha=r, dropout=0.0, dtype=dtype)
        self.lora_A.requires_grad_(False)
        self.lora_B.requires_grad_(False)
        nn.init.zeros_(self.lora_A)
        dev, dt = self.lora_A.device, self.lora_A.dtype
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
