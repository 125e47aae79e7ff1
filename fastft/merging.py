"""Merging fine-tuned models, streamed tensor by tensor from safetensors: the inputs, the
output folder, and LiNeS (METHODS.md §6); the model soups are in ``fastft/soups.py``.

Inputs: a run folder (its newest ``checkpoint-N``), a checkpoint folder or a
transformers model folder, holding full weights (``model.safetensors``, or shards
named by ``model.safetensors.index.json``) or a LoRA adapter (``adapter/``, or a
folder with ``adapter_config.json``: PEFT's layout, saved by fastft or PEFT). An
adapter is merged into its base on the fly, W0 + s B A in fp32 rounded once to
W0's dtype (as ``fastft.merge``); its base is ``base_model_name_or_path`` of its
``adapter_config.json`` (a local folder) unless ``base`` (``--base``) is given.
Plain LoRA only: DoRA, ``alpha_pattern`` / ``rank_pattern``, ``modules_to_save``
and ``target_parameters`` are refused; a LoRA-SB adapter of fastft is read as the
plain LoRA it is also saved as.

Streaming: each input is opened with ``safetensors.safe_open`` and read one
tensor at a time; the result is written into ``model.safetensors`` as it is
computed (the header first, from the first input's header). Memory holds one
tensor of each input and the result's, never a whole model (an adapter's own
small file is read whole). The output folder: ``model.safetensors`` in the first
input's dtypes, that input's config, generation config and tokenizer (an
adapter's: its base's config, its own tokenizer) and ``fastft_merge.json`` (the
recipe); it is built under a temporary name and renamed into place.

LiNeS scales the fine-tuning update of block l of L by alpha + beta l / (L - 1).
The block of a parameter comes from its name: ``layers.<l>.``, ``h.<l>.``,
``layer.<l>.`` or ``blocks.<l>.``, where L is the largest index + 1. The
parameters outside the residual blocks, the embeddings (``embed_tokens``,
``wte``, ``wpe``, ``word_embeddings``, ...), the final norm (``norm``, ``ln_f``,
``final_layernorm``, ...) and the output head (``lm_head``, ``embed_out``), are
scaled by alpha, as the authors' ``LiNeS_scaling`` scales every tensor with no
block index (the head is not given the last block's alpha + beta). Any other
parameter must be left unchanged by the fine-tuning (else an error names it);
a model with no layer index at all is an error.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import FastftError, check
from .safeio import (
    atomic_write,
    damaged,
    fsync_dir,
    fsync_tree,
    load_json,
    load_safetensors,
    save_json,
)

__all__ = ["lines", "layer_of", "open_model", "check_same", "write_model", "write_streamed"]

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", \
    "base_model.model."
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# files of a checkpoint or adapter folder that are not the model's config or tokenizer
NOT_COPIED = {"trainer_state.json", "optimizer.json", "scheduler.json", "method.json",
              "rng.json", ADAPTER_CONFIG, "fastft_adapter.json", "fastft_merge.json", INDEX}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ---- inputs -------------------------------------------------------------------------------

class FullModel:
    """The stored tensors of a model folder, read one at a time (``get``)."""

    def __init__(self, folder: Path, label: str):
        self.folder, self.label, self.adapter = folder, label, None
        self.files = [folder]  # where its config and tokenizer files are
        if (folder / WEIGHTS).is_file():
            paths, where = [folder / WEIGHTS], None
        else:
            index = load_json(folder / INDEX, "save the model again")
            where = {k: folder / v for k, v in (index.get("weight_map") or {}).items()}
            check(bool(where), f"{folder / INDEX} names no tensors (no weight_map)")
            paths = sorted(set(where.values()))
        self._open = {p: self._safe_open(p) for p in paths}
        if where is None:
            where = {k: paths[0] for k in self._open[paths[0]].keys()}
        self.where, self.keys = where, list(where)
        self.metadata = dict(self._open[paths[0]].metadata() or {})

    @staticmethod
    def _safe_open(path: Path):
        check(path.is_file(), f"{path} not found (named by {INDEX})")
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise damaged(path, e, "save the model again") from e

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) of a tensor, from the header (nothing is read)."""
        s = self._open[self.where[name]].get_slice(name)
        return s.get_dtype(), tuple(s.get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._open[self.where[name]].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise damaged(self.where[name], e, "save the model again") from e

    def model_folder(self) -> Path | None:
        """The folder itself when transformers can load it as it is."""
        return self.folder if (self.folder / "config.json").is_file() else None


class AdapterModel:
    """A LoRA adapter merged into its base, one tensor at a time."""

    def __init__(self, folder: Path, base: FullModel, label: str):
        self.folder, self.base, self.label, self.adapter = folder, base, label, folder
        self.files = [*base.files, folder]  # the adapter's tokenizer over its base's
        self.keys, self.metadata = base.keys, base.metadata
        cfg = load_json(folder / ADAPTER_CONFIG, "save the adapter again")
        check(cfg.get("peft_type", "LORA") == "LORA", f"{folder / ADAPTER_CONFIG}: peft_type "
              f"{cfg.get('peft_type')!r} is not a LoRA adapter")
        for key in ("use_dora", "alpha_pattern", "rank_pattern", "modules_to_save",
                    "target_parameters"):
            check(not cfg.get(key), f"{folder / ADAPTER_CONFIG}: {key}={cfg.get(key)!r} is not "
                  "supported by soups and LiNeS (plain LoRA only): merge the adapter into its "
                  "base first (fastft.merge or PEFT's merge_and_unload) and give the merged model")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
        check(isinstance(r, int) and r >= 1 and isinstance(alpha, (int, float)),
              f"{folder / ADAPTER_CONFIG}: r={r!r}, lora_alpha={alpha!r}: r must be an int >= 1"
              " and lora_alpha a number (save the adapter again)")
        self.scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        state, _ = load_safetensors(folder / ADAPTER_WEIGHTS, "save the adapter again")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight",
                             key)
            check(m is not None, f"{folder / ADAPTER_WEIGHTS}: tensor {key} is not a LoRA "
                  "lora_A/lora_B weight (plain LoRA on linear layers only)")
            parts.setdefault(f"{m.group(1)}.weight", {})[m.group(2)] = t
        self.pairs = {}
        for name, ab in parts.items():
            check(len(ab) == 2, f"{folder / ADAPTER_WEIGHTS}: {name} has {sorted(ab)} only")
            check(name in base.where, f"the adapter in {folder} adapts {name}, which its base "
                  f"{base.folder} does not hold (a different base model? give --base)")
            want = base.info(name)[1]
            got = (ab["lora_A"].shape[1], ab["lora_B"].shape[0]) if self.fan_in_fan_out \
                else (ab["lora_B"].shape[0], ab["lora_A"].shape[1])
            check(tuple(got) == want, f"the adapter in {folder} updates {name} as {tuple(got)}, "
                  f"but the base {base.folder} holds it as {want} (a different base model? "
                  "give --base)")
            self.pairs[name] = (ab["lora_A"], ab["lora_B"])

    def info(self, name):
        return self.base.info(name)

    def get(self, name: str) -> torch.Tensor:
        w = self.base.get(name)
        if name not in self.pairs:
            return w
        a, b = self.pairs[name]
        delta = self.scale * (b.float() @ a.float())
        return (w.float() + (delta.t() if self.fan_in_fan_out else delta)).to(w.dtype)

    def model_folder(self) -> Path | None:
        return None


def _has_weights(folder: Path) -> bool:
    return any((folder / n).is_file() for n in (WEIGHTS, INDEX, ADAPTER_CONFIG)) \
        or (folder / "adapter" / ADAPTER_CONFIG).is_file()


def open_model(path, base=None):
    """A run folder (its newest checkpoint-N), a checkpoint or a model folder, opened for
    streaming; an adapter is merged into ``base`` (else its config's base) on the fly."""
    from .train.checkpoint import checkpoints

    p = Path(path)
    check(p.exists(), f"{p} not found: give a run folder, a checkpoint-N folder or a model folder")
    check(p.is_dir(), f"{p} is a file: give a run folder, a checkpoint-N folder or a model folder")
    folder = p
    if not _has_weights(p):
        found = checkpoints(p)
        run = (p / "metrics.jsonl").is_file() or (p / "trainer_state.json").is_file()
        check(bool(found), f"{p} holds no checkpoint (no checkpoint-N folder{' yet' if run else ''}"
              f", no {WEIGHTS} and no adapter): give a run folder with a checkpoint, a "
              "checkpoint-N folder or a model folder")
        folder = found[0]
        check(_has_weights(folder), f"{folder} holds no {WEIGHTS} and no adapter/: not a "
              "complete checkpoint; give an earlier one")
    adapter = folder / "adapter" if (folder / "adapter" / ADAPTER_CONFIG).is_file() else \
        folder if (folder / ADAPTER_CONFIG).is_file() and not (folder / WEIGHTS).is_file() else None
    if adapter is None:
        return FullModel(folder, str(path))
    if base is None:
        cfg = load_json(adapter / ADAPTER_CONFIG, "save the adapter again")
        base = cfg.get("base_model_name_or_path") or ""
        check(bool(base) and Path(base).is_dir(), f"the base model of the adapter in {adapter}, "
              f"{base!r} (base_model_name_or_path of its {ADAPTER_CONFIG}), is not a local "
              "folder: give the base model's folder with --base (base=)")
    base_model = open_model(base)
    check(base_model.adapter is None, f"the base {base} is itself an adapter: give the full "
          "model the adapter was trained on")
    return AdapterModel(adapter, base_model, str(path))


def check_same(models) -> None:
    """Every model holds the same tensor names with the same shapes as the first."""
    ref = models[0]
    for m in models[1:]:
        mine, theirs = set(ref.keys), set(m.keys)
        only = [k for k in ref.keys if k not in theirs] or [k for k in m.keys if k not in mine]
        if only:
            where = ref.label if only[0] in mine else m.label
            raise FastftError(f"{only[0]} is in {where} only ({m.label} and {ref.label} hold "
                              "different parameters): merging needs models of one architecture")
        for k in ref.keys:
            a, b = ref.info(k)[1], m.info(k)[1]
            check(a == b, f"{k} is {list(a)} in {ref.label} but {list(b)} in {m.label}: merging "
                  "needs models of one architecture and size")


# ---- the result ---------------------------------------------------------------------------

def write_streamed(path: Path, entries: list[tuple[str, str, tuple]], tensor_of,
                   metadata: dict[str, str] | None) -> None:
    """A safetensors file whose tensors ``tensor_of(name)`` gives one at a time, in the order
    of ``entries`` [(name, dtype, shape)]; written atomically, never whole in memory."""
    header, at = {}, 0
    for name, dtype, shape in entries:
        check(dtype in DTYPES, f"{name} is stored as {dtype}, which merging does not read "
              f"(it reads {', '.join(DTYPES)})")
        n = DTYPES[dtype].itemsize * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, dtype, shape in entries:
                t = tensor_of(name)
                assert t.dtype == DTYPES[dtype] and tuple(t.shape) == tuple(shape), name
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del t
    atomic_write(path, write)


def check_out(out: Path) -> None:
    check(not out.exists() or (out.is_dir() and not any(out.iterdir())),
          f"--out {out} already exists and is not empty: choose a new folder")


def write_model(out, primary, tensor_of, recipe: dict) -> Path:
    """The output folder: ``primary``'s config and tokenizer, the tensors ``tensor_of`` gives
    (in ``primary``'s names, shapes and dtypes) and the recipe; renamed into place whole."""
    out = Path(out)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for folder in primary.files:
            for f in sorted(folder.iterdir()):
                if f.is_file() and f.name not in NOT_COPIED and \
                        not f.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
                    shutil.copyfile(f, tmp / f.name)
        check((tmp / "config.json").is_file(), f"{primary.files[0]} has no config.json: not a "
              "transformers model folder")
        entries = [(k, *primary.info(k)) for k in primary.keys]
        meta = {k: v for k, v in primary.metadata.items() if k in ("format", "aliases")}
        write_streamed(tmp / WEIGHTS, entries, tensor_of, meta or {"format": "pt"})
        save_json(recipe, tmp / "fastft_merge.json")
        fsync_tree(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_equal(name: str, first: torch.Tensor, t: torch.Tensor, a: str, b: str) -> None:
    check(torch.equal(first, t), f"{name} ({first.dtype}, not a float) differs between {a} and "
          f"{b}: it cannot be averaged or interpolated")


# ---- LiNeS --------------------------------------------------------------------------------

LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
EMBEDDING = {"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
             "embed_positions", "embeddings"}
LAST = {"lm_head", "embed_out", "norm", "ln_f", "final_layernorm", "final_layer_norm",
        "final_norm"}  # the final norm and the output head


def layer_of(name: str, n_layers: int | None = None) -> int | None:
    """The block of a parameter for LiNeS: ``layers.<l>.`` / ``h.<l>.`` / ``layer.<l>.`` /
    ``blocks.<l>.`` give l; an embedding, the final norm and the output head lie outside
    the blocks and count as block 0 (factor alpha, as in the authors' ``LiNeS_scaling``);
    anything else: None. ``n_layers`` is not needed (kept for callers that pass it)."""
    m = LAYER.search(name)
    if m:
        return int(m.group(1))
    return 0 if set(name.split(".")) & (EMBEDDING | LAST) else None


def _number(value, name: str) -> float:
    try:
        ok = not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    check(ok, f"{name} must be a number; got {value!r}")
    return float(value)


def lines(base, finetuned, out, alpha, beta=None) -> Path:
    """LiNeS: base + (alpha + beta l / (L - 1)) (finetuned - base) for block l of L.

    ``beta`` defaults to 1 - alpha (the last block keeps its whole update). The block of
    a parameter: :func:`layer_of`; L = the largest index + 1 (with L = 1 the factor is
    alpha). The embeddings, the final norm and the output head (tied or not) are outside
    the blocks and scaled by alpha, as the authors' ``LiNeS_scaling`` does. Any other
    parameter in no block must be unchanged by the fine-tuning (else an error names it).
    ``finetuned`` may be an adapter: it is merged into ``base`` on the fly. The result
    has the fine-tuned model's config, tokenizer and dtypes; math in fp32, rounded once.
    A factor of exactly 1 (0) copies the fine-tuned (base) tensor bit for bit.
    """
    alpha = _number(alpha, "alpha")
    beta = 1.0 - alpha if beta is None else _number(beta, "beta")
    base_model = open_model(base)
    check(base_model.adapter is None, f"--base {base} is an adapter: give the full model the "
          "fine-tuning started from")
    tuned = open_model(finetuned, base)
    check_same([tuned, base_model])
    check_out(Path(out))
    found = [int(m.group(1)) for k in tuned.keys if (m := LAYER.search(k))]
    check(bool(found), f"LiNeS on a model with no layer index: no parameter of {tuned.label} "
          "is named layers.<l>. / h.<l>. / layer.<l>. / blocks.<l>. (e.g. "
          f"{tuned.keys[0] if tuned.keys else 'none'}), so there are no blocks to scale")
    n = max(found) + 1
    placed = {k: layer_of(k) for k in tuned.keys}
    changed = []
    for k in (k for k, layer in placed.items() if layer is None):  # one pair at a time
        t = tuned.get(k)
        if not torch.equal(t, base_model.get(k).to(t.dtype)):
            changed.append(k)
        del t
    check(not changed, f"LiNeS cannot place {', '.join(changed[:3])}"
          f"{', ...' if len(changed) > 3 else ''} in a block (no layer index, not an "
          "embedding, final norm or head) and the fine-tuning changed it")

    def factor(layer: int) -> float:
        return alpha + beta * layer / (n - 1) if n > 1 else alpha

    def tensor_of(name):
        layer = placed[name]
        s = 1.0 if layer is None else factor(layer)  # a parameter in no block: unchanged
        if s == 1.0:
            return tuned.get(name)
        w0 = base_model.get(name)
        if s == 0.0:
            return w0.to(DTYPES[tuned.info(name)[0]])
        w1 = tuned.get(name)
        if not w1.is_floating_point():
            check_equal(name, w1, w0.to(w1.dtype), tuned.label, base_model.label)
            return w1
        return (w0.float() + s * (w1.float() - w0.float())).to(w1.dtype)

    recipe = {"method": "lines", "base": base_model.label, "finetuned": tuned.label,
              "alpha": alpha, "beta": beta, "layers": n,
              "factors": [factor(layer) for layer in range(n)], "outside": alpha}
    return write_model(out, tuned, tensor_of, recipe)
