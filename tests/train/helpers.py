"""A tiny trainer set-up: the demo's character tokenizer, a 2-layer Llama, arithmetic data."""

import json

from fastft.demo import arithmetic as ar


def tiny_setup(seed=0, hidden=32, layers=2):
    tok = ar.tokenizer()
    return ar.model(tok, hidden=hidden, layers=layers, heads=2, seed=seed), tok


def write_data(folder, n=16, seed=0, kind="sft"):
    pairs = ar.problems(n, seed=seed)
    rows = ar.sft_records(pairs) if kind == "sft" else ar.prompt_records(pairs)
    path = folder / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def count_sevens(prompts, completions, **_):
    return [c.count("7") / max(1, len(c)) for c in completions]
