"""The providers of a case are timed interleaved, round after round, with at least 25 timed
runs on the CPU as on CUDA; checked with fake providers that record when they run."""

import json
import time
from types import SimpleNamespace

import pytest
import torch

from fastft.bench import Case, harness, run_suite, timing


def recorder(log: list, name: str, seconds: float = 0.0):
    """A case build whose run function appends ``name`` to ``log`` (and sleeps)."""
    def build():
        def run():
            log.append(name)
            if seconds:
                time.sleep(seconds)
        return run
    return build


def test_providers_take_turns_with_the_first_of_each_round_rotating():
    log = []
    fns = [lambda n=n: log.append(n) for n in "abc"]
    times, changes = timing.interleaved_times(fns, "cpu", min_reps=4, budget_ms=0)
    assert [len(t) for t in times] == [4, 4, 4] and changes == [0, 0, 0]
    assert "".join(log) == "abc" + "bca" + "cab" + "abc"


def test_a_fast_provider_runs_in_blocks_spread_over_the_slow_ones_rounds():
    assert timing.rounds([3, 7]) == [[1, 2], [1, 2], [1, 3]]
    assert all(r == [1, 4] for r in timing.rounds([25, 100]))
    log = []
    slow = lambda: (log.append("s"), time.sleep(0.004))  # noqa: E731
    fast = lambda: log.append("f")  # noqa: E731
    times, _ = timing.interleaved_times([slow, fast], "cpu", budget_ms=100)
    # 4 ms: 25 runs (the floor over a 100 ms budget); the fast one fills its budget
    assert len(times[0]) == 25 and len(times[1]) > 100
    timed = "".join(log[2:])  # after each one's run that sets its count
    assert timed.count("s") == 25 and "sss" not in timed  # 40 fast runs a round
    assert timed.index("s") <= 40 and len(timed) - 1 - timed.rindex("s") <= 40


def test_cpu_cases_over_a_millisecond_get_at_least_25_timed_runs():
    log = []
    row = harness.measure(Case("x", "p", {"n": 1}, "fp32", recorder(log, "x", 0.003)), "cpu",
                          min_seconds=0.01)
    assert row["reps"] == 25 and len(log) == 1 + 1 + 1 + 25  # warm-up, peak, count, timed
    assert timing.rep_count(3.0) == 500 and timing.rep_count(2000.0) == 25
    assert timing.rep_count(0.001) == 1000 and timing.rep_count(5.0, max_reps=3) == 3


def broken_build():
    raise ValueError("broken build")


def fake_suite(log: list, broken: str | None = None):
    """Two cases of two providers each (one of them unavailable, one maybe broken)."""
    def cases(device, quick=False):
        out = []
        for n in (1, 2):
            for prov in ("fastft", "reference", "peer"):
                build = broken_build if prov == broken else recorder(log, f"{prov}{n}")
                out.append(Case("op", prov, {"n": n}, "fp32", build,
                                available=(lambda: "not here") if prov == "peer" and not broken
                                else (lambda: None)))
        return out
    return SimpleNamespace(cases=cases, BASELINE={"op": "reference"})


def test_run_suite_times_each_cases_providers_together(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_BENCH_REHEARSAL", "1")
    log, lines = [], []
    monkeypatch.setattr(harness, "_suite", lambda name: fake_suite(log))
    rows = run_suite("fake", "cpu", tmp_path, echo=lines.append)
    assert [(r["provider"], r["params"]["n"]) for r in rows] == [
        ("fastft", 1), ("reference", 1), ("fastft", 2), ("reference", 2)]
    assert all(r["interleaved"] == 2 and r["reps"] == 3 and r["baseline"] == "reference"
               for r in rows)
    # per case: each provider's warm-up and peak run, then the timed runs taking turns;
    # the second case starts once the first is done
    one = ["fastft1"] * 2 + ["reference1"] * 2 + ["fastft1", "reference1", "reference1",
                                                    "fastft1", "fastft1", "reference1"]
    assert log == one + [x.replace("1", "2") for x in one]
    assert sum(line.startswith("skip op/peer") for line in lines) == 2
    assert len(json.loads((tmp_path / "results.json").read_text())) == 4


def test_a_broken_provider_fails_alone_and_the_others_keep_their_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_BENCH_REHEARSAL", "1")
    log, lines = [], []
    monkeypatch.setattr(harness, "_suite", lambda name: fake_suite(log, broken="peer"))
    rows = run_suite("fake", "cpu", tmp_path, echo=lines.append)
    assert len(rows) == 4 and all(r["interleaved"] == 2 for r in rows)
    assert sum("FAIL op/peer: ValueError: broken build" in line for line in lines) == 2


def test_a_provider_failing_mid_timing_leaves_the_others_timed_alone():
    log = []

    def flaky():
        def run():
            log.append("flaky")
            if len([x for x in log if x == "flaky"]) > 3:  # fails in its second timed run
                raise RuntimeError("out of something")
        return run

    cases = [Case("op", "ok", {}, "fp32", recorder(log, "ok")),
             Case("op", "flaky", {}, "fp32", flaky)]
    ok, failed = harness.measure_group(cases, "cpu", min_seconds=0.0, max_reps=3)
    assert isinstance(failed, RuntimeError) and ok["reps"] == 3 and "interleaved" not in ok


def test_a_provider_out_of_memory_beside_the_others_is_measured_alone_after(monkeypatch):
    log, built = [], []

    def big():
        if "small" in built:  # does not fit while the other provider's inputs are alive
            built.remove("small")
            raise torch.OutOfMemoryError("no room beside the others")
        return recorder(log, "big")()

    def small():
        built.append("small")
        return recorder(log, "small")()

    rows = harness.measure_group([Case("op", "small", {}, "fp32", small),
                                  Case("op", "big", {}, "fp32", big)], "cpu",
                                 min_seconds=0.0, max_reps=3)
    assert [r["provider"] for r in rows] == ["small", "big"]
    assert all("interleaved" not in r and r["reps"] == 3 for r in rows)
    assert log.index("big") > max(i for i, x in enumerate(log) if x == "small")


@pytest.mark.slow
def test_a_cpu_case_group_is_measured_in_one_fresh_process(tmp_path, monkeypatch):
    """Without the rehearsal, the CPU providers of a case run together in one subprocess,
    timed interleaved with at least 25 runs each."""
    monkeypatch.delenv("FASTFT_BENCH_REHEARSAL", raising=False)
    rows = run_suite("quant", "cpu", tmp_path, quick=True, ops={"hadamard"},
                     providers={"fastft", "copy"}, echo=lambda s: None)
    assert sorted(r["provider"] for r in rows) == ["copy", "fastft"]
    assert all(r["interleaved"] == 2 and r["reps"] >= 25 and "rehearsal" not in r
               and r["peak_bytes"] >= 0 for r in rows)
