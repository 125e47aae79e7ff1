"""The device check rehearsed on the CPU: ``bash benches/gpu_check.sh --dry-run`` runs every
step at a tiny size, in the order and with the outputs of a real run, so the script a GPU
machine runs cannot rot between the times a device is lent."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["versions", "step", "losses", "kernels", "kprof", "tests", "profile", "targets"]


@pytest.mark.slow
def test_the_dry_run_runs_every_step_and_keeps_their_json(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=str(Path(os.sys.executable)))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "benches" / "gpu_check.sh"), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert list(summary)[1:] == STEPS  # the order: the whole step first
    failed = {k: v for k, v in summary.items() if k != "dry_run" and v["exit"] != 0}
    assert not failed, (failed, proc.stdout[-3000:])
    assert proc.returncode == 0
    versions = json.loads((tmp_path / "versions.json").read_text())
    assert versions["torch"] and versions["device"] == "cpu"
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert all(r.get("rehearsal") for r in rows)  # no figures come from a rehearsal
    suites = {r["suite"] for r in rows}
    assert {"step", "losses", "lora", "quant", "sparse"} <= suites
    assert {r["op"] for r in rows if r["suite"] == "losses"} == {"cross_entropy", "grpo", "otr"}
    kprof = json.loads((tmp_path / "kprof" / "kernel_profile.json").read_text())
    assert set(kprof) == {"cross_entropy", "grpo", "otr"}
    assert all(r["kernels"] and 0 < r["kernels"][0]["share"] <= 1 for r in kprof.values())
    assert (tmp_path / "profile" / "profile_check.json").is_file()
    assert isinstance(json.loads((tmp_path / "targets.json").read_text()), list)
