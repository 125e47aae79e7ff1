"""Key-token weighted SFT (TL-Training's prioritised key tokens; METHODS.md §7).

A completion's key tokens weigh w = min(N_other / N_key, max_weight) (1 when
N_key >= N_other), the others 1. ``key_norm="sample"`` (the default, TL-Training's):
each sample's loss is sum(w CE) / sum(w) over its tokens, and the step's the mean over
its samples (data.tokenize_sft divides each record's weights by their sum);
``"step"``: sum(w CE) / sum(w) over the completion tokens of the step. Both go through
the fused losses' per-row ``weights``, with the weights' sum as ``num_items_in_batch``. Key tokens come from the record:
``"key_spans": [[start, end], ...]`` (character spans of the completion text),
or ``"weights"`` (one number per completion token, as the tokenizer splits the
completion; the end-of-sequence token fastft appends weighs 1); or from a rule:
``key_tokens=REGEX`` over the completion text. A token is key when its
characters overlap a span.
"""

from __future__ import annotations

import re

from ..errors import check


def weights_from_mask(is_key: list[bool], max_weight: float) -> list[float]:
    n_key = sum(is_key)
    n_other = len(is_key) - n_key
    w = 1.0 if n_key == 0 or n_key >= n_other else min(n_other / n_key, max_weight)
    return [w if k else 1.0 for k in is_key]


def completion_weights(where: str, fields: dict, tokenizer, text: str, n_tokens: int,
                       regex: str | None, max_weight: float) -> list[float] | None:
    """Per-token weights of a completion of ``n_tokens`` tokens (its appended EOS included),
    or None when the record and the config mark no key tokens."""
    if "weights" in fields:
        w = fields["weights"]
        check(isinstance(w, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and v >= 0 for v in w),
              f"{where}: field 'weights' must be a list of numbers >= 0, one per completion token")
        check(len(w) in (n_tokens, n_tokens - 1), f"{where}: 'weights' has {len(w)} numbers but "
              f"the completion has {n_tokens - 1} tokens (and the EOS fastft appends)")
        return [float(v) for v in w] + [1.0] * (n_tokens - len(w))
    spans = fields.get("key_spans")
    if spans is None and regex is None:
        return None
    if spans is None:
        spans = [m.span() for m in re.finditer(regex, text) if m.end() > m.start()]
    check(isinstance(spans, list) and all(isinstance(s, (list, tuple)) and len(s) == 2 and
                                          all(isinstance(v, int) for v in s) for s in spans),
          f"{where}: field 'key_spans' must be a list of [start, end] character offsets")
    check(getattr(tokenizer, "is_fast", False), "key-token weighting needs a fast tokenizer "
          "(character offsets of the tokens)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = list(enc["offset_mapping"])
    check(len(offsets) in (n_tokens, n_tokens - 1), f"{where}: the completion's tokens do not "
          "match its offsets (key-token weighting needs prompt/completion records)")
    is_key = [any(a < e and s < b for s, e in spans) for a, b in offsets]
    is_key += [False] * (n_tokens - len(is_key))
    return weights_from_mask(is_key, max_weight)
