"""torchrun with 2 CPU processes (gloo) gives the loss and weights of 1 process, same global batch.

Every method: LoRA, LoRA-SB and full fine-tuning run under DDP; the sparse methods
(LIFT, HFT, LT-SFT) and GreenTrainer (whose selection changes which tensors need a
gradient) average their gradients themselves, after the last micro-batch (the sparse
optimizers take gradients in hooks that run before DDP's all-reduce would).
The ranks must end bit-identical.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .helpers import read_metrics, write_data

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc, data, out, method, fsdp, batch):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1",
           str(ROOT / "tests" / "train" / "ddp_script.py"), str(data), str(out), method,
           "1" if fsdp else "0", str(batch)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def relative_difference(a: dict, b: dict) -> float:
    """max over tensors of ||a - b|| / ||a||."""
    assert a.keys() == b.keys()
    return max(float((b[k].double() - a[k].double()).norm() / a[k].double().norm().clamp(min=1e-30))
               for k in a)


# 8 rows, global batch 4, 4 steps: two epochs (HFT re-draws its half at the second);
# uds: 16 rows, 8 candidates a step in two groups of 4 (1 process x 2 micro-batches of 2,
# or 2 processes x 1)
@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "lora-sb", "full", "lift", "hft", "ltsft", "green",
                                    "uds"])
def test_ddp_two_processes_equal_one(tmp_path, method):
    data = write_data(tmp_path, n=16 if method == "uds" else 8)
    launch(1, data, tmp_path / "one", method, False, 2 if method == "uds" else 4)
    launch(2, data, tmp_path / "two", method, False, 2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    steps = 8 if method == "ltsft" else 4  # LT-SFT: a full phase, then a sparse one
    assert len(one) == len(two) == steps
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
    w1 = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "rank0.safetensors"))
    w2b = load_file(str(tmp_path / "two" / "rank1.safetensors"))
    diff = relative_difference(w1, w2)
    print(f"{method}: max relative weight difference 2 processes vs 1 = {diff:.2e}")
    assert diff < 1e-5, (method, diff)
    assert all(bool((w2[k] == w2b[k]).all()) for k in w2), "the ranks drifted apart"


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one(tmp_path):
    data = write_data(tmp_path, n=16)
    launch(1, data, tmp_path / "one", "full", False, 4)
    launch(2, data, tmp_path / "two", "full", True, 2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
    w1 = load_file(str(tmp_path / "one" / "checkpoint-4" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "checkpoint-4" / "model.safetensors"))
    assert relative_difference(w1, w2) < 1e-5


@pytest.mark.slow
def test_green_selects_alike_on_every_rank_when_their_batches_differ_in_length(tmp_path):
    """GreenTrainer measures its tensors' costs on the step's batch shape. Rows of eight
    different lengths give the two ranks first batches of different padded lengths; the
    ranks must still select the same tensors (else the gradient all-reduce fails, or
    averages different tensors) and equal the single process on the same global batch."""
    import json

    data = write_data(tmp_path, n=8)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["completion"] += " " + "7" * (4 * i)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    launch(1, data, tmp_path / "one", "green", False, 4)
    launch(2, data, tmp_path / "two", "green", False, 2)
    w1 = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "rank0.safetensors"))
    w2b = load_file(str(tmp_path / "two" / "rank1.safetensors"))
    assert all(bool((w2[k] == w2b[k]).all()) for k in w2), "the ranks drifted apart"
    assert relative_difference(w1, w2) < 1e-5
