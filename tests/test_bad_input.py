"""Every mistake a user can make: one clear line, exit 2, never a traceback; nothing half-saved.

Each case runs the command line in process (``fastft.cli.main``) or the Python API,
and checks the message names the problem. The table in the closing notes of the
project comes from these cases; add one here for every new user-facing input.
"""

import json

import pytest

from fastft.cli import main
from fastft.errors import FastftError

from .train.helpers import tiny_setup, write_data


def one_line(capsys, args, *words):
    """Run ``fastft ARGS``: exit 2 and a single ``fastft: error:`` line naming ``words``."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
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


# ---- checkpoints and run folders ----------------------------------------------------------


# ---- config, flags and the Python API -----------------------------------------------------

def test_api_errors_are_fastft_errors():
    """(placeholder removed when the section has cases)"""
    with pytest.raises(FastftError):
        from fastft import TrainConfig

        TrainConfig(objective="ppo")
