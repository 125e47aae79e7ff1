"""The losses bench suite: the chunk-size row runs fastft under FASTFT_LOSS_CHUNK and puts
the variable back; the GPU targets judge fastft's own row, not it."""

import importlib.util
import os
from pathlib import Path

import pytest

from fastft.bench.suites import losses
from fastft.ops import fused_linear


def test_big_chunk_row_runs_with_the_chunk_setting_and_restores_it(monkeypatch):
    monkeypatch.delenv("FASTFT_LOSS_CHUNK", raising=False)
    seen = []
    real = fused_linear.chunk_rows
    monkeypatch.setattr(fused_linear, "chunk_rows", lambda *a, **k: seen.append(real(*a, **k))
                        or seen[-1])
    losses._build("cross_entropy", losses.BIG_CHUNKS, 64, 16, 300, "fp32", "cpu", True)()
    assert seen == [1024] and "FASTFT_LOSS_CHUNK" not in os.environ
    monkeypatch.setenv("FASTFT_LOSS_CHUNK", "5")
    losses._build("cross_entropy", losses.BIG_CHUNKS, 64, 16, 300, "fp32", "cpu", True)()
    assert os.environ["FASTFT_LOSS_CHUNK"] == "5"


@pytest.mark.parametrize("device,expect", [("cpu", False), ("cuda", True)])
def test_the_row_is_a_cuda_trained_head_case_only(device, expect):
    rows = [(c.op, c.params["head"]) for c in losses.cases(device) if c.provider == losses.BIG_CHUNKS]
    assert bool(rows) == expect
    assert all(head == "train" and op in ("cross_entropy", "grpo") for op, head in rows)


def test_gpu_targets_ignore_the_row():
    path = Path(__file__).resolve().parents[2] / "benches" / "gpu_targets.py"
    spec = importlib.util.spec_from_file_location("gpu_targets", path)
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    params = dict(T=8192, H=4096, V=128256, head="train")
    rows = [dict(op="cross_entropy", provider=p, params=params, dtype="bf16", median_ms=ms,
                 peak_bytes=mb << 20)
            for p, ms, mb in (("fastft", 10.0, 10), (losses.BIG_CHUNKS, 1.0, 1000),
                              ("reference", 11.0, 100))]
    met = {v["target"]: v["met"] for v in targets.judge(rows)}
    assert met == {"peak <= 0.2x reference": True, "time <= reference": True}


@pytest.mark.parametrize("head", ["train", "frozen"])
def test_the_torch_peer_computes_fastfts_cross_entropy(monkeypatch, head):
    """torch's chunked linear_cross_entropy row: the same loss and gradients as fastft's."""
    import torch

    got = {}

    def keep(loss, *tensors):
        loss.backward()
        got[len(got)] = (loss.detach(), *[None if t.grad is None else t.grad.clone()
                                           for t in tensors])
        for t in tensors:
            t.grad = None

    monkeypatch.setattr(losses, "backward_and_clear", keep)
    for provider in ("fastft", "torch"):
        losses._build("cross_entropy", provider, 256, 32, 1000, "fp32", "cpu", head == "train")()
    (a, *ga), (b, *gb) = got[0], got[1]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    assert ("torch" in [c.provider for c in losses.cases("cpu", quick=True)
                        if c.op == "cross_entropy"])
