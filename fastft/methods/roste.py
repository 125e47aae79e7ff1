"""RoSTE: quantization-aware fine-tuning with rotations (METHODS.md §4).

``fastft.prepare(model, fastft.RoSTE(w_bits=4, a_bits=4, kv_bits=4))``:

1. the norms are folded into the linears that read them and R1 (Walsh-Hadamard
   over the hidden size) is merged into the embedding, the readers, the writers
   and the head (fastft/methods/rotations.py): the float function is unchanged;
2. every linear of the decoder layers becomes a :class:`RoSTELinear` (weights per
   output channel, input activations per token, straight-through), attention runs
   through ``fastft_roste_<impl>`` (R3 on Q and K, K and V per token and head);
3. R2 (per head, V / o_proj; the deployable form q(H W_v), merged into V's rows,
   where the authors train H q(W_v) x online: the float functions agree, the
   quantized ones do not), R3 and R4 (down_proj's input, online, and its
   weight) are on everywhere (``rotations="all"``), nowhere (``"r1"``), or per
   layer where they lower the quantization error (``"adaptive"``, the default:
   :meth:`RoSTE.calibrate`, which the Trainer calls with the first
   ``calibration_samples`` training examples). ``"none"``: no rotation and no
   folding (plain quantization-aware training).

Full fine-tuning by default: every linear, the embedding and the head train;
the norms stay frozen (at 1 once folded). With ``adapter=fastft.LoRA(...)`` the
base is frozen and the LoRA adapters train, folded into the quantized weight
(:class:`RoSTELoRALinear`). The head and the embedding are not quantized.
``fastft.quantize.export`` writes the quantized model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import check
from ..ops.hadamard import plan
from ..patch import _set, decoder, resolve_targets
from . import rotations as rot
from .base import Hooks
from .lora import LoRA, adapter_dtype
from .roste_layers import (
    AttnQuant,
    QuantConfig,
    RoSTELinear,
    RoSTELoRALinear,
    attention_name,
    original_attention,
)
from .targets import freeze

MODES = ("adaptive", "all", "r1", "none")
KINDS = ("r2", "r3", "r4")


def check_bits(name: str, bits) -> None:
    check(bits is None or (isinstance(bits, int) and not isinstance(bits, bool) and
                           2 <= bits <= 8),
          f"RoSTE {name} must be an integer in 2..8 (or None: not quantized); got {bits!r}")


def install(model: nn.Module, layout: rot.Layout, qcfg: QuantConfig
            ) -> tuple[dict[str, RoSTELinear], dict[int, AttnQuant]]:
    """Replace the decoder layers' linears by RoSTE layers and route attention through
    ``fastft_roste_<impl>``; no rotation is switched on."""
    linears, attn = {}, {}
    original = original_attention(model.config)
    for b in layout.blocks:
        for path in b.attn_readers + b.mlp_readers + [b.o_proj, b.down_proj]:
            layer = RoSTELinear(model.get_submodule(path), qcfg, b.index,
                                path.rsplit(".", 1)[-1])
            layer.head_dim = b.head_dim
            if path == b.v_path:
                layer.v_rows = b.v_rows
            _set(model, path, layer)
            linears[path] = layer
        b.attn._fastft_roste = attn[b.index] = AttnQuant(qcfg, b.index, original)
    model.config._attn_implementation = attention_name(original)
    return linears, attn


def apply_rotations(layout: rot.Layout, linears: dict, attn: dict, chosen: dict) -> None:
    """Switch R2 / R3 / R4 on in the layers listed in ``chosen`` ({kind: [layers]})."""
    for b in layout.blocks:
        on = {k: b.index in set(chosen.get(k, ())) for k in KINDS}
        linears[b.v_path].r2_out = on["r2"]
        linears[b.o_proj].r2_in = on["r2"]
        linears[b.down_proj].r4 = linears[b.down_proj].r4_input = on["r4"]
        attn[b.index].r3 = on["r3"]


@dataclass
class RoSTE(Hooks):
    """Quantization-aware fine-tuning with rotations; see the module docstring."""

    w_bits: int | None = 4
    a_bits: int | None = 4
    kv_bits: int | None = 4
    clip_ratio: float = 1.0
    symmetric: bool = False
    rotations: str = "adaptive"  # adaptive | all | r1 | none
    calibration_samples: int = 128
    adapter: LoRA | None = None
    quantize: bool = True  # False: rotations only (the float model; for checks)
    chosen: dict | None = field(default=None, init=False)  # {kind: [layers]} once known
    calibration: dict | None = field(default=None, init=False, repr=False)
    _rt: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "kv_bits"):
            check_bits(name, getattr(self, name))
        check(self.rotations in MODES, f"RoSTE rotations must be one of {', '.join(MODES)}; "
              f"got {self.rotations!r}")
        check(isinstance(self.clip_ratio, (int, float)) and 0 < self.clip_ratio <= 1,
              f"RoSTE clip_ratio must be in (0, 1]; got {self.clip_ratio!r}")
        check(isinstance(self.calibration_samples, int) and self.calibration_samples >= 1,
              f"RoSTE calibration_samples must be an integer >= 1; got "
              f"{self.calibration_samples!r}")
        check(self.adapter is None or (type(self.adapter) is LoRA and self.adapter.dropout == 0),
              "RoSTE adapter must be fastft.LoRA(...) with dropout=0 (the adapter is folded "
              f"into the quantized weight); got {self.adapter!r}")

    # ---- prepare --------------------------------------------------------------------------

    def prepare_model(self, model: nn.Module) -> list[str]:
        layout = rot.discover(model)
        # every check before the first change: the norms fold, the rotated sizes have a
        # Hadamard factor (else the model is left as it was)
        for path, norm in [n for b in layout.blocks for n in (b.attn_norm, b.mlp_norm)] + \
                [layout.final_norm]:
            rot.norm_kind(path, norm)
        if self.rotations != "none":
            plan(layout.hidden)
        if self.rotations in ("adaptive", "all"):
            for b in layout.blocks:
                plan(b.head_dim)
                plan(model.get_submodule(b.down_proj).in_features)
        hooks = rot.fold_and_rotate(model, layout, r1=True) if self.rotations != "none" \
            else []
        qcfg = QuantConfig(self.w_bits, self.a_bits, self.kv_bits, self.symmetric,
                           float(self.clip_ratio), self.quantize,
                           ready=self.rotations != "adaptive")
        linears, attn = install(model, layout, qcfg)
        self._rt = Runtime(id(model), layout, qcfg, linears, attn, hooks)
        if self.rotations == "all":
            self.chosen = {k: [b.index for b in layout.blocks] for k in KINDS}
        elif self.rotations in ("r1", "none"):
            self.chosen = {k: [] for k in KINDS}
        if self.chosen is not None:
            apply_rotations(layout, linears, attn, self.chosen)
        freeze(model)
        if self.adapter is None:
            trained = [*linears, layout.embed, layout.head]
            for path in trained:
                for p in model.get_submodule(path).parameters():
                    p.requires_grad_(True)
            return trained
        a = self.adapter
        targets = resolve_targets(model, a.target_modules)
        for path in targets:
            base = model.get_submodule(path)
            layer = RoSTELoRALinear(base, a.r, a.alpha, 0.0, a.rslora,
                                    dtype=adapter_dtype(base.weight.dtype, a.adapter_dtype))
            _set(model, path, layer.train(base.training))
        return targets

    def runtime(self, model: nn.Module | None = None) -> Runtime:
        check(self._rt is not None, "RoSTE: call fastft.prepare(model, fastft.RoSTE(...)) first")
        check(model is None or self._rt.model_id == id(model),
              "RoSTE: this method object was prepared on another model; make one per model")
        return self._rt

    # ---- adaptive rotations ---------------------------------------------------------------

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches) -> dict | None:
        """``rotations="adaptive"``: two no-grad passes over ``batches`` (dicts with
        input_ids and optionally attention_mask), R1 only and R1 + R2/R3/R4 everywhere; per
        layer and rotation kind the sum of MSE(W_q - W) and MSE(X_q - X) of what the rotation
        touches: R2, as the authors measure it, o_proj's weight and input, and with it the
        weight fastft quantizes in place of their online rotation, q(H W_v) (the deployable
        form: R2 merged into V's rows; of a fused qkv_proj only V's rows, which are the
        only ones R2 changes; the V cache, which the authors leave out, is not counted);
        R3: the K cache; R4: down_proj's weight and input. A rotation stays on where it
        lowers that error. Returns {kind: [layers]}; a no-op once chosen (or for other
        modes)."""
        rt = self.runtime(model)
        if self.chosen is not None:
            return self.chosen
        batches = list(batches)
        check(bool(batches), "RoSTE calibration needs at least one batch of training data")
        every = {k: [b.index for b in rt.layout.blocks] for k in KINDS}
        errors, was = {}, model.training
        model.eval()
        try:
            for mode, chosen in (("r1", {}), ("all", every)):
                apply_rotations(rt.layout, rt.linears, rt.attn, chosen)
                rt.qcfg.recorder = rec = {}
                self._weight_errors(rt)
                for batch in batches:
                    keys = ("input_ids", "attention_mask", "position_ids")
                    decoder(model)(**{k: batch[k] for k in keys if k in batch}, use_cache=False)
                errors[mode] = {}
                for (layer, kind, _), (total, n) in rec.items():
                    key = f"{kind}/{layer}"
                    errors[mode][key] = errors[mode].get(key, 0.0) + total / max(n, 1)
        finally:
            rt.qcfg.recorder = None
            model.train(was)
        self.calibration = errors
        self.chosen = {k: [b.index for b in rt.layout.blocks
                           if errors["all"].get(f"{k}/{b.index}", 0.0) <
                           errors["r1"].get(f"{k}/{b.index}", 0.0)] for k in KINDS}
        self._apply(rt)
        return self.chosen

    @staticmethod
    def _weight_errors(rt: Runtime) -> None:
        q = rt.qcfg
        if not q.on("w"):
            return
        for b in rt.layout.blocks:
            for path, kind in ((b.v_path, "r2"), (b.o_proj, "r2"), (b.down_proj, "r4")):
                r, wq = rt.linears[path].quantized_fp32()
                if path == b.v_path:  # V's rows (per output channel: the others' do not mix)
                    s, e = b.v_rows
                    r, wq = r[s:e], wq[s:e]
                q.record(b.index, kind, f"w:{path}", r, wq)

    def _apply(self, rt: Runtime) -> None:
        apply_rotations(rt.layout, rt.linears, rt.attn, self.chosen)
        rt.qcfg.ready = True

    # ---- trainer hooks --------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"chosen": self.chosen} if self.chosen is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state.get("chosen") is not None:
            self.chosen = {k: [int(i) for i in state["chosen"].get(k, [])] for k in KINDS}
            self._apply(self.runtime())


@dataclass
class Runtime:
    """What prepare_model built: the layout, the shared quantizer settings, the layers."""

    model_id: int
    layout: rot.Layout
    qcfg: QuantConfig
    linears: dict
    attn: dict
    hooks: list
