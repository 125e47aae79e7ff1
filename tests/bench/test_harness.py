"""The bench harness: rows carry every field, CPU peak memory is measured, tables render."""

import importlib.util
import json
import time

import pytest
import torch

from fastft.bench import Case, harness, markdown, run_suite

FIELDS = {"op", "provider", "params", "dtype", "device", "median_ms", "p20_ms", "p80_ms",
          "peak_bytes", "flops", "tflops", "commit"}


def test_measure_counts_peak_memory_and_flops_of_the_run():
    n = 2048

    def build():
        a = torch.randn(n, n)

        def run():
            b = a @ a  # 16 MiB result, plus the GEMM's FLOPs
            return float(b[0, 0])

        return run

    row = harness.measure(Case("mm", "torch", {"n": n}, "fp32", build), "cpu", min_seconds=0.0,
                          max_reps=3)
    assert FIELDS <= set(row) and row["reps"] == 3
    assert row["flops"] == 2 * n**3
    assert 15 * 2**20 <= row["peak_bytes"] <= 64 * 2**20
    assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]


def test_losses_suite_writes_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_BENCH_REHEARSAL", "1")  # in this process, 3 timed runs each
    rows = run_suite("losses", "cpu", tmp_path, quick=True, ops={"cross_entropy"},
                     echo=lambda s: None)
    stored = json.loads((tmp_path / "results.json").read_text())
    peers = {"trl"} if importlib.util.find_spec("trl") else set()  # TRL's fused LM head
    peers.add("torch")  # torch's chunked linear_cross_entropy
    assert stored == rows and {r["provider"] for r in rows} == {"fastft", "reference", *peers}
    for r in rows:  # torch's chunked op is opaque to FlopCounterMode: its count is 0
        assert FIELDS <= set(r) and r["peak_bytes"] > 0
        assert r["interleaved"] == len(rows) // 2 and r["reps"] == 3 and r["rehearsal"]
        assert r["flops"] > 0 or r["provider"] == "torch"
    by = {r["provider"]: r for r in rows}
    # the fused loss never holds the [T, V] logits: far below the reference's peak
    assert by["fastft"]["peak_bytes"] < 0.25 * by["reference"]["peak_bytes"]
    assert by["fastft"]["flops"] == by["reference"]["flops"]
    md = (tmp_path / "results.md").read_text()
    assert "| cross_entropy | fastft |" in md and "peak / ref" in md


def test_the_provider_filter_runs_only_those_providers(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_BENCH_REHEARSAL", "1")
    rows = run_suite("losses", "cpu", tmp_path, quick=True, ops={"cross_entropy"},
                     providers={"fastft", "reference"}, echo=lambda s: None)
    assert sorted(r["provider"] for r in rows) == ["fastft", "fastft", "reference", "reference"]


def test_markdown_ratios():
    base = dict(op="x", params={"T": 1}, dtype="fp32", device="d", p20_ms=1, p80_ms=1, flops=0,
                tflops=0, commit="c")
    rows = [dict(base, provider="reference", median_ms=4.0, peak_bytes=400),
            dict(base, provider="fastft", median_ms=2.0, peak_bytes=100)]
    table = markdown(rows)
    assert "| 0.50x | 0.250x |" in table


def test_a_flop_formula_that_rejects_an_op_leaves_the_row_timed_without_flops(monkeypatch):
    """torch 2.11's attention formula rejects grouped-query shapes and its addmm formula
    TRL's in-place call: the case is still timed and measured, its FLOPs left empty."""
    import torch.utils.flop_counter as fcm

    def rejecting(*args, **kwargs):
        raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")

    monkeypatch.setitem(fcm.flop_registry, torch.ops.aten.mm, rejecting)
    calls = []

    def build():
        a = torch.randn(32, 32)
        return lambda: calls.append(a @ a)

    row = harness.measure(Case("mm", "torch", {"n": 32}, "fp32", build), "cpu",
                          min_seconds=0.0, max_reps=3)
    assert row["flops"] is None and row["tflops"] is None and row["median_ms"] > 0
    assert len(calls) == 1 + 1 + 3  # the uncounted warm-up, the peak run, three timed runs
    assert "| - | - |" in markdown([row])


def test_a_case_that_fails_still_fails_when_its_flops_cannot_be_counted(monkeypatch):
    import torch.utils.flop_counter as fcm

    def rejecting(*args, **kwargs):
        raise AssertionError("no formula")

    monkeypatch.setitem(fcm.flop_registry, torch.ops.aten.mm, rejecting)

    def build():
        def fn():
            torch.ones(2, 2) @ torch.ones(2, 2)
            raise ValueError("the case itself is broken")
        return fn

    with pytest.raises(ValueError, match="itself is broken"):
        harness.measure(Case("mm", "torch", {}, "fp32", build), "cpu", min_seconds=0.0)


class FakeEvent:
    """torch.cuda.Event on the host clock: the CUDA timing loop, checked on the CPU."""

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_cuda_times_counts_runs_not_time(monkeypatch):
    from fastft.bench import timing

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(timing, "_FLUSH", torch.empty(4))
    calls = []

    def slow():  # 20 ms: the budget allows 5 runs, the floor asks 25
        calls.append(1)
        time.sleep(0.02)

    times = timing.cuda_times(slow, budget_ms=100)
    assert len(times) == 25 and len(calls) == 3 + 1 + 25
    assert all(19 <= t <= 200 for t in times)
    calls.clear()
    times = timing.cuda_times(lambda: calls.append(1), budget_ms=100)  # fast: up to 1000 runs
    assert len(times) == 1000


def test_recompiles_are_counted_from_tritons_cache(monkeypatch, tmp_path):
    from fastft.bench import timing

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    before = timing.triton_cache_entries()
    (tmp_path / "A1B2").mkdir()
    (tmp_path / "C3D4").mkdir()
    (tmp_path / "stray.txt").write_text("")
    assert (before, timing.triton_cache_entries()) == (0, 2)
