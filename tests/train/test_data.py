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
    return data.tokenize_sft(data.read_records(path, skip_invalid=opts["skip_invalid"]), tok(),
                             **opts)


@pytest.mark.parametrize("lines,words", [
    (['{"prompt": "1+1=", "completion": "2 2"}\n', "not json\n"], r"d.jsonl line 2: not valid JSON"),
    (['{"prompt": "1+1="}\n'], r"d.jsonl line 1: a record needs 'prompt' and 'completion'"),
    (['{"prompt": 3, "completion": "2"}\n'], r"line 1: field 'prompt' must be a string"),
    (['{"prompt": "1+1=", "completion": "2"}\n', '[1, 2]\n'],
     r"line 2: a record must be a JSON object, got list"),
    ([], r"d.jsonl is empty"),
    (["\n", "  \n"], r"d.jsonl has no records \(only blank lines\)"),
    (['{\n "prompt": "1+1=",\n "completion": "2"\n}\n'],
     r"d.jsonl: one JSON object over several lines; JSON Lines .* or a JSON array"),
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
    rows, stats = sft(p, skip_invalid=True)
    assert len(rows) == 2 and (stats.records, stats.invalid) == (3, 1)


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


RECORD = b'{"prompt": "12+34=", "completion": "64 46"}\n'  # 7 prompt + 6 completion tokens
LATIN1 = b'{"prompt": "caf\xe9=", "completion": "1"}\n'


def test_not_utf8_names_line_and_byte_offset_or_is_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(RECORD + LATIN1 + RECORD)
    off = (RECORD + LATIN1).index(b"\xe9")
    with pytest.raises(FastftError, match=rf"d.jsonl line 2: not UTF-8 text \(byte 0xe9 at "
                       rf"byte offset {off} of the file\)"):
        data.read_records(p)
    rows, stats = sft(p, skip_invalid=True)
    assert len(rows) == 2 and (stats.records, stats.invalid) == (3, 1)


def test_bad_json_lines_are_skipped_and_counted_with_skip_invalid(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(RECORD + b"not json\n" + b'"a string"\n' + b'{"prompt": 1}\n' + RECORD)
    rows, stats = sft(p, skip_invalid=True)
    assert len(rows) == 2 and stats.invalid == 3
    assert stats.lines("data", 32) == ["fastft: skipped 3 invalid record(s) of data "
                                       "(skip_invalid)"]


def test_utf8_bom_is_read(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + RECORD)
    assert data.read_records(p)[0].fields == {"prompt": "12+34=", "completion": "64 46"}


def test_json_array_reads_as_the_same_records(tmp_path):
    import json

    rows = [{"prompt": "12+34=", "completion": "64 46"}, {"prompt": "1+2=", "completion": "3 3"}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "b.jsonl").write_text(json.dumps(rows))  # one line, .jsonl
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b, c = (data.read_records(tmp_path / n) for n in ("a.json", "b.jsonl", "c.jsonl"))
    assert [r.fields for r in a] == [r.fields for r in b] == [r.fields for r in c] == rows
    assert [r.where.split("/")[-1] for r in a] == ["a.json record 1 (line 2)",
                                                  "a.json record 2 (line 6)"]
    assert sft(tmp_path / "a.json") == sft(tmp_path / "c.jsonl")


@pytest.mark.parametrize("text,words", [
    ('[{"prompt": "1+1=", "completion": "2"},\n {"prompt": "1+2=" "completion": "3"}]',
     r"d.json line 2 column 20: not valid JSON \(Expecting ',' delimiter\) in the JSON array"),
    ('[{"prompt": "1+1=", "completion": "2"}\n {"prompt": "1+2=", "completion": "3"}]',
     r"d.json line 2 column 2: not valid JSON \(',' or ']' expected\)"),
    ('[{"prompt": "1+1=", "completion": "2"}', r"line 1 column 39: not valid JSON"),
    ('[{"prompt": "1+1=", "completion": "2"}]\n[{"prompt": "1", "completion": "2"}]\n',
     r"d.json line 2 column 1: not valid JSON \(more data after the array"),
    ('[{"prompt": "1+1=", "completion": "2"}, 3]', r"d.json record 2 \(line 1\): a record must"
     r" be a JSON object, got int"),
    ("[]", r"d.json has no records \(an empty JSON array\)"),
])
def test_broken_json_array(tmp_path, text, words):
    (tmp_path / "d.json").write_text(text)
    with pytest.raises(FastftError, match=words):
        sft(tmp_path / "d.json")


def test_json_array_with_a_record_not_utf8(tmp_path):
    p = tmp_path / "d.json"
    raw = b"[" + RECORD + b"," + LATIN1 + b"," + RECORD + b"]"
    p.write_bytes(raw)
    off = raw.index(LATIN1) + LATIN1.index(b"\xe9")
    with pytest.raises(FastftError, match=rf"d.json line 2: not UTF-8 text \(byte 0xe9 at byte "
                       rf"offset {off} of the file\)"):
        data.read_records(p)
    recs = data.read_records(p, skip_invalid=True)
    assert [r.error is None for r in recs] == [True, False, True]
    assert f"byte offset {off} of the file" in recs[1].error
    rows, stats = sft(p, skip_invalid=True)
    assert len(rows) == 2 and stats.invalid == 1


def test_parquet_is_known_by_its_bytes_and_a_false_one_is_named(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1=", "completion": "2"}]),
                   tmp_path / "real.jsonl")  # Parquet under another name: read as Parquet
    assert [r.fields for r in data.read_records(tmp_path / "real.jsonl")] == [
        {"prompt": "1+1=", "completion": "2"}]
    (tmp_path / "d.parquet").write_bytes(RECORD)
    with pytest.raises(FastftError, match=r"d.parquet: not a Parquet file .* it looks like "
                       r"JSON: name it .jsonl"):
        data.read_records(tmp_path / "d.parquet")
    good = (tmp_path / "real.jsonl").read_bytes()
    (tmp_path / "d.parquet").write_bytes(good[:-12])
    with pytest.raises(FastftError, match=r"d.parquet: a broken or truncated Parquet file "
                       r"\(Parquet magic bytes not found in footer"):
        data.read_records(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("prompt", pa.string())])),
                   tmp_path / "e.parquet")
    with pytest.raises(FastftError, match=r"e.parquet has no records \(a Parquet table of 0"):
        data.read_records(tmp_path / "e.parquet")


def test_folder_and_bad_python_sources(tmp_path):
    with pytest.raises(FastftError, match=r"data file .* is a folder: give a .jsonl"):
        data.read_records(tmp_path)
    with pytest.raises(FastftError, match=r"data record 2: a record must be a dict, got str"):
        data.read_records([{"prompt": "1"}, "x"])
    with pytest.raises(FastftError, match=r"data is a mapping with keys \['train'\] .* pass one "
                       r"split, e.g. data\['train'\]"):
        data.read_records({"train": [{"prompt": "1"}]})
    with pytest.raises(FastftError, match=r"data: give a file path, a list of dicts"):
        data.read_records(3)


def test_over_long_records_are_truncated_or_dropped_and_counted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(RECORD * 2 + b'{"prompt": "1+1=", "completion": "2"}\n'
                  + b'{"prompt": "12+34=12+34=", "completion": "64 46"}\n')
    rows, stats = sft(p, max_length=10)
    assert [len(r["input_ids"]) for r in rows] == [10, 10, 7]
    assert rows[0]["labels"][7:] == rows[0]["input_ids"][7:]  # 3 completion tokens kept
    assert (stats.records, stats.truncated, stats.dropped, stats.invalid) == (4, 2, 1, 0)
    assert stats.lines("data", 10) == [
        "fastft: truncated 2 of 4 record(s) of data to max_length=10",
        "fastft: dropped 1 of 4 record(s) of data: no completion token left within "
        "max_length=10 (the prompt fills it; raise max_length)"]
    with pytest.raises(FastftError, match=r"d.jsonl line 1: 13 tokens, longer than "
                       r"max_length=10 \(raise max_length, or truncation=true"):
        sft(p, max_length=10, truncation=False)
    rows, stats = sft(p, max_length=10, truncation=False, skip_invalid=True)
    assert len(rows) == 1 and (stats.invalid, stats.truncated, stats.dropped) == (3, 0, 0)
    with pytest.raises(FastftError, match=r"no usable training records: of 4, 0 invalid "
                       r"\(skip_invalid\), 4 with no completion token within max_length=4"):
        sft(p, max_length=4)


CHAT = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}={% endif %}"
        "{% endfor %}")


def test_grpo_chat_prompt_uses_the_chat_template():
    from fastft.train import rollout

    model, t = tiny_setup()
    rows = [{"prompt": [{"role": "user", "content": "12+34"}], "answer": 46},
            {"prompt": "1+2=", "answer": 3}]
    with pytest.raises(FastftError, match=r"data record 1: a chat record \(a list of messages\) "
                       r"needs a tokenizer with a chat template"):
        data.read_prompts(data.read_records(rows), False, t)
    t.chat_template = CHAT
    out, stats = data.read_prompts(data.read_records(rows), False, t)
    assert out == rows and stats.invalid == 0
    assert t.decode(data.prompt_ids(t, rows[0]["prompt"])) == "12+34="
    cfg = fastft.TrainConfig(num_generations=2, max_completion_length=3)
    roll = rollout.generate(model, t, [r["prompt"] for r in rows], cfg, "cpu")
    chat_ids = t("12+34=", add_special_tokens=False)["input_ids"]
    assert roll["prompt_ids"][0].tolist() == chat_ids  # no <bos>: the template has none
    assert roll["prompt_ids"][2].tolist() == [t.pad_token_id] + t("1+2=")["input_ids"]
    assert roll["prompt_mask"][2].tolist() == [0] + [1] * 5


@pytest.mark.parametrize("prompt,words", [
    ([{"role": "user"}], r"a chat 'prompt' must be a list of \{role, content\} messages"),
    ([], r"a chat 'prompt' must be a list"),
    ([{"role": "system", "content": "x"}], r"the tokenizer's chat template failed on it "
     r"\(TemplateError: no system role\)"),
])
def test_grpo_chat_prompt_errors_name_the_record(tmp_path, prompt, words):
    import json

    t = tok()
    t.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system " \
        "role') }}{% endif %}" + CHAT
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"prompt": "1+1="}) + "\n" + json.dumps({"prompt": prompt}) + "\n")
    with pytest.raises(FastftError, match=r"g.jsonl line 2: " + words):
        data.read_prompts(data.read_records(p), False, t)
    rows, stats = data.read_prompts(data.read_records(p), True, t)
    assert len(rows) == 1 and stats.invalid == 1


def test_gzip_file_is_named(tmp_path):
    import gzip

    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(RECORD))
    with pytest.raises(FastftError, match=r"d.jsonl.gz is gzip-compressed: decompress it"):
        data.read_records(tmp_path / "d.jsonl.gz")
