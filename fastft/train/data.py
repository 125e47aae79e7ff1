"""Training data: read records, check them, tokenise, batch.

Records are ``{"prompt", "completion"}`` or chat ``{"messages": [...]}`` (the
last message, the assistant's, is the completion; the tokenizer's chat template
renders the rest), from a JSONL or Parquet file, a list of dicts, or a
``datasets`` object. GRPO needs only ``prompt`` (other columns reach the
reward function). Every bad record is an error naming the file, line and
field, unless ``skip_invalid`` is set, which counts and reports the skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FastftError, check


@dataclass
class Record:
    where: str  # "file.jsonl line 7", for errors
    fields: dict


def read_records(source, name: str = "data") -> list[Record]:
    """Records from a path (.jsonl / .json / .parquet), a list of dicts or a datasets.Dataset."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        check(path.is_file(), f"{name} file {path} not found")
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise FastftError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") \
                    from e
            rows = pq.read_table(path).to_pylist()
            records = [Record(f"{path} row {i + 1}", r) for i, r in enumerate(rows)]
        else:
            records = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise FastftError(f"{path} line {i}: not valid JSON ({e.msg})") from e
                    check(isinstance(obj, dict), f"{path} line {i}: a record must be a JSON "
                          f"object, got {type(obj).__name__}")
                    records.append(Record(f"{path} line {i}", obj))
        check(bool(records), f"{name} file {path} is empty")
        return records
    rows = list(source)
    check(bool(rows), f"{name} is empty")
    return [Record(f"{name} record {i + 1}", dict(r)) for i, r in enumerate(rows)]


def _text(rec: Record, key: str) -> str:
    v = rec.fields.get(key)
    check(isinstance(v, str), f"{rec.where}: field {key!r} must be a string; got "
          f"{type(v).__name__}")
    return v


def _sft_parts(rec: Record, tokenizer) -> tuple[list[int], list[int]]:
    f = rec.fields
    if "messages" in f:
        msgs = f["messages"]
        check(isinstance(msgs, list) and len(msgs) >= 2 and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m
            for m in msgs), f"{rec.where}: field 'messages' must be a list of >= 2 "
            "{role, content} objects")
        check(msgs[-1]["role"] == "assistant", f"{rec.where}: the last message must be the "
              "assistant's (the completion to learn)")
        check(getattr(tokenizer, "chat_template", None) is not None,
              f"{rec.where}: chat 'messages' need a tokenizer with a chat template")
        prompt = list(tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False))
        full = list(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False))
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
                 completion_only: bool, skip_invalid: bool) -> tuple[list[dict], int]:
    """[{input_ids, labels}], and how many records were skipped."""
    out, skipped = [], 0
    for rec in records:
        try:
            prompt, completion = _sft_parts(rec, tokenizer)
            ids = prompt + completion
            labels = ([-100] * len(prompt) if completion_only else prompt) + completion
            if len(ids) > max_length:
                check(truncation, f"{rec.where}: {len(ids)} tokens, longer than "
                      f"max_length={max_length} (raise max_length, or allow truncation)")
                ids, labels = ids[:max_length], labels[:max_length]
            check(any(t != -100 for t in labels[1:]), f"{rec.where}: no completion token left "
                  f"to learn within max_length={max_length}")
        except FastftError:
            if not skip_invalid:
                raise
            skipped += 1
            continue
        out.append({"input_ids": ids, "labels": labels})
    check(bool(out), "no usable training records")
    return out, skipped


def read_prompts(records: list[Record], skip_invalid: bool) -> tuple[list[dict], int]:
    """GRPO rows: {prompt, **other columns}; and how many were skipped."""
    out, skipped = [], 0
    for rec in records:
        try:
            check("prompt" in rec.fields, f"{rec.where}: a GRPO record needs 'prompt'; it has "
                  f"{sorted(rec.fields)}")
            _text(rec, "prompt")
        except FastftError:
            if not skip_invalid:
                raise
            skipped += 1
            continue
        out.append(rec.fields)
    check(bool(out), "no usable prompts")
    return out, skipped


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, labels (-100 at padding), attention_mask."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), n, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(examples: list[dict], pad_id: int, max_length: int,
                   varlen: bool = False) -> dict[str, torch.Tensor]:
    """Examples packed into rows of at most ``max_length`` tokens with no padding between them.

    position_ids restart at each example. With ``varlen`` (a model running
    flash-attn) there is no attention mask: flash-attn's varlen kernel reads the
    example boundaries from position_ids. Otherwise ``attention_mask`` is a
    [B, 1, S, S] boolean block-diagonal causal mask, so that examples never
    attend to each other (SDPA, eager).
    """
    rows, cur = [], []
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
            k = len(e["input_ids"])
            ids[b, at:at + k] = torch.tensor(e["input_ids"])
            labels[b, at:at + k] = torch.tensor(e["labels"])
            labels[b, at] = -100  # never predicted across the boundary from the example before
            pos[b, at:at + k] = torch.arange(k)
            seg[b, at:at + k] = j
            at += k
    if varlen:
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = (same & causal & (seg[:, :, None] >= 0))[:, None]
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}
