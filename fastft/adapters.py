"""Adapters on disk, in PEFT's layout, written atomically.

``save_adapter`` writes ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` and an
``adapter_config.json`` that PEFT's ``PeftModel.from_pretrained`` reads.
A LoRA-SB adapter is saved as the equivalent plain LoRA (lora_B = B R,
alpha = r, so scale 1) for PEFT and serving stacks, and in full (A, B, R) in
``fastft_lora_sb.safetensors`` so that fastft can resume it. ``load_adapter``
reads either kind, and LoRAs that PEFT saved.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import FastftError, check
from .methods.lora import LoRA, LoRASBLinear, adapter_layers

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
SB_WEIGHTS = "fastft_lora_sb.safetensors"
PREFIX = "base_model.model."


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata=None) -> None:
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def save_json(obj, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    atomic_write(path, write)


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
        "fastft_method": "lora-sb" if sb else "lora",
    }
    save_safetensors(tensors, out / WEIGHTS, metadata={"format": "pt"})
    if sb:
        save_safetensors(sb_tensors, out / SB_WEIGHTS, metadata={"format": "pt"})
    save_json(config, out / CONFIG)
    return out


def read_config(directory: Path) -> dict:
    path = Path(directory) / CONFIG
    check(path.is_file(), f"{path} not found: an adapter folder holds {CONFIG} and {WEIGHTS}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FastftError(f"{path} is not valid JSON ({e})") from e
    check(cfg.get("peft_type", "LORA") == "LORA",
          f"{path}: peft_type {cfg.get('peft_type')!r} is not a LoRA adapter")
    return cfg


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
    state = load_file(str(weights))
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

