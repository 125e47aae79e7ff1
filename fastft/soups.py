"""Model soups (METHODS.md §6): uniform (the mean of the weights of N models) and greedy.

Greedy (Wortsman et al., 2022): the models sorted by their own held-out score,
best first (ties keep the input order); the soup starts as the best one and
each next model joins it only if the soup's score strictly improves. Inputs,
adapters merged on the fly and the streamed output: ``fastft.merging``. The mean
is an fp32 sum in input order divided by N, rounded once to the first model's
dtype, so the soup of one model is that model, bit for bit. A tensor that is not
a float (an integer buffer) must be equal in every model.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from .errors import FastftError, check
from .merging import TOKENIZER_FILES, check_equal, check_out, check_same, open_model, write_model

__all__ = ["uniform_soup", "greedy_soup", "heldout_score", "tokenizer_folder"]


def _mean_of(models):
    def tensor_of(name):
        acc = first = None
        for m in models:  # one tensor of each model at a time
            t = m.get(name)
            if not t.is_floating_point():
                if first is None:
                    first = t
                else:
                    check_equal(name, first, t, models[0].label, m.label)
                continue
            if acc is None:
                dtype, acc = t.dtype, t.float().clone()
            else:
                acc.add_(t.float())
            del t
        return first if acc is None else acc.div_(len(models)).to(dtype)
    return tensor_of


def _open_all(paths, base):
    check(len(paths) >= 1, "a soup needs at least one model")
    models = [open_model(p, base) for p in paths]
    check_same(models)
    return models


def uniform_soup(paths, out, *, base=None) -> Path:
    """The mean of the weights of ``paths`` (fp32 sums, rounded once to the first's dtype)."""
    models = _open_all(paths, base)
    check_out(Path(out))
    recipe = {"method": "uniform soup", "inputs": [m.label for m in models]}
    return write_model(out, models[0], _mean_of(models), recipe)


def _score(eval_fn, folder, label) -> float:
    s = eval_fn(folder)
    try:
        ok = not isinstance(s, (bool, str)) and math.isfinite(float(s))
    except (TypeError, ValueError, RuntimeError):  # None, a list, a tensor of many values
        ok = False
    check(ok, f"eval_fn returned {s!r} for {label}: it must return a finite number "
          "(higher is better)")
    return float(s)


def greedy_soup(paths, out, eval_fn, *, base=None) -> dict:
    """Greedy soup: the models sorted by ``eval_fn`` (higher is better; ties keep the
    input order), then each added to the soup only if the soup's score strictly improves.

    ``eval_fn(folder)`` scores a transformers model folder (a full input's own folder,
    else a temporary one). The result takes the config and tokenizer of the soup's first
    (best) model. Returns the recipe: ``kept``, ``scores``, ``order``, ``soup_score``.
    """
    models = _open_all(paths, base)
    out = Path(out)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / f".{out.name}.greedy"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        scores = []
        for i, m in enumerate(models):
            folder = m.model_folder() or write_model(scratch / f"model-{i}", m, m.get,
                                                     {"method": "input", "inputs": [m.label]})
            scores.append(_score(eval_fn, folder, m.label))
            shutil.rmtree(scratch / f"model-{i}", ignore_errors=True)
        order = sorted(range(len(models)), key=lambda i: -scores[i])
        kept, best, trials = [order[0]], scores[order[0]], []
        for i in order[1:]:
            trial = [models[j] for j in kept + [i]]
            folder = write_model(scratch / f"soup-{len(trials)}", trial[0], _mean_of(trial),
                                 {"method": "uniform soup", "inputs": [t.label for t in trial]})
            score = _score(eval_fn, folder, f"the soup of {[t.label for t in trial]}")
            shutil.rmtree(folder, ignore_errors=True)
            trials.append({"added": models[i].label, "score": score, "kept": score > best})
            if score > best:
                kept, best = kept + [i], score
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    soup = [models[j] for j in kept]
    recipe = {"method": "greedy soup", "inputs": [m.label for m in models],
              "scores": {m.label: s for m, s in zip(models, scores)},
              "order": [models[i].label for i in order], "trials": trials,
              "kept": [m.label for m in soup], "soup_score": best}
    write_model(out, soup[0], _mean_of(soup), recipe)
    return {"out": out, **recipe}


def heldout_score(data, tokenizer_folder, *, max_length: int = 1024, batch_size: int = 8):
    """An ``eval_fn`` for greedy soups: minus the mean token cross-entropy of a model folder's
    completions on ``data`` (a data file or records, as training reads them). Each call
    loads the whole candidate (fp32 on the CPU, bf16 on a GPU): for models that fit."""
    from transformers import AutoTokenizer

    from .train import data as d

    check(isinstance(batch_size, int) and batch_size >= 1 and isinstance(max_length, int)
          and max_length >= 2, "heldout_score needs batch_size >= 1 and max_length >= 2; got "
          f"{batch_size!r}, {max_length!r}")
    records = d.read_records(data, "eval_data")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    rows, _ = d.tokenize_sft(records, tok, max_length=max_length, truncation=True,
                             completion_only=True, skip_invalid=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    @torch.no_grad()
    def eval_fn(folder) -> float:
        from transformers import AutoModelForCausalLM

        from . import losses
        from .patch import next_token_labels, output_head
        from .recipe.loss_model import CausalLMLoss

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                         local_files_only=True).to(dev).eval()
        except (OSError, ValueError) as e:
            raise FastftError(f"cannot load {folder}: {str(e).splitlines()[0]}") from e
        lm, total, count = CausalLMLoss(model, None), 0.0, 0
        for i in range(0, len(rows), batch_size):
            b = {k: v.to(dev) for k, v in d.collate(rows[i:i + batch_size], pad).items()}
            labels = next_token_labels(b["labels"])
            total += float(losses.cross_entropy(
                lm.hidden(b), output_head(model).weight, labels, reduction="sum",
                softcap=lm.softcap, temperature=lm.temperature, bias=lm.head_bias()))
            count += int((labels != -100).sum())
        return -total / max(count, 1)
    return eval_fn


def tokenizer_folder(model) -> Path:
    """The folder a model's tokenizer loads from (an adapter's own, else its base's)."""
    for folder in reversed(model.files):
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    raise FastftError(f"{model.files[0]} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, "
                      "...): greedy soups read --eval-data with the first model's tokenizer")

