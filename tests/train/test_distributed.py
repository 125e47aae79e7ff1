"""torchrun with 2 CPU processes (gloo) gives the loss and weights of 1 process, same global batch."""

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


@pytest.mark.slow
@pytest.mark.parametrize("method,fsdp", [("full", False), ("lora", False), ("full", True)],
                         ids=["ddp-full", "ddp-lora", "fsdp2-full"])
def test_two_processes_equal_one(tmp_path, method, fsdp):
    data = write_data(tmp_path, n=16)
    launch(1, data, tmp_path / "one", method, False, 4)
    launch(2, data, tmp_path / "two", method, fsdp, 2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a, b)
    name = "adapter/adapter_model.safetensors" if method == "lora" else "model.safetensors"
    w1 = load_file(str(tmp_path / "one" / "checkpoint-4" / name))
    w2 = load_file(str(tmp_path / "two" / "checkpoint-4" / name))
    assert w1.keys() == w2.keys()
    for k in w1:
        # Adam turns a last-bit difference of a ~0 gradient into a step of up to lr in
        # either direction: compare the weights as a whole, not entry by entry
        diff = (w2[k].double() - w1[k].double()).norm() / w1[k].double().norm()
        assert diff < 1e-3, (k, float(diff))
