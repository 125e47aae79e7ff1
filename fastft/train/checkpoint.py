"""Checkpoints: safetensors for every tensor, JSON for the rest, written atomically.

A checkpoint folder ``checkpoint-<step>`` holds the trained weights, the
optimizer, scheduler and method state, the RNG states and the trainer state
(step, data position). The weights: an adapter in PEFT's layout
(``adapter/``, with the tokenizer), or the whole model as a folder that
transformers loads (``config.json``, ``generation_config.json``, the
tokenizer's files and ``model.safetensors`` under the model's parameter names,
each tied weight once, as ``save_pretrained`` keeps it), so
``AutoModelForCausalLM.from_pretrained(checkpoint)`` and ``fastft train
--model checkpoint`` work. It is written into a hidden temporary folder,
fsynced and renamed into place, so a crash never leaves a ``checkpoint-<step>``
that looks complete. Nothing is unpickled on load; a truncated or corrupt file
is an error naming it and the earlier checkpoints to resume from.

The run folder: ``check_output_dir`` refuses to write a new run over a previous
one (``config.json``, ``metrics.jsonl``, ``checkpoint-*``) unless asked to
overwrite it or to resume.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from ..adapters import load_adapter, save_adapter
from ..errors import FastftError, check
from ..methods.lora import adapter_layers
from ..safeio import (
    damaged,
    fsync_dir,
    fsync_tree,
    load_json,
    load_safetensors,
    read_safetensors_metadata,
    save_json,
    save_model_files,
    save_safetensors,
)

STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"
PARTS = ("method", "optimizer", "scheduler", "rng")  # each NAME.safetensors + NAME.json
RUN_FILES = ("config.json", "metrics.jsonl")  # with checkpoint-*: what marks a run folder


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
            return tensors[obj["__tensor__"]]  # KeyError: load_state reports the file
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
    save_safetensors(tensors, folder / f"{name}.safetensors")
    save_json(tree, folder / f"{name}.json", indent=None, sort_keys=False)


def load_state(folder: Path, name: str, hint: str = ""):
    folder = Path(folder)
    tensors, _ = load_safetensors(folder / f"{name}.safetensors", hint)
    tree = load_json(folder / f"{name}.json", hint, kind=None)
    try:
        return _decode(tree, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise damaged(folder / f"{name}.json", f"it names a tensor {e} that "
                      f"{name}.safetensors does not hold", hint) from e


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
    """{name: the kept name of the same parameter} for tied parameters (e.g. embeddings):
    the name transformers declares as the source of the tie (``_tied_weights_keys``
    {tied: source}), else the first name."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    declared = getattr(model, "_tied_weights_keys", None)
    sources = set(declared.values()) if isinstance(declared, dict) else set()
    aliases = {}
    for names in groups.values():
        keep = next((n for n in names if n in sources), names[0])
        aliases.update({n: keep for n in names if n != keep})
    return aliases


def save_weights(state: dict, path: Path, aliases: dict[str, str]) -> None:
    """A full state dict as safetensors in transformers' layout (format "pt"); each tied
    tensor stored once, under its kept name (the aliases also in the metadata)."""
    tensors = {k: v for k, v in state.items() if k not in aliases}
    save_safetensors(tensors, path, metadata={"format": "pt", "aliases": json.dumps(aliases)})


def load_weights(path: Path, hint: str = "") -> dict:
    state, meta = load_safetensors(path, hint)
    try:
        aliases = json.loads(meta.get("aliases", "{}"))
        for alias, name in aliases.items():
            state[alias] = state[name]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise damaged(path, f"its tied-weight names do not match its tensors ({e})", hint) from e
    return state


def save_checkpoint(out_dir: Path, step: int, *, model, optimizer, scheduler, method_state: dict,
                    trainer_state: dict, model_state: dict | None = None,
                    optimizer_state: dict | None = None, tokenizer=None) -> Path:
    """Write ``out_dir/checkpoint-<step>`` atomically; returns its path.

    ``model_state`` / ``optimizer_state``: full state dicts gathered beforehand
    (FSDP2); otherwise they are read from ``model`` and ``optimizer``. Everything is
    written into ``.checkpoint-<step>.tmp``, fsynced, and renamed; a failed write removes
    the temporary folder and leaves the earlier checkpoints as they were.
    """
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if adapter_layers(model):
            save_adapter(model, tmp / "adapter")
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(tmp / "adapter"))
        else:
            save_weights(model.state_dict() if model_state is None else model_state,
                         tmp / WEIGHTS, tied_names(model))
            save_model_files(tmp, model, tokenizer)
        save_state(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp,
                   "optimizer")
        save_state(scheduler.state_dict(), tmp, "scheduler")
        save_state(method_state, tmp, "method")
        save_state(rng_state(), tmp, "rng")
        save_json(trainer_state, tmp / STATE, indent=1, sort_keys=False)  # last
        fsync_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise FastftError(f"could not write checkpoint {final}: {e.strerror or e} "
                              f"({getattr(e, 'filename', None) or tmp}); the earlier "
                              f"checkpoints in {out_dir} are intact") from e
        raise
    old = None
    if final.exists():  # a resumed run saves a step again: swap, never a moment without one
        old = out_dir / f".checkpoint-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_of(path: Path) -> int | None:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders in ``folder``, newest first."""
    found = [p for p in Path(folder).glob("checkpoint-*") if _step_of(p) is not None]
    return sorted(found, key=_step_of, reverse=True)


def _damaged_hint(folder: Path) -> str:
    """What to do when a file of the checkpoint ``folder`` cannot be read."""
    step = _step_of(folder)
    earlier = [p for p in checkpoints(folder.parent) if step is None or _step_of(p) < step]
    if earlier:
        return (f"the checkpoint is damaged and cannot be resumed; pick an earlier checkpoint: "
                f"{', '.join(str(p) for p in earlier[:3])}")
    return (f"the checkpoint is damaged and cannot be resumed, and {folder.parent} holds no "
            "earlier checkpoint: start the run again")


def verify_checkpoint(path: str | Path) -> dict:
    """Check that every file of a checkpoint is there and readable (safetensors headers
    whole, JSON parseable), before anything is loaded; returns the trainer state."""
    folder = Path(path)
    check(folder.is_dir(), f"checkpoint {folder} not found: resume from a checkpoint-<step> "
          "folder of a run's output")
    check((folder / STATE).is_file(), f"{folder} is not a fastft checkpoint (no {STATE}): "
          "pass a checkpoint-<step> folder of a run's output")
    hint = _damaged_hint(folder)
    state = load_json(folder / STATE, hint)
    if not isinstance(state.get("state"), dict) or "step" not in state["state"]:
        raise damaged(folder / STATE, "no trainer state (step, data position) in it", hint)
    for name in PARTS:
        load_json(folder / f"{name}.json", hint, kind=None)
        read_safetensors_metadata(folder / f"{name}.safetensors", hint)
    if (folder / "adapter").is_dir():
        load_json(folder / "adapter" / "adapter_config.json", hint)
        for f in sorted((folder / "adapter").glob("*.safetensors")):
            read_safetensors_metadata(f, hint)
    else:
        read_safetensors_metadata(folder / WEIGHTS, hint)
    return state


def load_method_state(path: str | Path) -> dict:
    folder = Path(path)
    verify_checkpoint(folder)
    return load_state(folder, "method", _damaged_hint(folder))


def load_checkpoint(path: str | Path, *, model, optimizer, scheduler,
                    sharded_root=None) -> dict:
    """Restore what ``save_checkpoint`` wrote but the method's state (``load_method_state``,
    read first: it decides which optimizer the method makes); returns the trainer state.

    ``sharded_root``: the FSDP2-sharded module that holds ``model`` as ``.model``; the
    full state dicts in the folder are then loaded into the shards.
    """
    folder = Path(path)
    trainer_state = verify_checkpoint(folder)
    hint = _damaged_hint(folder)
    if adapter_layers(model):
        check((folder / "adapter").is_dir(), f"{folder} holds no adapter for this LoRA model")
        load_adapter(model, folder / "adapter")
    else:
        check((folder / WEIGHTS).is_file(), f"{folder} holds no {WEIGHTS}")
        if sharded_root is None:
            try:
                model.load_state_dict(load_weights(folder / WEIGHTS, hint))
            except RuntimeError as e:
                raise FastftError(f"{folder / WEIGHTS} does not fit this model ("
                                  f"{str(e).strip().splitlines()[0]} ...): resume with the "
                                  "model and method the run started from") from e
    if sharded_root is not None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        weights = {f"model.{k}": v for k, v in load_weights(folder / WEIGHTS, hint).items()}
        set_model_state_dict(sharded_root, weights, options=opts)
        set_optimizer_state_dict(sharded_root, optimizer, load_state(folder, "optimizer", hint),
                                 options=opts)
    else:
        optimizer.load_state_dict(load_state(folder, "optimizer", hint))
    scheduler.load_state_dict(load_state(folder, "scheduler", hint))
    set_rng_state(load_state(folder, "rng", hint))
    return trainer_state


# ---- the run folder ---------------------------------------------------------------------

def previous_run(out: Path) -> list[str]:
    """The files of a previous fastft run in ``out`` (empty when there is none)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return [n for n in RUN_FILES if (out / n).exists()] + [p.name for p in checkpoints(out)]


def check_output_dir(out: str | Path, *, overwrite: bool = False, resume_from=None,
                     any_content: bool = False) -> None:
    """Refuse an output folder that is a file, or that holds a previous run, unless
    ``overwrite`` or ``resume_from``. ``any_content`` (the command line): refuse any
    non-empty folder, unless ``resume_from`` is a checkpoint inside it."""
    out = Path(out)
    check(not out.exists() or out.is_dir(), f"output folder {out} is an existing file, not a "
          "folder: give --output (output_dir) the path of a folder for the run")
    if overwrite or not out.is_dir():
        return
    inside = resume_from is not None and Path(resume_from).resolve().parent == out.resolve()
    if resume_from is not None and (inside or not any_content):
        return
    found = previous_run(out)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise FastftError(f"output folder {out} already holds a run ({shown}): pass --overwrite "
                          "(overwrite=True) to replace it, --resume (resume_from) one of its "
                          "checkpoints to continue it, or choose another output folder")
    if any_content and any(out.iterdir()):
        names = sorted(p.name for p in out.iterdir())
        raise FastftError(f"--output {out} is not empty (it holds {', '.join(names[:3])}"
                          f"{', ...' if len(names) > 3 else ''}): pass --overwrite to write the "
                          "run into it anyway, or choose another folder")


def start_run(out: str | Path, config: dict, *, overwrite: bool = False,
              resume_from=None) -> None:
    """Make the output folder and write the run's ``config.json``; with ``overwrite`` (and
    no resume) first delete the previous run's files in it (its config, metrics and
    checkpoints; nothing else)."""
    out = Path(out)
    check(not out.exists() or out.is_dir(), f"output folder {out} is an existing file, not a "
          "folder: give --output (output_dir) the path of a folder for the run")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and resume_from is None:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for p in checkpoints(out):
            shutil.rmtree(p)
        for p in out.glob(".checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
    save_json(config, out / "config.json", indent=1, sort_keys=False)
