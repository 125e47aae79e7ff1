"""Adapters on disk, in PEFT's layout, written atomically.

``save_adapter`` writes ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` and an
``adapter_config.json`` that PEFT's ``PeftModel.from_pretrained`` reads.
A LoRA-SB adapter is saved as the equivalent plain LoRA (lora_B = B R,
alpha = r, so scale 1) for PEFT and serving stacks, and in full (A, B, R) in
``fastft_lora_sb.safetensors`` so that fastft can resume it. fastft's own
facts (which method made the adapter) go to ``fastft_adapter.json``, so that
PEFT reads ``adapter_config.json`` without a warning. ``load_adapter`` reads
either kind, and LoRAs that PEFT saved. The atomic writers live in
``fastft.safeio``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import check
from .methods.lora import LoRA, LoRASBLinear, adapter_layers
from .safeio import atomic_write, load_json, load_safetensors, save_json, save_safetensors

__all__ = ["save_adapter", "load_adapter", "read_config", "read_method",
           "atomic_write", "save_json", "save_safetensors"]  # the writers: from safeio

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
SB_WEIGHTS = "fastft_lora_sb.safetensors"
FASTFT = "fastft_adapter.json"  # fastft's own keys, apart from PEFT's config
PREFIX = "base_model.model."


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save the model's LoRA (or LoRA-SB) adapters in PEFT's layout; returns the folder."""
    layers = adapter_layers(model)
    check(bool(layers), "the model has no fastft adapters to save (prepare it with fastft.LoRA "
          "or fastft.LoRASB)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(layers.values()))
    sb = isinstance(first, LoRASBLinear)
    tensors, sb_tensors = {}, {}
    for path, layer in layers.items():
        a, b, r, _ = layer.adapter()
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b if r is None else (b.float() @ r.float()) \
            .to(b.dtype)
        if sb:
            for name, t in (("lora_A", a), ("lora_B", b), ("lora_R", r)):
                sb_tensors[f"{PREFIX}{path}.{name}.weight"] = t
    targets = sorted({p.rsplit(".", 1)[-1] for p in layers})
    # Conv1D (GPT-2) stores W0 [in, out]; PEFT sets the flag per layer type, this only names it
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())
    base_name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r,
        "lora_alpha": first.r if sb else first.alpha, "lora_dropout": first.dropout,
        "use_rslora": bool(first.rslora) and not sb, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "base_model_name_or_path": base_name,
    }
    save_safetensors(tensors, out / WEIGHTS, metadata={"format": "pt"})
    if sb:
        save_safetensors(sb_tensors, out / SB_WEIGHTS, metadata={"format": "pt"})
    save_json({"method": "lora-sb" if sb else "lora"}, out / FASTFT)
    save_json(config, out / CONFIG)  # last: a folder with a config holds the rest
    return out


def read_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG
    check(path.is_file(), f"{path} not found: an adapter folder holds {CONFIG} and {WEIGHTS}")
    cfg = load_json(path, "save the adapter again")
    check(cfg.get("peft_type", "LORA") == "LORA",
          f"{path}: peft_type {cfg.get('peft_type')!r} is not a LoRA adapter")
    return cfg


def read_method(directory: str | os.PathLike) -> str:
    """The method that made the adapter: "lora" or "lora-sb" (fastft_adapter.json; adapters
    of older fastft kept it in adapter_config.json as ``fastft_method``; PEFT's: "lora")."""
    folder = Path(directory)
    if (folder / FASTFT).is_file():
        return str(load_json(folder / FASTFT, "save the adapter again").get("method", "lora"))
    return str(read_config(folder).get("fastft_method", "lora"))


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a LoRA adapter (fastft's or PEFT's) into ``model``; prepares it if it is not yet."""
    from .patch import prepare

    folder = Path(directory)
    cfg = read_config(folder)
    check(not cfg.get("target_parameters"),
          f"the adapter in {folder} adapts parameters directly (target_parameters="
          f"{sorted(cfg.get('target_parameters') or [])}, PEFT's LoRA on an MoE's 3-D expert "
          "weights or router), which fastft does not support: save a PEFT adapter without "
          "target_parameters (e.g. target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'])")
    layers = adapter_layers(model)
    if not layers:
        targets = cfg.get("target_modules") or "all-linear"
        prepare(model, LoRA(r=int(cfg["r"]), alpha=cfg.get("lora_alpha", cfg["r"]),
                            dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                            target_modules=targets, rslora=bool(cfg.get("use_rslora", False))),
                loss_head=True)
        layers = adapter_layers(model)
    sb = isinstance(next(iter(layers.values())), LoRASBLinear)
    weights = folder / (SB_WEIGHTS if sb else WEIGHTS)
    check(weights.is_file(), f"{weights} not found" + (" (a LoRA-SB model loads the adapter "
                                                       "fastft saved for it)" if sb else ""))
    state, _ = load_safetensors(weights, "save the adapter again")
    names = ("lora_A", "lora_B", "lora_R") if sb else ("lora_A", "lora_B")
    expected = {f"{PREFIX}{p}.{n}.weight": (layer, n) for p, layer in layers.items()
                for n in names}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    check(not missing and not unexpected,
          f"adapter in {folder} does not fit this model: missing {missing[:3]}"
          f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
          f"{'...' if len(unexpected) > 3 else ''}")
    for key, (layer, name) in expected.items():
        param = getattr(layer, name)
        check(tuple(state[key].shape) == tuple(param.shape),
              f"{key}: shape {tuple(state[key].shape)} in the file, {tuple(param.shape)} in the "
              "model (a different rank or base model?)")
        param.copy_(state[key].to(param.dtype))
    if not sb:
        scale_alpha = cfg.get("lora_alpha", cfg["r"])
        for layer in layers.values():
            layer.alpha = scale_alpha
            layer.rslora = bool(cfg.get("use_rslora", False))
            layer.scaling = scale_alpha / (layer.r ** 0.5 if layer.rslora else layer.r)
    else:
        for layer in layers.values():
            layer.initialized = True
    return model

