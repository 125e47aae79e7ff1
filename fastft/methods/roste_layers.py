"""RoSTE's quantized layers and attention (METHODS.md §4).

:class:`RoSTELinear` replaces each linear of the decoder layers and keeps its
``weight`` and ``bias`` Parameters under the same names (checkpoints and
``state_dict`` keys do not change). Its forward is

    y = q_a(x) q_w(rot(W))^T + rot(b)

``q_a`` per token (``a_bits``), with R4 fused (``fake_quant_act(rotate=True)``,
q(H x)) on down_proj; ``rot`` the weight-side rotations of the layer: R2 per head
on the rows that make V (v_proj, or the V rows of a fused qkv_proj) and on the
columns of o_proj, R4 (W H^T) on down_proj. The master weight stays unrotated;
``q_w`` is per output channel (``w_bits``). Both quantizers are straight-through
and the gradient reaches the master weight through the transposed rotations.

The quantized weight is cached: computed once and reused while the master weight
is unchanged, across the micro-batches of one optimizer step (and the recompute
of gradient checkpointing). The cache key holds the weight's ``_version`` and
storage (in-place edits, ``load_state_dict``, a new tensor) and a counter bumped
after every ``torch.optim`` step (torch's fused AdamW updates in place without
bumping ``_version``).

R3 and the KV quantizer live in the attention function ``fastft_roste_<impl>``
registered with transformers' ``AttentionInterface`` (one per original
implementation, eager or sdpa, with that implementation's mask function): Q and
K are rotated per head after RoPE (Q K^T unchanged), K and V fake-quantised per
token and head (``kv_bits``), and the model's own implementation runs on them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import FastftError, check
from ..ops.fake_quant import fake_quant_act, fake_quant_weight
from ..ops.hadamard import hadamard
from .lora import LoRALinear

_STEPS = [0]  # optimizer steps taken anywhere: part of every cache key


def _count_step(optimizer, args, kwargs) -> None:
    _STEPS[0] += 1


_STEP_HOOK = register_optimizer_step_post_hook(_count_step)


@dataclass
class QuantConfig:
    """The quantizers' settings, shared by every RoSTE layer of one model."""

    w_bits: int | None = 4
    a_bits: int | None = 4
    kv_bits: int | None = 4
    symmetric: bool = False
    clip_ratio: float = 1.0
    quantize: bool = True  # False: rotations only (the float model, for checks)
    ready: bool = True  # False until an adaptive configuration is calibrated
    recorder: dict | None = None  # calibration: {(layer, rotation, what): [sum, count]}

    def on(self, kind: str) -> bool:
        return self.quantize and getattr(self, f"{kind}_bits") is not None

    def q(self, x: torch.Tensor, kind: str, rotate: bool = False) -> torch.Tensor:
        return fake_quant_act(x, getattr(self, f"{kind}_bits"), self.symmetric,
                              self.clip_ratio, rotate)

    def qw(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w, self.w_bits, self.symmetric, self.clip_ratio)

    def record(self, layer, rotation: str, what: str, x: torch.Tensor, xq: torch.Tensor):
        if self.recorder is not None and layer is not None:
            s = self.recorder.setdefault((layer, rotation, what), [0.0, 0])
            s[0] += float((xq.float() - x.float()).pow(2).mean())
            s[1] += 1


def rotate_rows(w: torch.Tensor, rows: tuple[int, int], hd: int, transpose=False):
    """H (H^T) per head of ``hd`` rows on rows [s, e) of w [out, in] (or of a bias [out])."""
    s, e = rows
    part = w[s:e]
    if part.dim() == 1:
        rot = hadamard(part.reshape(-1, hd), transpose=transpose).reshape(-1)
    else:
        rot = hadamard(part.reshape(-1, hd, part.shape[1]).transpose(1, 2),
                       transpose=transpose).transpose(1, 2).reshape(part.shape)
    return torch.cat([w[:s], rot, w[e:]])


def rotate_cols(w: torch.Tensor, hd: int | None, transpose=False):
    """W H^T over the input columns: per head of ``hd`` columns, or over all (hd None)."""
    if hd is None:
        return hadamard(w, transpose=transpose)
    return hadamard(w.reshape(w.shape[0], -1, hd), transpose=transpose).reshape(w.shape)


class _Cached(torch.autograd.Function):
    """The cached weight in the forward; in the backward the straight-through gradient
    taken back through the layer's rotations to its master (and adapter) parameters."""

    @staticmethod
    def forward(ctx, value, layer, adapter, *params):
        ctx.layer, ctx.adapter = layer, adapter
        return value

    @staticmethod
    def backward(ctx, g):
        if ctx.adapter is None and ctx.layer.unrotated():  # g is the master's gradient
            return None, None, None, (g.to(ctx.layer.weight.dtype) if ctx.needs_input_grad[3]
                                      else None)
        dm = ctx.layer.rotated(g.float(), transpose=True)
        need = ctx.needs_input_grad[3:]
        grads = [dm.to(ctx.layer.weight.dtype) if need[0] else None]
        if ctx.adapter is not None:
            a, b, s = ctx.adapter
            grads.append((s * (b.float().t() @ dm)).to(a.dtype) if need[1] else None)
            grads.append((s * (dm @ a.float().t())).to(b.dtype) if need[2] else None)
        return (None, None, None, *grads)


class RoSTELinear(nn.Linear):
    """A linear layer of a decoder layer under RoSTE; see the module docstring."""

    def __init__(self, linear: nn.Linear, qcfg: QuantConfig, layer: int | None = None,
                 role: str = ""):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.qcfg, self.layer, self.role = qcfg, layer, role
        self.head_dim = 0
        self.v_rows: tuple[int, int] | None = None
        self.r2_out = self.r2_in = self.r4 = False  # weight-side rotations (R2, R4)
        self.r4_input = False  # the online R4 on the input
        self.quantize_weight = True  # False on a loaded export: the weight is quantized
        self._cache = None
        self.train(linear.training)

    def extra_repr(self) -> str:
        on = [n for n in ("r2_out", "r2_in", "r4", "r4_input") if getattr(self, n)]
        return super().extra_repr() + (f", layer={self.layer}, role={self.role}" +
                                       (f", {'+'.join(on)}" if on else ""))

    def rotated(self, w: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """The weight-side rotations applied to ``w`` [out, in] (their adjoint with
        ``transpose``: the gradient of the master from the rotated weight's)."""
        if self.r2_out:
            w = rotate_rows(w, self.v_rows, self.head_dim, transpose)
        if self.r2_in:
            w = rotate_cols(w, self.head_dim, transpose)
        if self.r4:
            w = rotate_cols(w, None, transpose)
        return w

    def unrotated(self) -> bool:
        """No weight-side rotation (R2, R4) on this layer."""
        return not (self.r2_out or self.r2_in or self.r4)

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias is None or not self.r2_out:
            return self.bias
        return rotate_rows(self.bias, self.v_rows, self.head_dim)

    def _flags(self) -> tuple:
        q = self.qcfg
        return (self.r2_out, self.r2_in, self.r4, self.quantize_weight, q.quantize, q.w_bits,
                q.symmetric, q.clip_ratio)

    @torch.no_grad()
    def master(self, adapter=None) -> torch.Tensor:
        """W (+ s B A) in fp32: the weight before rotations and quantization."""
        m = self.weight.float()
        if adapter is not None:
            a, b, s = adapter
            m = m + s * (b.float() @ a.float())
        return m

    @torch.no_grad()
    def quantized_fp32(self, adapter=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rot(W) in fp32, its fake-quantized value in fp32, or rot(W) again when the weight
        is not quantized)."""
        r = self.rotated(self.master(adapter))
        quant = self.quantize_weight and self.qcfg.on("w")
        return r, (self.qcfg.qw(r) if quant else r)

    def _value(self, adapter) -> torch.Tensor:
        w = self.weight
        key = (_STEPS[0], w._version, w.data_ptr(), w.dtype, w.device, self._flags())
        if adapter is not None:
            a, b, s = adapter
            key += (a._version, a.data_ptr(), b._version, b.data_ptr(), s)
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the old value first
            self._cache = (key, self._quantized(adapter))
        return self._cache[1]

    @torch.no_grad()
    def _quantized(self, adapter) -> torch.Tensor:
        """The weight the forward multiplies by, in w's dtype. Unrotated and without an
        adapter, the weight is quantized as it is: the quantizer reads and writes its dtype
        with fp32 math, the bits of the fp32 round trip without the fp32 copies."""
        w = self.weight
        if adapter is None and self.unrotated() and self.quantize_weight and self.qcfg.on("w"):
            return self.qcfg.qw(w.detach())
        return self.quantized_fp32(adapter)[1].to(w.dtype)

    def layer_weight(self, adapter=None) -> torch.Tensor:
        """The weight the forward multiplies by (cached), differentiable to the masters."""
        value = self._value(adapter)
        params = (self.weight,) if adapter is None else (self.weight, adapter[0], adapter[1])
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return _Cached.apply(value, self, adapter, *params)
        return value

    def run(self, x: torch.Tensor, adapter=None) -> torch.Tensor:
        q = self.qcfg
        if q.on("a"):
            if q.recorder is not None and self.role in ("o_proj", "down_proj"):
                xin = hadamard(x) if self.r4_input else x
                x = q.q(xin, "a")
                q.record(self.layer, "r4" if self.role == "down_proj" else "r2", "x", xin, x)
            else:
                x = q.q(x, "a", rotate=self.r4_input)
        elif self.r4_input:
            x = hadamard(x)
        return F.linear(x, self.layer_weight(adapter), self.effective_bias())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.qcfg.ready:
            raise FastftError("RoSTE(rotations='adaptive') is not calibrated: call "
                              "method.calibrate(model, batches) before training (the Trainer "
                              "does it), or use rotations='all' / 'r1'")
        return self.run(x)


class RoSTELoRALinear(LoRALinear):
    """A LoRA adapter on a RoSTE layer: y = q_a(x) q_w(rot(W0 + s B A))^T + b.

    The adapter is folded into the weight before rotation and quantization (straight
    through to A and B), so the trained network is the one that is exported: the
    merged, quantized weight. W0 stays frozen.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.disabled or self.merged:
            return base(x)
        return base.run(x, (self.lora_A, self.lora_B, self.scaling))

    def adapter_tuple(self):
        return None if self.disabled or self.merged else (self.lora_A, self.lora_B,
                                                          self.scaling)


# ---- attention: R3 and the KV quantizer ---------------------------------------------------

class AttnQuant:
    """Per attention module: its layer, R3 on or off, and the implementation it wraps."""

    def __init__(self, qcfg: QuantConfig, layer: int, original: str):
        self.qcfg, self.layer, self.original, self.r3 = qcfg, layer, original, False


def _original_function(module: nn.Module, impl: str):
    if impl == "eager":  # each model family has its own (softcapping, sinks, ...)
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        check(fn is not None, f"RoSTE: {type(module).__name__} has no eager_attention_forward "
              "in its modeling file; load the model with attn_implementation='sdpa'")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def roste_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """R3 on Q and K, K and V fake-quantised, then the model's own attention."""
    st = getattr(module, "_fastft_roste", None)
    if st is None:
        raise FastftError(f"{type(module).__name__} has no RoSTE state but the model's "
                          "attention implementation is fastft_roste_*: prepare it with "
                          "fastft.RoSTE or load it with fastft.quantize.load")
    q = st.qcfg
    if st.r3:
        query = hadamard(query)
    if q.on("kv"):
        if q.recorder is not None:
            kin = hadamard(key) if st.r3 else key
            key = q.q(kin, "kv")
            q.record(st.layer, "r3", "k", kin, key)
            value = q.q(value, "kv")  # not in R2's error: the authors' term is o_proj's
        else:
            key, value = q.q(key, "kv", rotate=st.r3), q.q(value, "kv")
    elif st.r3:
        key = hadamard(key)
    return _original_function(module, st.original)(module, query, key, value, attention_mask,
                                                   *args, **kwargs)


def attention_name(original: str | None) -> str:
    """Register (once) and return ``fastft_roste_<original>``: the RoSTE attention over the
    original implementation, with the original's mask function."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    impl = original or "eager"
    check(impl in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping,
          f"RoSTE wraps the eager, sdpa or flash attention implementations; this model uses "
          f"{impl!r}: load it with attn_implementation='sdpa' or 'eager'")
    name = f"fastft_roste_{impl}"
    AttentionInterface.register(name, roste_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


def original_attention(config) -> str:
    """The model's attention implementation without RoSTE's wrapper."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    return impl.removeprefix("fastft_roste_")
