"""Every mistake a user can make: one clear line, exit 2, never a traceback; nothing half-saved.

Each case runs the command line in process (``fastft.cli.main``) or the Python API,
and checks the message names the problem. The table in the closing notes of the
project comes from these cases; add one here for every new user-facing input.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from fastft.cli import main
from fastft.errors import FastftError

from .train.helpers import tiny_setup, write_data

EXAMPLE_8B = Path(__file__).resolve().parents[1] / "examples" / "llama-3-8b" / "config.json"


def one_line(capsys, args, *words):
    """Run ``fastft ARGS``: exit 2 and a single ``fastft: error:`` line naming ``words``."""
    capsys.readouterr()  # what the test's own set-up printed
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    # progress bars (transformers' "Loading weights: 100%|...") are not part of the message
    lines = [ln for ln in err.strip().splitlines() if not re.search(r"\d+%\|", ln)]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("fastft: error: "), lines
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny local model folder (weights, config, tokenizer), as a user would have one."""
    folder = tmp_path_factory.mktemp("model")
    model, tok = tiny_setup()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def sft_data(tmp_path):
    return write_data(tmp_path, n=8)


def train_args(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--data", data, "--output", out, "--max-steps", "1",
            "--batch-size", "4", "--max-length", "32", "--no-progress", *extra]


def test_the_fixture_model_trains(capsys, model_dir, sft_data, tmp_path):
    """The harness itself: a correct run exits 0 (so the failures below are the inputs')."""
    assert main([str(a) for a in train_args(model_dir, sft_data, tmp_path / "ok")]) == 0
    assert json.loads((tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


# ---- data files ---------------------------------------------------------------------------

RECORD = b'{"prompt": "12+34=", "completion": "64 46"}\n'  # 7 prompt + 6 completion tokens


def data_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def load_data(tmp_path, path, **options):
    """The API: a Trainer reads and checks its data when it is made (nothing trains)."""
    from fastft import TrainConfig, Trainer

    from .train.helpers import count_sevens

    model, tok = tiny_setup()
    opts = dict(max_length=32, output_dir=str(tmp_path / "run"), progress=False)
    opts.update(options)
    return Trainer(model, tok, path, TrainConfig(**opts), reward_fn=count_sevens)


def test_data_not_utf8_names_file_line_and_byte(capsys, model_dir, tmp_path):
    raw = RECORD + b'{"prompt": "caf\xe9=", "completion": "1"}\n'
    p = data_file(tmp_path, "latin1.jsonl", raw)
    offset = raw.index(b"\xe9")
    one_line(capsys, train_args(model_dir, p, tmp_path / "o"), "latin1.jsonl line 2",
             f"byte offset {offset}", "0xe9", "not UTF-8")


def test_data_skip_invalid_skips_bad_json_and_bad_encoding(capsys, tmp_path):
    p = data_file(tmp_path, "d.jsonl", RECORD + b'{"prompt": "caf\xe9=", "completion": "1"}\n'
                  + b"not json\n" + b'{"x": 1}\n' + RECORD)
    t = load_data(tmp_path, p, skip_invalid=True)
    assert len(t.rows) == 2
    assert "fastft: skipped 3 invalid record(s) of data (skip_invalid)" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["jsonl inside", "empty", "truncated", "zeroed"])
def test_data_parquet_that_is_not_parquet(capsys, model_dir, tmp_path, kind):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "12+34=", "completion": "64 46"}] * 50),
                   tmp_path / "good.parquet")
    good = (tmp_path / "good.parquet").read_bytes()
    content = {"jsonl inside": RECORD, "empty": b"", "truncated": good[:len(good) // 2],
               "zeroed": good[:4] + bytes(len(good) - 8) + good[-4:]}[kind]
    p = data_file(tmp_path, "d.parquet", content)
    line = one_line(capsys, train_args(model_dir, p, tmp_path / "o"), "d.parquet")
    assert {"jsonl inside": "not a Parquet file", "empty": "is empty"}.get(
        kind, "broken or truncated Parquet file") in line, line


def test_data_json_array_is_read_as_records(capsys, tmp_path):
    rows = [{"prompt": "12+34=", "completion": "64 46"}, {"prompt": "1+2=", "completion": "3 3"}]
    arr = load_data(tmp_path, data_file(tmp_path, "d.json", json.dumps(rows, indent=1))).rows
    lines = load_data(tmp_path, data_file(tmp_path, "d.jsonl", "".join(
        json.dumps(r) + "\n" for r in rows))).rows
    assert arr == lines and len(arr) == 2


def test_data_broken_json_array(capsys, model_dir, tmp_path):
    p = data_file(tmp_path, "d.json", '[\n {"prompt": "1+1=", "completion": "2"},\n'
                  ' {"prompt": "1+2=" "completion": "3"}\n]\n')
    one_line(capsys, train_args(model_dir, p, tmp_path / "o"), "d.json line 3",
             "not valid JSON", "JSON array")


def test_data_overlong_records_are_truncated_and_counted(capsys, tmp_path):
    p = data_file(tmp_path, "d.jsonl", RECORD * 2 + b'{"prompt": "1+1=", "completion": "2"}\n'
                  + b'{"prompt": "12+34=12+34=", "completion": "64 46"}\n')
    t = load_data(tmp_path, p, max_length=10)
    out = capsys.readouterr().out
    assert "fastft: truncated 2 of 4 record(s) of data to max_length=10" in out, out
    assert "fastft: dropped 1 of 4 record(s) of data: no completion token left within " \
           "max_length=10" in out, out
    assert [len(r["input_ids"]) for r in t.rows] == [10, 10, 7]


def test_data_overlong_without_truncation_is_an_error(capsys, model_dir, tmp_path):
    p = data_file(tmp_path, "d.jsonl", RECORD)
    one_line(capsys, train_args(model_dir, p, tmp_path / "o", "--max-length", "8",
                                "--no-truncation"),
             "d.jsonl line 1", "13 tokens, longer than max_length=8", "truncation")


def test_grpo_chat_prompt_without_a_chat_template(capsys, model_dir, tmp_path):
    p = data_file(tmp_path, "chat.jsonl", json.dumps(
        {"prompt": [{"role": "user", "content": "12+34"}]}) + "\n")
    reward = data_file(tmp_path, "reward.py", "def r(prompts, completions, **kw):\n"
                       "    return [0.0] * len(completions)\n")
    one_line(capsys, train_args(model_dir, p, tmp_path / "o", "--objective", "grpo",
                                "--reward", f"{reward}:r"),
             "chat.jsonl line 1", "chat template")


def test_grpo_chat_prompt_badly_formed(tmp_path):
    p = data_file(tmp_path, "chat.jsonl", json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    with pytest.raises(FastftError, match=r"chat.jsonl line 1: a chat 'prompt' must be a list"):
        load_data(tmp_path, p, objective="grpo")


@pytest.mark.parametrize("kind,words", [
    ("folder", "is a folder"), ("empty", "is empty"), ("blank lines", "only blank lines"),
    ("empty array", "an empty JSON array")])
def test_data_file_with_no_records(capsys, model_dir, tmp_path, kind, words):
    p = tmp_path / "d.jsonl"
    if kind == "folder":
        p.mkdir()
    else:
        p.write_text({"empty": "", "blank lines": "\n  \n\n", "empty array": "[ ]\n"}[kind])
    one_line(capsys, train_args(model_dir, p, tmp_path / "o"), "d.jsonl", words)


def test_eval_data_folder(capsys, model_dir, sft_data, tmp_path):
    one_line(capsys, train_args(model_dir, sft_data, tmp_path / "o", "--eval-data", tmp_path),
             "eval_data", str(tmp_path), "is a folder")


# ---- checkpoints and run folders ----------------------------------------------------------

def ok(args):
    """Run ``fastft ARGS`` that must succeed."""
    assert main([str(a) for a in args]) == 0


def rows(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,name,how", [
    ("full", "model.safetensors", "truncated"), ("lora", "adapter/adapter_model.safetensors",
                                                 "truncated"),
    ("lora", "optimizer.safetensors", "zeroed"), ("lora", "trainer_state.json", "truncated"),
    ("lora", "rng.json", "zeroed")])
def test_resume_from_a_damaged_checkpoint(capsys, model_dir, sft_data, tmp_path, method, name,
                                          how):
    out = tmp_path / "run"
    ok(train_args(model_dir, sft_data, out, "--method", method, "--max-steps", "4",
                  "--save-every", "2"))
    f = out / "checkpoint-4" / name
    raw = f.read_bytes()
    f.write_bytes(raw[:len(raw) // 2] if how == "truncated" else bytes(len(raw)))
    one_line(capsys, train_args(model_dir, sft_data, out, "--method", method, "--max-steps", "6",
                                "--resume", out / "checkpoint-4"),
             str(f), "is damaged (truncated or corrupt", "the checkpoint is damaged",
             "pick an earlier checkpoint", str(out / "checkpoint-2"))
    from fastft import TrainConfig, Trainer

    model, tok = tiny_setup()
    with pytest.raises(FastftError, match=re.escape(f"{f} is damaged")):
        Trainer(model, tok, str(sft_data), TrainConfig(
            method=method, max_steps=6, batch_size=4, max_length=32, progress=False,
            output_dir=str(out), resume_from=str(out / "checkpoint-4")))


def test_damaged_files_outside_checkpoints_name_the_file(tmp_path):
    import fastft
    from fastft import optim
    from fastft.methods import sparse_diff

    model, _ = tiny_setup()
    opt = torch.optim.AdamW(model.parameters())
    optim.save(opt, tmp_path / "opt.safetensors")
    sparse_diff.save_sparse_diff({"w": (torch.tensor([0, 2]), torch.tensor([1.0, 2.0]))},
                                 {"w": [4]}, tmp_path / "diff.safetensors")
    fastft.prepare(model, fastft.LoRA(r=2))
    fastft.save_adapter(model, tmp_path / "adapter")
    for f in (tmp_path / "opt.safetensors", tmp_path / "diff.safetensors",
              tmp_path / "adapter" / "adapter_model.safetensors",
              tmp_path / "adapter" / "adapter_config.json"):
        f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(FastftError, match=re.escape(f"{tmp_path / 'opt.safetensors'} is damaged")):
        optim.load(opt, tmp_path / "opt.safetensors")
    with pytest.raises(FastftError, match=re.escape(f"{tmp_path / 'diff.safetensors'} is damaged")):
        sparse_diff.load_sparse_diff(tmp_path / "diff.safetensors")
    with pytest.raises(FastftError, match="adapter_config.json is damaged"):
        fastft.load_adapter(tiny_setup()[0], tmp_path / "adapter")


def test_output_that_is_a_file(capsys, model_dir, sft_data, tmp_path):
    (tmp_path / "out.txt").write_text("notes\n")
    one_line(capsys, train_args(model_dir, sft_data, tmp_path / "out.txt"),
             f"output folder {tmp_path / 'out.txt'} is an existing file, not a folder")
    assert (tmp_path / "out.txt").read_text() == "notes\n"
    from fastft import TrainConfig, Trainer

    model, tok = tiny_setup()
    with pytest.raises(FastftError, match="is an existing file, not a folder"):
        Trainer(model, tok, str(sft_data), TrainConfig(output_dir=str(tmp_path / "out.txt")))


def test_rerun_into_a_previous_run_needs_overwrite(capsys, model_dir, sft_data, tmp_path):
    out = tmp_path / "run"
    ok(train_args(model_dir, sft_data, out, "--max-steps", "2", "--save-every", "1"))
    first = (out / "metrics.jsonl").read_text()
    one_line(capsys, train_args(model_dir, sft_data, out), f"output folder {out} already holds "
             "a run", "config.json, metrics.jsonl, checkpoint-2, checkpoint-1", "--overwrite",
             "--resume")
    assert (out / "metrics.jsonl").read_text() == first  # untouched
    ok(train_args(model_dir, sft_data, out, "--overwrite"))  # one step: the old run is gone
    assert [r["step"] for r in rows(out)] == [1]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-1"]
    # any other non-empty folder too, on the command line
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    one_line(capsys, train_args(model_dir, sft_data, tmp_path / "notes"), "is not empty",
             "todo.txt", "--overwrite")
    # the API: a folder holding a run is refused unless overwrite or resume_from
    from fastft import TrainConfig, Trainer

    model, tok = tiny_setup()
    with pytest.raises(FastftError, match="already holds a run"):
        Trainer(model, tok, str(sft_data), TrainConfig(output_dir=str(out)))
    Trainer(model, tok, str(sft_data), TrainConfig(output_dir=str(out), overwrite=True))


def test_resume_in_place_keeps_one_metrics_row_per_step(model_dir, sft_data, tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "run"
    ok(train_args(model_dir, sft_data, whole, "--max-steps", "6"))
    ok(train_args(model_dir, sft_data, out, "--max-steps", "6", "--save-every", "3"))
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 7, "lo')
    ok(train_args(model_dir, sft_data, out, "--max-steps", "6", "--resume",
                  out / "checkpoint-3"))  # into the run's own folder
    got, want = rows(out), rows(whole)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, want):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"])


def test_full_checkpoint_is_a_transformers_model_folder(model_dir, sft_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastft import TrainConfig, Trainer

    model, tok = tiny_setup()  # tied input and output embeddings
    Trainer(model, tok, str(sft_data), TrainConfig(
        method="full", max_steps=2, batch_size=4, max_length=32, lr=1e-2, warmup_ratio=0.0,
        progress=False, output_dir=str(tmp_path / "run"))).train()
    ckpt = tmp_path / "run" / "checkpoint-2"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert loaded.config.use_cache
    ids = tok(["12+34=64 46", "7+8=15 51"], return_tensors="pt", padding=True)["input_ids"]
    model.cpu().eval()  # the Trainer moved it to CUDA where there is one
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not torch.equal(loaded.model.embed_tokens.weight, tiny_setup()[0].model.embed_tokens
                           .weight)  # the trained weights, not the initial ones
    assert AutoTokenizer.from_pretrained(ckpt)("1+2=")["input_ids"] == tok("1+2=")["input_ids"]
    ok(train_args(ckpt, sft_data, tmp_path / "again", "--method", "full"))  # --model checkpoint


@pytest.mark.peers
def test_lora_checkpoint_loads_in_peft_without_warnings(model_dir, sft_data, tmp_path):
    import warnings

    peft = pytest.importorskip("peft")
    import fastft
    from fastft.adapters import read_method

    out = tmp_path / "run"
    ok(train_args(model_dir, sft_data, out, "--max-steps", "2"))
    adapter = out / "checkpoint-2" / "adapter"
    assert "fastft_method" not in json.loads((adapter / "adapter_config.json").read_text())
    assert read_method(adapter) == "lora"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        peft.LoraConfig.from_pretrained(adapter)
    assert not seen, [str(w.message) for w in seen]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(tiny_setup()[0], adapter)
    # (transformers 5 itself warns that PEFT reads is_gradient_checkpointing)
    ours = [str(w.message) for w in seen if "is_gradient_checkpointing" not in str(w.message)]
    assert not ours, ours
    # an adapter of an older fastft (fastft_method inside adapter_config.json) still loads
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "fastft_method": "lora"}))
    (adapter / "fastft_adapter.json").unlink()
    assert read_method(adapter) == "lora"
    fastft.load_adapter(tiny_setup()[0], adapter)


def test_a_failed_checkpoint_write_leaves_the_earlier_one(capsys, model_dir, sft_data, tmp_path,
                                                         monkeypatch):
    from fastft import safeio
    from fastft.train import checkpoint

    real = safeio.save_file

    def disk_full(tensors, path, metadata=None):
        if "checkpoint-4" in str(path) and "optimizer" in str(path):
            raise OSError(28, "No space left on device", str(path))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safeio, "save_file", disk_full)
    out = tmp_path / "run"
    one_line(capsys, train_args(model_dir, sft_data, out, "--max-steps", "4", "--save-every",
                                "2"),
             f"could not write checkpoint {out / 'checkpoint-4'}: No space left on device",
             "the earlier checkpoints", "are intact")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "config.json",
                                                     "metrics.jsonl"]
    assert checkpoint.verify_checkpoint(out / "checkpoint-2")["state"]["step"] == 2
    monkeypatch.undo()
    ok(train_args(model_dir, sft_data, out, "--max-steps", "4", "--resume", out / "checkpoint-2"))
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()


def test_atomic_write_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    import os

    from fastft import safeio

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"),
                                                     real_replace(a, b))[1])
    safeio.save_json({"a": 1}, tmp_path / "x.json")
    assert events[:2] == ["fsync", "replace"] and events[2:] == ["fsync"]  # file, rename, folder
    assert safeio.load_json(tmp_path / "x.json") == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# ---- config, flags and the Python API -----------------------------------------------------

@pytest.mark.parametrize("fields,words", [
    (dict(lr="1e-3"), "lr must be a number; got '1e-3'"),
    (dict(max_steps=2.5), "max_steps must be an integer; got 2.5"),
    (dict(adam_betas=[0.9, 1.0]), "adam_betas must be two numbers in [0, 1)"),
    (dict(adam_betas=[0.9, "x"]), "adam_betas must be a list of numbers"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(sampling_temperature=0.0), "sampling_temperature must be > 0"),
    (dict(otr_temperature=-1.0), "otr_temperature must be > 0"),
    (dict(objective="grpo", num_generations=1), "num_generations must be >= 2"),
    (dict(bf16="yes"), "bf16 must be auto, true or false"),
    (dict(loss_type="ppo"), "loss_type must be one of grpo, bnpo, dr_grpo, dapo"),
    (dict(ltsft_proportion=0.0), "ltsft_proportion must be in (0, 1]"),
    (dict(lift_filter_rank=0), "lift_filter_rank must be >= 1"),
])
def test_train_config_rejects_wrong_values_and_types(fields, words):
    from fastft import TrainConfig

    with pytest.raises(FastftError) as info:
        TrainConfig(**fields)
    assert words in str(info.value)


def test_toml_value_of_the_wrong_type_names_the_key(capsys, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('max_steps = "two"\n')
    one_line(capsys, ["train", "--config", cfg], "run.toml", "max_steps must be an integer",
             "'two'")
    cfg.write_text("adam_betas = [0.9]\n")
    one_line(capsys, ["train", "--config", cfg], "adam_betas must be two numbers")


@pytest.mark.parametrize("flags,words", [
    (["--lr", "-1e-3"], "lr must be > 0; got -0.001"),  # a negative number parses
    (["--weight-decay", "-1"], "weight_decay must be >= 0; got -1.0"),
    (["--adam-betas", "0.9,x"], "--adam-betas '0.9,x': give two numbers"),
    (["--adam-betas", "0.9,1.5"], "adam_betas must be two numbers in [0, 1)"),
    (["--sampling-temperature", "0"], "sampling_temperature must be > 0"),
    (["--objective", "grpo", "--num-generations", "1"], "num_generations must be >= 2"),
    (["--uds-grouping", "batch"], "uds_grouping must be micro or step; got 'batch'"),
    (["--uds-start-step", "-1"], "uds_start_step must be >= 0"),
    (["--key-norm", "token"], "key_norm must be sample or step; got 'token'"),
])
def test_bad_flag_values(capsys, flags, words):
    one_line(capsys, ["train", *flags], words)


def test_masked_thought_with_the_pad_token_as_mask(capsys, model_dir, sft_data, tmp_path):
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(str(model_dir)).pad_token_id
    one_line(capsys, train_args(model_dir, sft_data, tmp_path / "r", "--masked-thought", "0.2",
                                "--mask-token-id", pad),
             f"mask_token_id={pad} is the tokenizer's pad token", "--mask-token-id")


def test_non_numeric_flag_is_argparse_usage_error(capsys):
    """argparse's own error for --lr abc: usage plus one error line, exit 2, no traceback."""
    with pytest.raises(SystemExit) as info:
        main(["train", "--lr", "abc"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "invalid float value: 'abc'" in err and "Traceback" not in err


def test_bench_op_naming_no_op(capsys, tmp_path):
    one_line(capsys, ["bench", "--suite", "losses", "--op", "crossentropy", "--out", tmp_path],
             "--op crossentropy names no op of suite losses", "cross_entropy")
    one_line(capsys, ["bench", "--suite", "losses", "--provider", "ligr", "--out", tmp_path],
             "--provider ligr names no provider of suite losses", "liger")


@pytest.mark.parametrize("name,value,words", [
    ("FASTFT_LOSS_GRAD_W_DTYPE", "fp8", ["FASTFT_LOSS_GRAD_W_DTYPE='fp8'", "fp32", "bf16"]),
    ("FASTFT_LOSS_GRAD_W_ROWS", "many", ["FASTFT_LOSS_GRAD_W_ROWS='many'", "positive integer"]),
    ("FASTFT_LOSS_CHUNK", "0", ["FASTFT_LOSS_CHUNK='0'", "positive integer"]),
])
def test_loss_head_environment_with_a_wrong_value(capsys, model_dir, sft_data, tmp_path,
                                                  monkeypatch, name, value, words):
    monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    one_line(capsys, train_args(model_dir, sft_data, out), *words)
    assert not list(out.glob("checkpoint-*"))  # stopped before the first step: nothing saved


def test_model_folder_without_a_tokenizer(capsys, tmp_path, sft_data):
    from .train.helpers import tiny_setup as setup

    folder = tmp_path / "weights-only"
    setup()[0].save_pretrained(folder)
    one_line(capsys, train_args(folder, sft_data, tmp_path / "run"), "has no tokenizer",
             "tokenizer.save_pretrained")
    assert not (tmp_path / "run").exists()  # nothing written


def test_tokenizer_without_eos_or_pad(tmp_path, sft_data):
    from fastft import TrainConfig, Trainer

    model, tok = tiny_setup()
    tok.pad_token = None
    tok.eos_token = None
    with pytest.raises(FastftError, match="neither a pad nor an eos token"):
        Trainer(model, tok, str(sft_data), TrainConfig(output_dir=str(tmp_path / "run")))


def test_prepared_method_disagrees_with_the_config(tmp_path, sft_data):
    import fastft
    from fastft import TrainConfig, Trainer

    model, tok = tiny_setup()
    fastft.prepare(model, fastft.Full())
    with pytest.raises(FastftError, match="prepared with Full .full. but TrainConfig.method is "
                       "'lora': set method='full'"):
        Trainer(model, tok, str(sft_data), TrainConfig(output_dir=str(tmp_path / "run")))


def test_method_default_too_big_for_the_model_names_the_flag(capsys, model_dir, sft_data,
                                                            tmp_path):
    one_line(capsys, train_args(model_dir, sft_data, tmp_path / "run", "--method", "lift"),
             "filter_rank 64 is above the rank", "--lift-filter-rank")


def test_reward_that_returns_nan_stops_before_the_step(tmp_path, model_dir):
    from fastft import TrainConfig, Trainer

    model, tok = tiny_setup()

    def nan_reward(prompts, completions, **_):
        return [float("nan") if i % 4 == 0 else 1.0 for i in range(len(completions))]

    cfg = TrainConfig(objective="grpo", prompts_per_step=2, num_generations=4, batch_size=8,
                      max_completion_length=4, max_steps=2, progress=False,
                      output_dir=str(tmp_path / "run"))
    trainer = Trainer(model, tok, str(write_data(tmp_path, n=4, kind="grpo")), cfg,
                      reward_fn=nan_reward)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FastftError, match=r"step 1: reward_fn returned NaN or inf for 2 of 8 "
                       "completions"):
        trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_reward_that_returns_text(tmp_path):
    from fastft import TrainConfig, Trainer

    model, tok = tiny_setup()
    cfg = TrainConfig(objective="grpo", prompts_per_step=1, num_generations=2,
                      max_completion_length=3, max_steps=1, progress=False,
                      output_dir=str(tmp_path / "run"))
    trainer = Trainer(model, tok, str(write_data(tmp_path, n=2, kind="grpo")), cfg,
                      reward_fn=lambda p, c, **_: ["good"] * len(c))
    with pytest.raises(FastftError, match="returned 'good' for completion 0: rewards must be "
                       "numbers"):
        trainer.train()


def test_non_finite_loss_stops_before_the_step_and_keeps_the_last_checkpoint(tmp_path,
                                                                              sft_data):
    from fastft import TrainConfig, Trainer

    model, tok = tiny_setup()
    cfg = TrainConfig(max_steps=4, save_every=2, batch_size=4, lr=1e-3, progress=False,
                      max_length=32, output_dir=str(tmp_path / "run"))
    trainer = Trainer(model, tok, str(sft_data), cfg)
    real = trainer._sft_step

    def poisoned(batch=None):
        metrics, n = real(batch)
        if trainer.state["step"] == 2:  # the third step's loss
            metrics["loss"] = metrics["loss"] * float("nan")
        return metrics, n

    trainer._sft_step = poisoned
    with pytest.raises(FastftError, match="step 3: the loss is nan; stopped before the "
                       "optimizer step"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]


# ---- model soups and LiNeS (fastft soup / fastft lines) -----------------------------------

def saved_model(folder, **kw):
    model, tok = tiny_setup(**kw)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_soup_of_models_with_different_shapes_names_the_tensor(capsys, model_dir, tmp_path):
    wide = saved_model(tmp_path / "wide", hidden=48)
    one_line(capsys, ["soup", model_dir, wide, "--out", tmp_path / "soup"],
             "model.embed_tokens.weight is [17, 32] in", "but [17, 48] in", str(wide),
             "one architecture and size")
    assert not (tmp_path / "soup").exists()


def test_soup_of_models_with_different_parameters_names_the_tensor(capsys, model_dir, tmp_path):
    deep = saved_model(tmp_path / "deep", layers=3)
    one_line(capsys, ["soup", model_dir, deep, "--out", tmp_path / "soup"],
             "model.layers.2.", f"is in {deep} only", "different parameters")
    assert not (tmp_path / "soup").exists()


def test_soup_of_a_run_folder_with_no_checkpoint(capsys, model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    one_line(capsys, ["soup", model_dir, run, "--out", tmp_path / "soup"],
             f"{run} holds no checkpoint (no checkpoint-N folder yet")
    one_line(capsys, ["soup", tmp_path / "nowhere", "--out", tmp_path / "soup"],
             "nowhere not found")


def test_soup_flags_that_go_together(capsys, model_dir, tmp_path, sft_data):
    one_line(capsys, ["soup", model_dir, "--out", tmp_path / "s", "--greedy"],
             "--greedy needs --eval-data FILE")
    one_line(capsys, ["soup", model_dir, "--out", tmp_path / "s", "--eval-data", sft_data],
             "--eval-data scores the models of a greedy soup: add --greedy")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    one_line(capsys, ["soup", model_dir, "--out", tmp_path / "full"],
             "already exists and is not empty")


def test_adapter_whose_base_is_not_a_local_folder(capsys, tmp_path):
    adapter = tmp_path / "ckpt" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
         "base_model_name_or_path": "org/some-model"}))
    one_line(capsys, ["soup", tmp_path / "ckpt", "--out", tmp_path / "soup"],
             "'org/some-model' (base_model_name_or_path", "give the base model's folder with "
             "--base")


def test_lines_on_a_model_with_no_layer_index(capsys, model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    flat = tmp_path / "flat"
    flat.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (flat / f.name).write_bytes(f.read_bytes())
    w = load_file(str(model_dir / "model.safetensors"))
    save_file({k: v for k, v in w.items() if ".layers." not in k},
              str(flat / "model.safetensors"))
    one_line(capsys, ["lines", "--base", flat, "--finetuned", flat, "--alpha", "0.5",
                      "--out", tmp_path / "out"], "LiNeS on a model with no layer index")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,words", [
    (["--alpha", "x"], "alpha must be a number; got 'x'"),
    (["--alpha", "0.5", "--beta", "half"], "beta must be a number; got 'half'"),
    (["--alpha", "nan"], "alpha must be a number; got 'nan'"),
    (["--alpha", "0.5", "--beta", "inf"], "beta must be a number; got 'inf'"),
])
def test_lines_alpha_and_beta_must_be_numbers(capsys, model_dir, tmp_path, flags, words):
    one_line(capsys, ["lines", "--base", model_dir, "--finetuned", model_dir, *flags,
                      "--out", tmp_path / "out"], words)
    from fastft import lines

    with pytest.raises(FastftError, match="alpha must be a number; got None"):
        lines(model_dir, model_dir, tmp_path / "out", None)
    assert not (tmp_path / "out").exists()


# ---- fastft profile ------------------------------------------------------------------------

def test_profile_folder_without_config(capsys, tmp_path):
    (tmp_path / "weights").mkdir()
    one_line(capsys, ["profile", "--model", tmp_path / "weights"], "has no config.json")


def test_profile_config_that_is_not_json(capsys, tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{model_type: llama")
    one_line(capsys, ["profile", "--model", p], "not valid JSON")


def test_profile_unknown_device(capsys, tmp_path):
    one_line(capsys, ["profile", "--model", EXAMPLE_8B, "--device", "tpu"],
             "unknown device 'tpu'", "h100")


@pytest.mark.parametrize("rho", ["0", "1.5", "x"])
def test_profile_rho_outside_its_range(capsys, rho):
    one_line(capsys, ["profile", "--model", EXAMPLE_8B, "--method", "green", "--rho", rho],
             "rho")


def test_profile_unknown_method_and_bad_fit(capsys):
    one_line(capsys, ["profile", "--model", EXAMPLE_8B, "--method", "lora,dora"],
             "unknown method 'dora'")
    one_line(capsys, ["profile", "--model", EXAMPLE_8B, "--fit", "lots"], "--fit 'lots'")
    one_line(capsys, ["profile", "--model", EXAMPLE_8B, "--batch-size", "0"], "--batch-size")


def test_train_green_rho_outside_its_range(capsys, tmp_path):
    from fastft.errors import FastftError
    from fastft.train import TrainConfig

    with pytest.raises(FastftError, match="rho must be in"):
        TrainConfig(method="green", rho=0.0).validate()
