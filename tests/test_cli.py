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
