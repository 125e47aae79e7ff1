"""Checkpoints: safetensors for every tensor, JSON for the rest, written atomically.

A checkpoint folder ``checkpoint-<step>`` holds the trained weights (the
adapter in PEFT's layout, or the whole model), the optimizer, scheduler and
method state, the RNG states and the trainer state (step, data position).
It is written into a hidden temporary folder and renamed into place, so a
crash never leaves a half-written checkpoint. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapters import load_adapter, save_adapter
from ..errors import FastftError, check
from ..methods.lora import adapter_layers


def _encode(obj, tensors: dict, path: str):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().contiguous().cpu()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _encode(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise FastftError(f"cannot store a {type(obj).__name__} at {path} in a checkpoint")


def _decode(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_decode(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def save_state(state, folder: Path, name: str) -> None:
    """A nested state dict as ``name.safetensors`` (tensors) + ``name.json`` (the rest)."""
    tensors: dict = {}
    tree = _encode(state, tensors, name)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(tree))


def load_state(folder: Path, name: str):
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return _decode(json.loads((folder / f"{name}.json").read_text()), tensors)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def tied_names(model) -> dict[str, str]:
    """{name: the first name of the same parameter} for tied parameters (e.g. embeddings)."""
    first, aliases = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def save_weights(state: dict, path: Path, aliases: dict[str, str]) -> None:
    """A full state dict as safetensors; each tied tensor stored once, under its first name."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in aliases}
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(path))
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def save_checkpoint(out_dir: Path, step: int, *, model, optimizer, scheduler, method_state: dict,
                    trainer_state: dict, model_state: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write ``out_dir/checkpoint-<step>`` atomically; returns its path.

    ``model_state`` / ``optimizer_state``: full state dicts gathered beforehand
    (FSDP2); otherwise they are read from ``model`` and ``optimizer``.
    """
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if adapter_layers(model):
        save_adapter(model, tmp / "adapter")
    else:
        save_weights(model.state_dict() if model_state is None else model_state,
                     tmp / "model.safetensors", tied_names(model))
    save_state(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp,
               "optimizer")
    save_state(scheduler.state_dict(), tmp, "scheduler")
    save_state(method_state, tmp, "method")
    save_state(rng_state(), tmp, "rng")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_method_state(path: str | Path) -> dict:
    folder = Path(path)
    check((folder / "method.json").is_file(), f"{folder} is not a fastft checkpoint "
          "(no method.json): pass a checkpoint-<step> folder of a run's output")
    return load_state(folder, "method")


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler,
                    sharded_root=None) -> dict:
    """Restore what ``save_checkpoint`` wrote but the method's state (``load_method_state``,
    read first: it decides which optimizer the method makes); returns the trainer state.

    ``sharded_root``: the FSDP2-sharded module that holds ``model`` as ``.model``; the
    full state dicts in the folder are then loaded into the shards.
    """
    folder = Path(path)
    check((folder / "trainer_state.json").is_file(),
          f"{folder} is not a fastft checkpoint (no trainer_state.json): pass a "
          "checkpoint-<step> folder of a run's output")
    if adapter_layers(model):
        check((folder / "adapter").is_dir(), f"{folder} holds no adapter for this LoRA model")
        load_adapter(model, folder / "adapter")
    else:
        check((folder / "model.safetensors").is_file(), f"{folder} holds no model.safetensors")
        if sharded_root is None:
            model.load_state_dict(load_weights(folder / "model.safetensors"))
    if sharded_root is not None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        weights = {f"model.{k}": v for k, v in load_weights(folder / "model.safetensors").items()}
        set_model_state_dict(sharded_root, weights, options=opts)
        set_optimizer_state_dict(sharded_root, optimizer, load_state(folder, "optimizer"),
                                 options=opts)
    else:
        optimizer.load_state_dict(load_state(folder, "optimizer"))
    scheduler.load_state_dict(load_state(folder, "scheduler"))
    set_rng_state(load_state(folder, "rng"))
    return json.loads((folder / "trainer_state.json").read_text())
