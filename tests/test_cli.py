"""The command line: user errors are one line and a non-zero exit, never a traceback."""

import os
import subprocess
import sys

from fastft.cli import main


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fastft.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_info_lists_versions_and_each_op_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "triton", "transformers", "fastft::linear_cross_entropy"):
        assert word in out
    assert "cuda (none here)" in out or "cuda" in out


def test_unknown_suite_is_one_line_and_exit_2():
    proc = run("bench", "--suite", "nope")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip()] and proc.stderr.startswith("fastft: error: no bench suite named")
    assert "Traceback" not in proc.stderr


def test_bad_backend_env_and_debug_flag_shows_traceback():
    env_run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "fastft.cli", *a], capture_output=True, text=True,
        env=dict(os.environ, FASTFT_BACKEND="nope"), timeout=300)
    proc = env_run("info")
    assert proc.returncode == 2 and "not a backend" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = env_run("--debug", "info")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_bad_arch():
    proc = run("check-kernels", "--arch", "sm_75")
    assert proc.returncode == 2 and "unknown arch 'sm_75'" in proc.stderr


def test_check_kernels_json_into_a_missing_folder_is_refused_before_compiling(tmp_path):
    proc = run("check-kernels", "--json", str(tmp_path / "nope" / "rows.json"))
    one_line_error(proc, "does not exist")


def one_line_error(proc, words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastft: error: ") and words in lines[0], lines


def test_train_errors_are_one_line(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text('learning_rate = 0.1\n')
    one_line_error(run("train", "--model", str(model), "--data", str(tmp_path / "none.jsonl")),
                   "none.jsonl not found")
    one_line_error(run("train", "--config", str(cfg)), "unknown key(s) learning_rate")
    one_line_error(run("train", "--objective", "ppo"), "objective must be one of sft, grpo")
    one_line_error(run("train", "--model", str(model), "--data", str(data)),
                   "has no model weights")
    one_line_error(run("train", "--model", str(tmp_path / "nope"), "--data", str(data)),
                   "not found")


def test_train_help_documents_every_option():
    import dataclasses

    from fastft.recipe import TrainConfig

    out = run("train", "--help").stdout
    for f in dataclasses.fields(TrainConfig):
        flag = {"output_dir": "--output", "resume_from": "--resume"}.get(f.name,
                                                                          "--" + f.name.replace("_", "-"))
        assert flag in out, flag


def test_toml_paths_are_relative_to_the_file_and_rewards_import_from_the_cwd(tmp_path,
                                                                            monkeypatch):
    import sys as _sys

    from fastft.train.cli import load_reward

    from .train.helpers import tiny_setup, write_data

    project = tmp_path / "project"
    model, tok = tiny_setup()
    model.save_pretrained(project / "model")
    tok.save_pretrained(project / "model")
    write_data(project, n=4)
    (project / "run.toml").write_text('model = "model"\ndata = "sft.jsonl"\noutput_dir = "runs/a"\n'
                                      "max_steps = 1\nbatch_size = 4\nmax_length = 32\n"
                                      "progress = false\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--config", str(project / "run.toml")]) == 0
    assert (project / "runs" / "a" / "metrics.jsonl").is_file()
    # module:function and file.py:function, both from the working directory
    (elsewhere / "my_rewards.py").write_text("def score(p, c, **_):\n    return [1.0] * len(c)\n")
    assert load_reward("my_rewards:score")([], ["x", "y"]) == [1.0, 1.0]
    assert load_reward("my_rewards.py:score")([], ["x"]) == [1.0]
    assert str(elsewhere) not in _sys.path  # the path is not left changed
