"""Training data: read records, check them, tokenise, batch.

Records are ``{"prompt", "completion"}`` or chat ``{"messages": [...]}`` (the
last message, the assistant's, is the completion; the tokenizer's chat template
renders the rest), from a JSONL, JSON-array or Parquet file, a list of dicts,
or a ``datasets`` object (reading: records.py). GRPO needs only ``prompt``, text
or a list of chat messages (other columns reach the reward function). Every
bad record is an error naming the file, line and field, unless
``skip_invalid`` is set, which counts and reports the skipped. An example
longer than ``max_length`` is cut to it and counted (``truncation``, the
default), or with ``truncation=False`` is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FastftError, check
from .key_tokens import completion_weights
from .records import Record, check_file, read_records  # noqa: F401 (data.read_records)


@dataclass
class DataStats:
    """What became of the records of one source: the summary lines a run prints."""
    records: int = 0  # all, the invalid ones included
    invalid: int = 0  # skipped under skip_invalid
    truncated: int = 0  # longer than max_length: cut to it, kept
    dropped: int = 0  # longer than max_length with no completion token left within it

    def lines(self, name: str, max_length: int) -> list[str]:
        out = []
        if self.invalid:
            out.append(f"fastft: skipped {self.invalid} invalid record(s) of {name} "
                       "(skip_invalid)")
        if self.truncated:
            out.append(f"fastft: truncated {self.truncated} of {self.records} record(s) of "
                       f"{name} to max_length={max_length}")
        if self.dropped:
            out.append(f"fastft: dropped {self.dropped} of {self.records} record(s) of {name}: "
                       f"no completion token left within max_length={max_length} (the prompt "
                       "fills it; raise max_length)")
        return out


def _text(rec: Record, key: str) -> str:
    v = rec.fields.get(key)
    hint = " (an SFT chat record is {'messages': [...]})" if isinstance(v, list) else ""
    check(isinstance(v, str), f"{rec.where}: field {key!r} must be a string; got "
          f"{type(v).__name__}{hint}")
    return v


def _chat(rec: Record, tokenizer, msgs: list, **kw) -> list[int]:
    """Token ids of ``msgs`` through the tokenizer's chat template; its failures name the
    record (a template is the user's code)."""
    check(getattr(tokenizer, "chat_template", None) is not None,
          f"{rec.where}: a chat record (a list of messages) needs a tokenizer with a chat "
          "template: set tokenizer.chat_template, or give the text itself")
    try:
        return list(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False, **kw))
    except Exception as e:  # jinja2 errors, raise_exception() in the template, ...
        why = str(e).splitlines()[0] if str(e) else ""
        raise FastftError(f"{rec.where}: the tokenizer's chat template failed on it "
                          f"({type(e).__name__}: {why})") from e


def _messages(v) -> bool:
    return isinstance(v, list) and bool(v) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in v)


def prompt_ids(tokenizer, prompt, where: str = "prompt") -> list[int]:
    """A GRPO prompt's token ids: text (with the tokenizer's special tokens) or a list of
    chat messages (the chat template, add_generation_prompt=True)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return _chat(Record(where, {}), tokenizer, prompt, add_generation_prompt=True)


def _sft_parts(rec: Record, tokenizer) -> tuple[list[int], list[int]]:
    f = rec.fields
    if "messages" in f:
        msgs = f["messages"]
        check(_messages(msgs) and len(msgs) >= 2, f"{rec.where}: field 'messages' must be a "
              "list of >= 2 {role, content} objects (strings)")
        check(msgs[-1]["role"] == "assistant", f"{rec.where}: the last message must be the "
              "assistant's (the completion to learn)")
        prompt = _chat(rec, tokenizer, msgs[:-1], add_generation_prompt=True)
        full = _chat(rec, tokenizer, msgs)
        check(full[:len(prompt)] == prompt, f"{rec.where}: the chat template does not render "
              "the conversation as prompt + completion")
        return prompt, full[len(prompt):]
    check("prompt" in f and "completion" in f,
          f"{rec.where}: a record needs 'prompt' and 'completion' (or 'messages'); it has "
          f"{sorted(f)}")
    prompt = tokenizer(_text(rec, "prompt"), add_special_tokens=True)["input_ids"]
    completion = tokenizer(_text(rec, "completion"), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion = completion + [tokenizer.eos_token_id]
    return list(prompt), list(completion)


def tokenize_sft(records: list[Record], tokenizer, *, max_length: int, truncation: bool,
                 completion_only: bool, skip_invalid: bool, key_tokens: str | None = None,
                 key_max_weight: float = 9.0,
                 key_norm: str = "sample") -> tuple[list[dict], DataStats]:
    """[{input_ids, labels, prompt_len[, weights]}], and what became of the records
    (DataStats). ``prompt_len``: the tokens before the completion (Masked Thought masks
    only those after it).

    ``weights`` (key-token weighted SFT, fastft/train/key_tokens.py): one number per
    position, for records with ``key_spans`` or ``weights`` or under ``key_tokens``.
    ``key_norm="sample"`` (TL-Training's, the default): when any record has weights,
    every record's weights are divided by their sum over its predicted tokens, so that
    sum(w CE) / sum(w) over a step is the mean over its samples of each sample's
    weighted mean; ``"step"``: the weights as they are, one weighted mean over the
    step's tokens.

    An example longer than ``max_length`` is cut to it and counted (``truncation``);
    one whose prompt fills ``max_length`` has no completion token left to learn and
    is dropped and counted. With ``truncation=False`` an over-long example is an
    error naming it (under ``skip_invalid``: skipped and counted as invalid).
    """
    out, stats = [], DataStats(records=len(records))
    for rec in records:
        try:
            check(rec.error is None, rec.error or "")
            prompt, completion = _sft_parts(rec, tokenizer)
            ids = prompt + completion
            labels = ([-100] * len(prompt) if completion_only else prompt) + completion
            weights = None
            if key_tokens is not None or "key_spans" in rec.fields or "weights" in rec.fields:
                check("completion" in rec.fields, f"{rec.where}: key-token weighting needs "
                      "a prompt/completion record")
                cw = completion_weights(rec.where, rec.fields, tokenizer,
                                        _text(rec, "completion"), len(completion), key_tokens,
                                        key_max_weight)
                weights = [1.0] * len(prompt) + cw
            cut = len(ids) > max_length
            if cut:
                check(truncation, f"{rec.where}: {len(ids)} tokens, longer than "
                      f"max_length={max_length} (raise max_length, or truncation=true "
                      "(--truncation) to cut it)")
                ids, labels = ids[:max_length], labels[:max_length]
                weights = weights[:max_length] if weights is not None else None
            check(cut or any(t != -100 for t in labels[1:]), f"{rec.where}: no completion "
                  "token to learn")
        except FastftError:
            if not skip_invalid:
                raise
            stats.invalid += 1
            continue
        if cut and not any(t != -100 for t in labels[1:]):
            stats.dropped += 1
            continue
        stats.truncated += cut
        row = {"input_ids": ids, "labels": labels, "prompt_len": min(len(prompt), len(ids))}
        out.append(row if weights is None else dict(row, weights=weights))
    if key_norm == "sample" and any("weights" in r for r in out):
        for r in out:
            r["weights"] = per_sample_weights(r)
    check(bool(out), f"no usable training records: of {stats.records}, {stats.invalid} invalid "
          f"(skip_invalid), {stats.dropped} with no completion token within "
          f"max_length={max_length}")
    return out, stats


def per_sample_weights(row: dict) -> list[float]:
    """``row``'s weights (1 each when it has none) divided by their sum over its predicted
    tokens (positions 1.. whose label is not -100): each sample then adds 1 to a step's
    normaliser (key_norm="sample")."""
    w = row.get("weights") or [1.0] * len(row["input_ids"])
    total = sum(v for v, t in zip(w[1:], row["labels"][1:]) if t != -100)
    check(total > 0, "a record's key-token weights sum to 0 over its completion: give some "
          "token a weight > 0, or drop the record")
    return [v / total for v in w]


def read_prompts(records: list[Record], skip_invalid: bool,
                 tokenizer=None) -> tuple[list[dict], DataStats]:
    """GRPO rows: {prompt, **other columns}, and what became of the records (DataStats).

    A prompt is text, or a list of chat messages rendered with the tokenizer's chat
    template (checked here; the reward function gets the messages as the prompt).
    """
    out, stats = [], DataStats(records=len(records))
    for rec in records:
        try:
            check(rec.error is None, rec.error or "")
            check("prompt" in rec.fields, f"{rec.where}: a GRPO record needs 'prompt'; it has "
                  f"{sorted(rec.fields)}")
            p = rec.fields["prompt"]
            if isinstance(p, list):
                check(_messages(p), f"{rec.where}: a chat 'prompt' must be a list of "
                      "{role, content} messages (strings)")
                check(tokenizer is not None, f"{rec.where}: a chat 'prompt' needs the tokenizer")
                _chat(rec, tokenizer, p, add_generation_prompt=True)
            else:
                _text(rec, "prompt")
        except FastftError:
            if not skip_invalid:
                raise
            stats.invalid += 1
            continue
        out.append(rec.fields)
    check(bool(out), f"no usable prompts: all {stats.records} invalid (skip_invalid)")
    return out, stats


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, labels (-100 at padding), attention_mask (and
    weights, 0 at padding, when an example has them)."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), n, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    places = [(i, 0) for i in range(len(examples))]
    return _with_weights(_with_completion(out, examples, places), examples, places)


def _with_completion(batch: dict, examples: list[dict], places: list[tuple[int, int]]) -> dict:
    """Add ``completion_tokens`` [B, S] (True from each example's ``prompt_len`` to its
    end) when every example has ``prompt_len``."""
    if not all("prompt_len" in e for e in examples):
        return batch
    c = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for e, (row, at) in zip(examples, places):
        c[row, at + e["prompt_len"]:at + len(e["input_ids"])] = True
    return dict(batch, completion_tokens=c)


def _with_weights(batch: dict, examples: list[dict], places: list[tuple[int, int]]) -> dict:
    """Add ``weights`` [B, S] (1 for an example without, 0 at padding) when any has them;
    ``places``: (row, start) of each example."""
    if not any("weights" in e for e in examples):
        return batch
    w = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for e, (row, at) in zip(examples, places):
        k = len(e["input_ids"])
        w[row, at:at + k] = torch.tensor(e["weights"]) if "weights" in e else 1.0
    return dict(batch, weights=w)


def item_weight(batch: dict) -> torch.Tensor:
    """What a micro-batch adds to the step's normaliser: its predicted tokens, or their
    weights' sum (key-token weighting: sum(w CE) / sum(w))."""
    predicted = batch["labels"][:, 1:] != -100
    if "weights" in batch:
        return (batch["weights"][:, 1:] * predicted).sum().float()
    return predicted.sum().float()


def collate_packed(examples: list[dict], pad_id: int, max_length: int,
                   varlen: bool = False) -> dict[str, torch.Tensor]:
    """Examples packed into rows of at most ``max_length`` tokens with no padding between them.

    position_ids restart at each example. With ``varlen`` (a model running
    flash-attn) there is no attention mask: flash-attn's varlen kernel reads the
    example boundaries from position_ids. Otherwise ``attention_mask`` is a
    [B, 1, S, S] boolean block-diagonal causal mask, so that examples never
    attend to each other (SDPA, eager).
    """
    rows, cur, places = [], [], []
    for e in examples:
        if cur and sum(len(x["input_ids"]) for x in cur) + len(e["input_ids"]) > max_length:
            rows.append(cur)
            cur = []
        cur.append(e)
    if cur:
        rows.append(cur)
    S = max(sum(len(x["input_ids"]) for x in r) for r in rows)
    B = len(rows)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    labels = torch.full((B, S), -100, dtype=torch.long)
    pos = torch.zeros(B, S, dtype=torch.long)
    seg = torch.full((B, S), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for j, e in enumerate(row):
            places.append((b, at))
            k = len(e["input_ids"])
            ids[b, at:at + k] = torch.tensor(e["input_ids"])
            labels[b, at:at + k] = torch.tensor(e["labels"])
            labels[b, at] = -100  # never predicted across the boundary from the example before
            pos[b, at:at + k] = torch.arange(k)
            seg[b, at:at + k] = j
            at += k
    flat = [e for row in rows for e in row]
    out = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if not varlen:
        same = seg[:, :, None] == seg[:, None, :]
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        out["attention_mask"] = (same & causal & (seg[:, :, None] >= 0))[:, None]
    return _with_weights(_with_completion(out, flat, places), flat, places)
