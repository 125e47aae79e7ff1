"""The one benchmark harness: time, peak memory and FLOPs of a case, as JSON rows.

A suite (fastft/bench/suites/<name>.py) lists cases; a case builds its inputs
and returns a function that runs the measured work once. The providers of one case
(consecutive cases of one op, params and dtype, built from the same seeded inputs)
are measured together (``measure_group``): each is built, warmed up and its peak
memory taken in turn, then all are timed interleaved, round after round, so that
clock and thermal drift fall on every provider alike (``interleaved_times``):

- time: a count of timed runs, at least 25 (``MIN_REPS``), more for a fast case up to
  1.5 s of runs (and 1000), on CUDA by CUDA events (the L2 cache cleared before each
  run), with a CUDA-graph time beside it for cases under 0.5 ms (``graph_median_ms``)
  and ``recompiled`` where Triton compiled new variants while the case was timed; on
  the CPU by a monotonic clock; median, p20, p80, ``reps`` (the timed runs) and
  ``interleaved`` (the providers timed together);
- peak memory above the baseline taken once the inputs exist: on CUDA,
  ``torch.cuda.max_memory_allocated``; on CPU, each case's group runs in a fresh
  subprocess and each case reports its peak RSS (VmHWM, reset after its warm-up
  through /proc/self/clear_refs) above the RSS before its measured run;
- FLOPs by ``torch.utils.flop_counter.FlopCounterMode`` over the warm-up run;
- with ``FASTFT_BENCH_REHEARSAL=1`` (the device check's CPU rehearsal), CPU cases run in
  this process with 3 timed runs each: a check that every case runs, not a measurement
  (its rows carry ``"rehearsal": true``);
- numbers the case computes itself (the run function's ``metrics`` dict, e.g.
  ``bytes_moved`` or ``state_bytes``) join the row; with ``bytes_moved`` the row
  also gets ``gbps``, the achieved bandwidth, and with ``tokens`` (a training
  step's) ``tokens_per_s``.

Ratios (the markdown table, the PNG figure of fastft/bench/plot.py) divide by
the case's plain provider: the one its suite names in ``BASELINE`` (op ->
provider), else the first of ``table.PLAIN`` that was measured. The timing itself is in
fastft/bench/timing.py, the markdown table in fastft/bench/table.py.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .table import markdown
from .timing import (
    GRAPH_BELOW_MS,
    MAX_REPS,
    TIME_BUDGET_MS,
    _sync,
    graph_median_ms,
    interleaved_times,
    triton_cache_entries,
)

ROW_TAG = "FASTFT_ROW "


@dataclass
class Case:
    op: str
    provider: str
    params: dict
    dtype: str
    build: Callable[[], Callable[[], object]]
    available: Callable[[], str | None] = field(default=lambda: None)  # None, or why not


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _malloc(mmap_threshold: int) -> None:
    """Set glibc's mmap threshold and give freed heap memory back to the OS."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, mmap_threshold)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _note(case: Case, text: str) -> None:
    print(f"note {case.op}/{case.provider}: {text}", file=sys.stderr, flush=True)


def _counted_warmup(case: Case, fn) -> int | None:
    """The warm-up run, its FLOPs counted (None where a FLOP formula of this torch rejects
    an op: the run is repeated uncounted, so a failure of the case itself still raises)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()
    except Exception as e:  # noqa: BLE001 (a FLOP formula of this torch that rejects an op)
        fn()
        _note(case, f"FLOPs not counted ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return None


def _peak_bytes(fn, device: str) -> int:
    """Peak memory of one run of ``fn`` above what was live before it."""
    _sync(device)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # Every allocation over 128 KiB gets its own mapping, returned when freed, so that the
    # RSS follows the live tensors instead of glibc's cached heap.
    _malloc(128 << 10)
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    fn()
    peak = max(0, _rss_kib("VmHWM") - base) * 1024
    _malloc(32 << 20)  # glibc's own ceiling for its dynamic threshold: steady-state timing
    return peak


def _prepare(case: Case, device: str) -> dict:
    """Build a case and run it untimed: its FLOPs (the warm-up run) and peak memory."""
    fn = case.build()
    flops = _counted_warmup(case, fn)
    return dict(case=case, fn=fn, flops=flops, peak=_peak_bytes(fn, device))


def _row(prep: dict, times: list[float], device: str, extra_row: dict) -> dict:
    """The result row of a prepared case from its timed runs."""
    case, fn, flops = prep["case"], prep["fn"], prep["flops"]
    q = statistics.quantiles(times, n=10, method="inclusive")
    med, p20, p80 = statistics.median(times), q[1], q[7]
    row = dict(op=case.op, provider=case.provider, params=case.params, dtype=case.dtype,
               device=device_name(device), median_ms=round(med, 4), p20_ms=round(p20, 4),
               p80_ms=round(p80, 4), peak_bytes=int(prep["peak"]),
               flops=None if flops is None else int(flops),
               tflops=None if flops is None else
               round(flops / (med * 1e-3) / 1e12, 4) if med > 0 else 0.0,
               commit=commit(), reps=len(times), **extra_row)
    extra = dict(getattr(fn, "metrics", None) or {})
    if "bytes_moved" in extra and med > 0:
        extra["gbps"] = round(extra["bytes_moved"] / (med * 1e-3) / 1e9, 3)
    if "tokens" in extra and med > 0:
        extra["tokens_per_s"] = round(extra["tokens"] / (med * 1e-3), 1)
    row.update(extra)
    return row


def _time_alone(fn, device: str, **kw) -> tuple:
    """(times, probe change) of ``fn`` timed by itself, or (the exception it raised, 0)."""
    try:
        times, changes = interleaved_times([fn], device, **kw)
        return times[0], changes[0]
    except Exception as e:  # noqa: BLE001 (the case's own failure, reported on its row)
        return e.with_traceback(None), 0  # its frames hold the case's tensors


def _time_rows(preps: list[dict], device: str, *, min_seconds: float, max_reps: int):
    """Rows of prepared cases timed together (``interleaved_times``); where that fails (one
    case raising mid-run), each is timed alone so that the others keep their rows."""
    kw = dict(budget_ms=min_seconds * 1e3, max_reps=max_reps,
              probe=triton_cache_entries if device == "cuda" else None)
    together = len(preps) > 1
    try:
        results = list(zip(*interleaved_times([p["fn"] for p in preps], device, **kw)))
    except Exception:  # noqa: BLE001 (the failing case raises again alone, as its own error)
        together = False
        results = [_time_alone(p["fn"], device, **kw) for p in preps]
    rows = []
    for p, (times, recompiled) in zip(preps, results):
        if isinstance(times, Exception):
            rows.append(times)
            continue
        extra = {"interleaved": len(preps)} if together else {}
        if recompiled > 0:  # new Triton variants compiled while timed: the time includes them
            extra["recompiled"] = recompiled
            _note(p["case"], f"{recompiled} Triton kernel(s) compiled during the timed runs; "
                  "its time includes compilation")
        if device == "cuda" and statistics.median(times) < GRAPH_BELOW_MS:  # launch overhead
            extra["graph_median_ms"] = graph_median_ms(p["fn"], p["case"])
        rows.append(_row(p, times, device, extra))
    return rows


def measure_group(cases: list[Case], device: str, *, min_seconds: float = TIME_BUDGET_MS / 1e3,
                  max_reps: int = MAX_REPS) -> list[dict | Exception]:
    """Run the providers of one case (same op, params and dtype) in this process: each is
    built, warmed up (FLOPs counted) and its peak memory measured in turn, then all are timed
    interleaved. Returns a row, or the exception that case raised, per case.

    On CUDA a case that runs out of memory beside the others is measured alone after them
    (its row has no ``interleaved``). ``min_seconds``: the time budget of a fast case's runs;
    ``max_reps``: at most this many timed runs (below MIN_REPS: exactly this many)."""
    preps, out, alone = [], {}, []
    for i, case in enumerate(cases):
        try:
            preps.append(dict(_prepare(case, device), index=i))
        except torch.cuda.OutOfMemoryError as e:
            if len(cases) == 1:
                out[i] = e.with_traceback(None)  # its frames hold the case's tensors
            else:
                alone.append(i)
        except Exception as e:  # noqa: BLE001 (one failing provider must not end the case)
            out[i] = e.with_traceback(None)
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    if preps:
        rows = _time_rows(preps, device, min_seconds=min_seconds, max_reps=max_reps)
        out.update((p["index"], r) for p, r in zip(preps, rows))
    del preps
    for i in alone:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        out[i] = measure_group([cases[i]], device, min_seconds=min_seconds,
                               max_reps=max_reps)[0]
    return [out[i] for i in range(len(cases))]


def measure(case: Case, device: str, *, min_seconds: float = TIME_BUDGET_MS / 1e3,
            max_reps: int = MAX_REPS) -> dict:
    """Run one case alone in this process and return its result row (raises what it
    raised)."""
    row = measure_group([case], device, min_seconds=min_seconds, max_reps=max_reps)[0]
    if isinstance(row, Exception):
        raise row
    return row


def _suite(name: str):
    try:
        return importlib.import_module(f"fastft.bench.suites.{name}")
    except ModuleNotFoundError as e:
        from ..errors import FastftError

        raise FastftError(f"no bench suite named {name!r}; suites: {', '.join(suites())}") from e


def suite_names(name: str, device: str, field: str) -> set[str]:
    """The ``field`` ("op" or "provider") of a suite's cases: what ``--op`` / ``--provider``
    may name."""
    return {getattr(case, field) for case in _suite(name).cases(device, quick=True)}


def suites() -> list[str]:
    here = Path(__file__).parent / "suites"
    return sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_"))


def case_groups(cases: list[Case], indices: list[int]) -> list[list[int]]:
    """``indices`` split into runs of consecutive cases of one op, params and dtype: the
    providers of a case, timed together. A suite that lists a case's providers apart (a
    variant it wants measured last) gets them timed apart."""
    key = lambda c: (c.op, json.dumps(c.params, sort_keys=True), c.dtype)  # noqa: E731
    groups: list[list[int]] = []
    for i in indices:
        if groups and key(cases[groups[-1][-1]]) == key(cases[i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _measure_cases(suite: str, cases: list[Case], group: list[int], device: str,
                   quick: bool) -> list[dict | Exception]:
    """The rows (or errors) of one group of cases: with FASTFT_BENCH_REHEARSAL=1 in this
    process, 3 timed runs each (a check that every case runs, not a measurement); on the CPU
    in a fresh process (its peak RSS); on CUDA in this process."""
    if os.environ.get("FASTFT_BENCH_REHEARSAL") == "1":
        rows = measure_group([cases[i] for i in group], device, min_seconds=0.0, max_reps=3)
        return [r if isinstance(r, Exception) else dict(r, rehearsal=True) for r in rows]
    if device != "cpu":
        return measure_group([cases[i] for i in group], device)
    if len(group) > 1:
        return _run_group_in_subprocess(suite, group, device, quick)
    try:
        return [_run_in_subprocess(suite, group[0], device, quick)]
    except Exception as e:  # noqa: BLE001 (reported as the case's failure)
        return [e]


def run_suite(name: str, device: str, out_dir: str | Path, *, quick: bool = False,
              ops: set[str] | None = None, providers: set[str] | None = None,
              echo: Callable[[str], None] = print) -> list[dict]:
    """Run the cases of a suite (those of ``ops`` and ``providers`` when given), the
    providers of each case timed together (``case_groups``, ``measure_group``); write
    results.json and results.md to ``out_dir``."""
    module = _suite(name)
    cases = module.cases(device, quick=quick)
    declared = getattr(module, "BASELINE", {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for i, case in enumerate(cases):
        if ops and case.op not in ops or providers and case.provider not in providers:
            continue
        why = case.available()
        if why:
            echo(f"skip {case.op}/{case.provider}: {why}")
            continue
        todo.append(i)
    rows = []
    for group in case_groups(cases, todo):
        for i in group:
            echo(f"run  {cases[i].op}/{cases[i].provider} {cases[i].params} {cases[i].dtype}")
        try:
            results = _measure_cases(name, cases, group, device, quick)
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        done = []
        for i, row in zip(group, results):
            case = cases[i]
            if isinstance(row, Exception):  # one failing case (a peer, out of memory) must
                echo(f"FAIL {case.op}/{case.provider}: {type(row).__name__}: "  # not end it
                     f"{str(row)[-500:]}")
                continue
            row["suite"] = name
            if case.op in declared:
                row["baseline"] = declared[case.op]
            done.append(row)
        rows += done
        if done:
            _store(out, done)  # after every case: a run cut short keeps what it measured
    echo(markdown(rows))
    from .plot import plot_results

    plot_results(out / "results.json", out, suites={name}, echo=echo)
    return rows


def _store(out: Path, rows: list[dict]) -> None:
    """Merge rows into out/results.json (replacing same cases) and redraw out/results.md."""
    path = out / "results.json"
    old = json.loads(path.read_text()) if path.exists() else []
    merged = [r for r in old if not any(_same(r, n) for n in rows)] + rows
    path.write_text(json.dumps(merged, indent=1))
    (out / "results.md").write_text(markdown(merged) + "\n")


def _same(a: dict, b: dict) -> bool:
    keys = ("op", "provider", "params", "dtype", "device")
    return all(a.get(k) == b.get(k) for k in keys)


WORKER = "import sys; from fastft.bench.harness import worker_main; worker_main(sys.argv[1:])"


def worker_main(argv: list[str]) -> None:
    """The fresh process of ``_run_group_in_subprocess``: SUITE INDEX[,INDEX...] DEVICE
    [--quick]; measures those cases together and prints, per case, ROW_TAG and
    {"index", "row"} or {"index", "error"}."""
    suite, device = argv[0], argv[2]
    indices = [int(i) for i in argv[1].split(",")]
    cases = _suite(suite).cases(device, quick="--quick" in argv)
    for i, row in zip(indices, measure_group([cases[i] for i in indices], device)):
        item = {"index": i, "error": f"{type(row).__name__}: {row}"} \
            if isinstance(row, Exception) else {"index": i, "row": row}
        print(ROW_TAG + json.dumps(item), flush=True)


def _run_group_in_subprocess(suite: str, indices: list[int], device: str,
                             quick: bool) -> list[dict | Exception]:
    """The rows of the cases ``indices`` of a suite, measured together (``measure_group``)
    in a fresh process (fastft.bench.worker): a row, or the error of that case, each."""
    cmd = [sys.executable, "-c", WORKER, suite, ",".join(map(str, indices)), device]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    got = {}
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_TAG):
            item = json.loads(line[len(ROW_TAG):])
            got[item["index"]] = item
    failed = RuntimeError(f"bench cases {suite}{indices} failed:\n{proc.stderr[-3000:]}")
    return [failed if i not in got else got[i]["row"] if "row" in got[i]
            else RuntimeError(got[i]["error"]) for i in indices]


def _run_in_subprocess(suite: str, index: int, device: str, quick: bool) -> dict:
    """The row of case ``index`` of a suite, measured alone in a fresh process."""
    row = _run_group_in_subprocess(suite, [index], device, quick)[0]
    if isinstance(row, Exception):
        raise row
    return row
