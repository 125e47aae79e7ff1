"""Files on disk: written atomically, read back with a clear error when damaged.

The lowest layer of fastft's saving (adapters, optimizer state, sparse
differences, checkpoints all use it; it imports nothing of fastft but the
errors). A write goes to a temporary file in the target's folder, is flushed
and fsynced, and is renamed over the target; the folder is then fsynced so the
rename itself survives a crash. A reader sees the old file or the new one,
never half of one. A read of a truncated or corrupt safetensors or JSON file
raises :class:`FastftError` naming the file (``hint`` says what to do).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import FastftError


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the entries (renames, new files) of ``folder`` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under ``folder`` (what a library wrote without fsync)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def atomic_write(path: str | os.PathLike, write) -> None:
    """``write(tmp)`` writes a temporary file beside ``path``; it is fsynced and renamed over
    ``path``. On any failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """``tensors`` (moved to the CPU, made contiguous) as one safetensors file, atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def save_text(text: str, path: str | os.PathLike) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def save_json(obj, path: str | os.PathLike, *, indent: int | None = 2,
              sort_keys: bool = True) -> None:
    save_text(json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n", path)


def damaged(path, reason, hint: str = "") -> FastftError:
    """The error for a file that exists but cannot be read."""
    reason = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
    return FastftError(f"{path} is damaged (truncated or corrupt: {reason})"
                       + (f": {hint}" if hint else ""))


def _exists(path: Path, hint: str) -> None:
    if not path.is_file():
        raise FastftError(f"{path} not found" + (f": {hint}" if hint else ""))


def read_safetensors_metadata(path: str | os.PathLike, hint: str = "") -> dict[str, str]:
    """The metadata of a safetensors file; checks the header and that the file holds every
    byte it announces (a truncated file fails here)."""
    path = Path(path)
    _exists(path, hint)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise damaged(path, e, hint) from e


def load_safetensors(path: str | os.PathLike, hint: str = "",
                     device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a damaged file is a FastftError naming it."""
    path = Path(path)
    _exists(path, hint)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise damaged(path, e, hint) from e


def load_json(path: str | os.PathLike, hint: str = "", kind: type | None = dict):
    """A JSON file's content (of type ``kind`` unless None); a truncated or corrupt file is a
    FastftError naming it."""
    path = Path(path)
    _exists(path, hint)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(path, e, hint) from e
    if kind is not None and not isinstance(obj, kind):
        raise damaged(path, f"a JSON {type(obj).__name__} where a {kind.__name__} belongs", hint)
    return obj


def save_model_files(folder: Path, model, tokenizer=None, config_updates: dict | None = None
                     ) -> None:
    """Beside the weights: the transformers config (as ``save_pretrained`` writes it:
    architectures and dtype set; ``use_cache`` back on, training turned it off; then
    ``config_updates``), the generation config and the tokenizer, each written atomically."""
    import copy

    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]
        dtype = next((p.dtype for p in model.parameters()), None)
        if dtype is not None:
            config.dtype = str(dtype).removeprefix("torch.")
        if hasattr(config, "use_cache"):
            config.use_cache = True
        for k, v in (config_updates or {}).items():
            setattr(config, k, v)
        save_text(config.to_json_string(use_diff=True), Path(folder) / "config.json")
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "to_json_string"):
        save_text(generation.to_json_string(use_diff=True),
                  Path(folder) / "generation_config.json")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder))
