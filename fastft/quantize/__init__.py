"""fastft.quantize: a RoSTE-trained model as a quantized transformers folder, and back.

``export(model, dir)`` writes, atomically (built under a temporary name, every
file fsynced, then renamed):

- ``config.json``: the model's transformers config (untied head) with a
  ``fastft_quantization`` entry: the bits, symmetric, clip_ratio, the rotations
  (R1 and R2 merged into the weights; the layers with R3 and R4 online; the
  modules followed by an online R1, Gemma-2's post-norms), the quantized modules,
  the packing and the attention implementation;
- ``model.safetensors``: every quantized linear as ``<path>.qweight`` (uint8: two
  codes per byte for 2..4 bits, the even column in the low nibble; one per byte
  for 5..8 bits), ``<path>.scales`` and ``<path>.zeros`` (fp32, per output
  channel; w = (code - zero) * scale); its bias with R2 merged; the embedding,
  norms and head as they are (R1 merged, not quantized); LoRA adapters merged;
- the generation config and the tokenizer, when given.

``load(dir)`` builds the model from the config, puts the dequantized weights in
place and the RoSTE layers around them (activations, K and V fake-quantized,
R3 and R4 online): its logits equal the trained model's (``torch.equal`` in fp32).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import FastftError, check
from ..methods import rotations as rot
from ..methods.roste_layers import QuantConfig, RoSTELoRALinear
from ..safeio import (
    fsync_dir,
    fsync_tree,
    load_json,
    load_safetensors,
    save_model_files,
    save_safetensors,
)
from .packing import codes, dequantize, pack, unpack

__all__ = ["export", "exportable", "load"]

KEY = "fastft_quantization"
WEIGHTS = "model.safetensors"


def exportable(model: nn.Module) -> bool:
    """Whether ``model`` was prepared with RoSTE, so that :func:`export` can write it (the
    Trainer writes ``<output>/quantized`` at the end of such a run)."""
    from ..methods.roste import RoSTE

    return isinstance(getattr(getattr(model, "_fastft", None), "method", None), RoSTE)


def _roste(model: nn.Module):
    check(exportable(model), "fastft.quantize.export needs a model prepared with "
          "fastft.prepare(model, fastft.RoSTE(...))")
    method = model._fastft.method
    rt = method.runtime(model)
    check(rt.qcfg.ready, "RoSTE(rotations='adaptive') is not calibrated yet: call "
          "method.calibrate(model, batches) (the Trainer does it) before exporting")
    return method, rt


@torch.no_grad()
def export_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, fastft_quantization record) of a RoSTE-prepared model."""
    method, rt = _roste(model)
    q = rt.qcfg
    wrappers = {p: m for p, m in model.named_modules() if isinstance(m, RoSTELoRALinear)}
    tensors = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in wrappers and leaf in ("lora_A", "lora_B"):
            continue
        tensors[key.replace(".base_layer.", ".")] = value
    quantized = []
    for path, layer in rt.linears.items():
        wrap = wrappers.get(path)
        adapter = wrap.adapter_tuple() if wrap is not None else None
        r, wq = layer.quantized_fp32(adapter)
        used = layer._value(adapter)  # the weight the forward multiplies by
        if q.on("w"):
            c, s, z = codes(r, wq, q.w_bits, q.symmetric, q.clip_ratio, f"{path}.weight")
            check(torch.equal(dequantize(c, s, z).to(used.dtype), used),
                  f"export: {path}'s codes do not give back its weight")
            del tensors[f"{path}.weight"]
            tensors.update({f"{path}.qweight": pack(c, q.w_bits), f"{path}.scales": s,
                            f"{path}.zeros": z})
            quantized.append(path)
        else:
            tensors[f"{path}.weight"] = used
        if layer.bias is not None:
            tensors[f"{path}.bias"] = layer.effective_bias()
    chosen = method.chosen
    r1 = method.rotations != "none"
    online = [p for b in rt.layout.blocks for p in b.post_norms] if r1 else []
    dtype = next(iter(rt.linears.values())).weight.dtype
    record = {
        "format": 1, "method": "roste",
        "w_bits": q.w_bits if q.on("w") else None, "a_bits": q.a_bits if q.on("a") else None,
        "kv_bits": q.kv_bits if q.on("kv") else None, "symmetric": q.symmetric,
        "clip_ratio": q.clip_ratio, "rotations": method.rotations,
        "r1": "merged" if r1 else "none", "r2": chosen["r2"], "r2_merged": True,
        "r3": chosen["r3"], "r4": chosen["r4"], "online_r1": online,
        "packing": None if not q.on("w") else ("uint4x2" if q.w_bits <= 4 else "uint8"),
        "quantized_modules": quantized,
        "attn_implementation": next(iter(rt.attn.values())).original,
        "dtype": str(dtype).removeprefix("torch."),
    }
    # each its own storage: a tied head and embedding are written (and loaded) apart
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
            for k, v in tensors.items()}, record


def export(model: nn.Module, directory: str | os.PathLike, *, tokenizer=None) -> Path:
    """Write the quantized model folder (see the module docstring); returns its path."""
    tensors, record = export_state(model)
    final = Path(directory)
    tmp = final.parent / f".{final.name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_safetensors(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        save_model_files(tmp, model, tokenizer, config_updates={
            "dtype": record["dtype"], "tie_word_embeddings": False, KEY: record})
        fsync_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise FastftError(f"could not write the quantized model {final}: "
                              f"{e.strerror or e}") from e
        raise
    old = final.parent / f".{final.name}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


@torch.no_grad()
def load(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The model of an ``export`` folder, evaluating the quantized network (eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..methods.roste import install

    folder = Path(directory)
    raw = load_json(folder / "config.json", "export the model again")
    rec = raw.get(KEY)
    check(isinstance(rec, dict) and rec.get("method") == "roste",
          f"{folder} is not a fastft quantized model (config.json has no {KEY!r} entry): write "
          "it with fastft.quantize.export")
    dtype = getattr(torch, rec["dtype"])
    config = AutoConfig.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_config(config, attn_implementation=rec["attn_implementation"],
                                             dtype=dtype)
    layout = rot.discover(model)
    bits = [rec[k] for k in ("w_bits", "a_bits", "kv_bits")]
    qcfg = QuantConfig(*bits, symmetric=rec["symmetric"], clip_ratio=rec["clip_ratio"],
                       quantize=any(b is not None for b in bits))
    linears, attn = install(model, layout, qcfg)
    for layer in linears.values():
        layer.quantize_weight = False  # the stored weights are the quantized ones
    for b in layout.blocks:
        linears[b.down_proj].r4_input = b.index in rec["r4"]
        attn[b.index].r3 = b.index in rec["r3"]
    model._fastft_roste_hooks = rot.post_norm_hooks(model, rec["online_r1"])
    state, _ = load_safetensors(folder / WEIGHTS, "export the model again")
    for path in rec["quantized_modules"]:
        check(path in linears, f"{folder}: {path} is not a linear layer of this model")
        try:
            c = unpack(state.pop(f"{path}.qweight"), rec["w_bits"], linears[path].in_features)
            w = dequantize(c, state.pop(f"{path}.scales"), state.pop(f"{path}.zeros"))
        except KeyError as e:
            raise FastftError(f"{folder / WEIGHTS} lacks {e} of {path}") from e
        state[f"{path}.weight"] = w.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    check(not missing and not unexpected, f"{folder / WEIGHTS} does not fit its config: "
          f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    return model.to(device).eval()
