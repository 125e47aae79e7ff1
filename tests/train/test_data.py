"""Training data: clear errors naming file, line and field; chat records; packing."""


import pytest
import torch

import fastft
from fastft import FastftError
from fastft.losses import cross_entropy
from fastft.train import data

from .helpers import tiny_setup


def tok():
    return tiny_setup()[1]


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(lines))
    return p


def sft(path, **kw):
    opts = dict(max_length=32, truncation=True, completion_only=True, skip_invalid=False)
    opts.update(kw)
    return data.tokenize_sft(data.read_records(path), tok(), **opts)


@pytest.mark.parametrize("lines,words", [
    (['{"prompt": "1+1=", "completion": "2 2"}\n', "not json\n"], r"d.jsonl line 2: not valid JSON"),
    (['{"prompt": "1+1="}\n'], r"d.jsonl line 1: a record needs 'prompt' and 'completion'"),
    (['{"prompt": 3, "completion": "2"}\n'], r"line 1: field 'prompt' must be a string"),
    (['[1, 2]\n'], r"line 1: a record must be a JSON object"),
    ([], r"d.jsonl is empty"),
])
def test_bad_records(tmp_path, lines, words):
    with pytest.raises(FastftError, match=words):
        sft(write(tmp_path, lines))


def test_missing_file_and_too_long_without_truncation(tmp_path):
    with pytest.raises(FastftError, match="not found"):
        data.read_records(tmp_path / "none.jsonl")
    p = write(tmp_path, ['{"prompt": "12+34=", "completion": "64 46"}\n'] * 2)
    with pytest.raises(FastftError, match=r"line 1: 13 tokens, longer than max_length=8"):
        sft(p, max_length=8, truncation=False)


def test_skip_invalid_counts_what_it_skipped(tmp_path):
    p = write(tmp_path, ['{"prompt": "1+1=", "completion": "2 2"}\n', '{"x": 1}\n',
                         '{"prompt": "1+2=", "completion": "3 3"}\n'])
    rows, skipped = sft(p, skip_invalid=True)
    assert len(rows) == 2 and skipped == 1


def test_completion_only_masks_the_prompt(tmp_path):
    p = write(tmp_path, ['{"prompt": "12+34=", "completion": "64 46"}\n'])
    (row,), _ = sft(p)
    t = tok()
    n_prompt = len(t("12+34=")["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == t.eos_token_id


def test_chat_messages_use_the_template(tmp_path):
    t = tok()
    t.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}="
                       "{% endif %}{% endfor %}")
    rec = {"messages": [{"role": "user", "content": "12+34"},
                        {"role": "assistant", "content": "64 46"}]}
    (row,), _ = data.tokenize_sft(data.read_records([rec]), t, max_length=32, truncation=True,
                                  completion_only=True, skip_invalid=False)
    assert t.decode(row["input_ids"]) == "12+34=64 46"
    assert t.decode([i for i, y in zip(row["input_ids"], row["labels"]) if y != -100]) == "64 46"


def test_packed_batch_gives_the_same_loss_as_padded():
    model, t = tiny_setup()
    fastft.prepare(model, fastft.Full())
    rows = []
    for a, b in ((12, 34), (5, 6), (70, 81)):
        p = t(f"{a}+{b}=")["input_ids"]
        c = t(f"{a + b}", add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    dec, w = model.model, model.lm_head.weight

    def loss(batch):
        h = dec(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")
                   if k in batch})[0]
        labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
        return cross_entropy(h, w, labels, reduction="sum")

    padded = data.collate(rows, t.pad_token_id)
    packed = data.collate_packed(rows, t.pad_token_id, max_length=64)
    assert packed["input_ids"].shape[0] == 1 and (packed["input_ids"] != t.pad_token_id).all()
    with torch.no_grad():
        torch.testing.assert_close(loss(packed), loss(padded), rtol=1e-5, atol=1e-5)
    assert packed["position_ids"][0].tolist()[:7] == list(range(7))


def test_parquet_and_datasets_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"prompt": "12+34=", "completion": "64 46"}, {"prompt": "1+2=", "completion": "3 3"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    from_parquet, _ = sft(tmp_path / "d.parquet")
    datasets = pytest.importorskip("datasets")
    from_ds, _ = data.tokenize_sft(data.read_records(datasets.Dataset.from_list(rows)), tok(),
                                   max_length=32, truncation=True, completion_only=True,
                                   skip_invalid=False)
    assert from_parquet == from_ds and len(from_ds) == 2
    with pytest.raises(FastftError, match=r"d.parquet row 2: field 'completion' must be a string"):
        pq.write_table(pa.Table.from_pylist([rows[0], {"prompt": "x"}]), tmp_path / "d.parquet")
        sft(tmp_path / "d.parquet")
