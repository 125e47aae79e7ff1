"""The one benchmark harness: time, peak memory and FLOPs of a case, as JSON rows.

A suite (fastft/bench/suites/<name>.py) lists cases; a case builds its inputs
and returns a function that runs the measured work once. For each case:

- time: on CUDA, CUDA events over a count of runs (at least 25, more for a fast case
  up to 1.5 s; the L2 cache cleared before each), with a CUDA-graph time beside it for
  cases under 0.5 ms (``graph_median_ms``) and ``recompiled`` where Triton compiled new
  variants while the case was timed; on CPU, a monotonic clock over repeats after a
  warm-up; median, p20, p80, and ``reps``, the number of timed runs;
- peak memory above the baseline taken once the inputs exist: on CUDA,
  ``torch.cuda.max_memory_allocated``; on CPU, each case runs in a fresh
  subprocess and reports its peak RSS (VmHWM, reset after the warm-up through
  /proc/self/clear_refs) above the RSS before the measured run;
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
provider), else the first of ``PLAIN`` that was measured.
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROW_TAG = "FASTFT_ROW "
PLAIN = ("reference", "plain", "unfused", "dense", "dense_adamw")


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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


MIN_REPS = 25  # timed runs of a CUDA case, at least
TIME_BUDGET_MS = 1500.0  # a fast case runs more often, up to this much time (and 1000 runs)
GRAPH_BELOW_MS = 0.5  # cases faster than this also get a CUDA-graph time
_FLUSH = None


def cuda_times(fn, *, min_reps: int = MIN_REPS, budget_ms: float = TIME_BUDGET_MS) -> list[float]:
    """Milliseconds of each of n timed runs of ``fn`` (CUDA events), n from a count, not a
    time: at least ``min_reps``, more for a fast case, up to ``budget_ms`` of runs; the
    L2 cache cleared (a 256 MB write, outside the timed span) before each run."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    n = int(max(min_reps, min(1000, budget_ms // one)))
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(n)]
    for a, b in marks:
        _FLUSH.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in marks]


def graph_median_ms(fn, case: Case) -> float | None:
    """The median time of ``fn`` replayed from a CUDA graph (no launch overhead), or None
    where it cannot be captured (a host sync, an allocation the graph cannot keep)."""
    import triton.testing

    try:
        return round(float(triton.testing.do_bench_cudagraph(fn, rep=100)), 4)
    except Exception as e:  # noqa: BLE001 (any capture failure: the row keeps its eager time)
        print(f"note {case.op}/{case.provider}: no CUDA-graph time ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:120] if str(e) else ''})", file=sys.stderr, flush=True)
        return None


def triton_cache_entries() -> int:
    """Compiled kernels in Triton's cache folder (one folder each): new ones while a case
    is timed mean it compiled variants mid-run."""
    root = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    try:
        return sum(1 for p in root.iterdir() if p.is_dir())
    except OSError:
        return 0


def measure(case: Case, device: str, *, min_seconds: float = 1.0, max_reps: int = 20) -> dict:
    """Run one case in this process and return its result row."""
    from torch.utils.flop_counter import FlopCounterMode

    fn = case.build()
    extra_row: dict = {}
    try:
        with FlopCounterMode(display=False) as fc:  # the warm-up run, counted
            fn()
        flops = fc.get_total_flops()
    except Exception as e:  # noqa: BLE001 (a FLOP formula of this torch that rejects an op)
        fn()  # the warm-up, uncounted: a failure of the case itself raises here
        flops = None
        print(f"note {case.op}/{case.provider}: FLOPs not counted ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:160]})", file=sys.stderr, flush=True)
    _sync(device)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        compiled = triton_cache_entries()
        times = cuda_times(fn)
        recompiled = triton_cache_entries() - compiled
        if recompiled > 0:  # new Triton variants compiled while timed: the time includes them
            extra_row["recompiled"] = recompiled
            print(f"note {case.op}/{case.provider}: {recompiled} Triton kernel(s) compiled "
                  "during the timed runs; its time includes compilation", file=sys.stderr,
                  flush=True)
        if statistics.median(times) < GRAPH_BELOW_MS:  # launch overhead is a large part
            extra_row["graph_median_ms"] = graph_median_ms(fn, case)
    else:
        # Every allocation over 128 KiB gets its own mapping, returned when freed, so
        # that the RSS follows the live tensors instead of glibc's cached heap.
        _malloc(128 << 10)
        base = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        fn()
        peak = max(0, _rss_kib("VmHWM") - base) * 1024
        _malloc(32 << 20)  # glibc's own ceiling for its dynamic threshold: steady-state timing
        times, start = [], time.perf_counter()
        while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_seconds):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    med, p20, p80 = statistics.median(times), q[1], q[7]
    extra_row["reps"] = len(times)
    row = dict(op=case.op, provider=case.provider, params=case.params, dtype=case.dtype,
               device=device_name(device), median_ms=round(med, 4), p20_ms=round(p20, 4),
               p80_ms=round(p80, 4), peak_bytes=int(peak),
               flops=None if flops is None else int(flops),
               tflops=None if flops is None else
               round(flops / (med * 1e-3) / 1e12, 4) if med > 0 else 0.0,
               commit=commit())
    row.update(extra_row)
    extra = dict(getattr(fn, "metrics", None) or {})
    if "bytes_moved" in extra and med > 0:
        extra["gbps"] = round(extra["bytes_moved"] / (med * 1e-3) / 1e9, 3)
    if "tokens" in extra and med > 0:
        extra["tokens_per_s"] = round(extra["tokens"] / (med * 1e-3), 1)
    row.update(extra)
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


def run_suite(name: str, device: str, out_dir: str | Path, *, quick: bool = False,
              ops: set[str] | None = None, providers: set[str] | None = None,
              echo: Callable[[str], None] = print) -> list[dict]:
    """Run the cases of a suite (those of ``ops`` and ``providers`` when given); write
    results.json and results.md to ``out_dir``."""
    module = _suite(name)
    cases = module.cases(device, quick=quick)
    declared = getattr(module, "BASELINE", {})
    rehearsal = os.environ.get("FASTFT_BENCH_REHEARSAL") == "1"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, case in enumerate(cases):
        if ops and case.op not in ops or providers and case.provider not in providers:
            continue
        why = case.available()
        if why:
            echo(f"skip {case.op}/{case.provider}: {why}")
            continue
        echo(f"run  {case.op}/{case.provider} {case.params} {case.dtype}")
        try:
            if rehearsal:
                row = measure(case, device, min_seconds=0.0, max_reps=3)
                row["rehearsal"] = True
            elif device == "cpu":
                row = _run_in_subprocess(name, i, device, quick)
            else:
                row = measure(case, device)
        except Exception as e:  # one failing case (a peer, out of memory) must not end the suite
            echo(f"FAIL {case.op}/{case.provider}: {type(e).__name__}: {str(e)[-500:]}")
            continue
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        row["suite"] = name
        if case.op in declared:
            row["baseline"] = declared[case.op]
        rows.append(row)
        _store(out, [row])  # after every case: a run cut short keeps what it measured
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


def _run_in_subprocess(suite: str, index: int, device: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "fastft.bench.worker", suite, str(index), device]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_TAG):
            return json.loads(line[len(ROW_TAG):])
    raise RuntimeError(f"bench case {suite}[{index}] failed:\n{proc.stderr[-3000:]}")


EXTRA_COLUMNS = ("tokens_per_s", "first_loss", "bytes_moved", "gbps", "state_bytes",
                 "ratio_to_dense")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def case_key(r: dict) -> tuple:
    """What makes rows the same case, measured by different providers."""
    return r["op"], json.dumps(r["params"], sort_keys=True), r["dtype"], r.get("device")


def baseline_row(rows: list[dict], r: dict) -> dict | None:
    """The row of ``r``'s case that its ratios divide by (its suite's plain provider)."""
    by = {x["provider"]: x for x in rows if case_key(x) == case_key(r)}
    named = r.get("baseline")
    if named is not None:
        return by.get(named)
    return next((by[p] for p in PLAIN if p in by), None)


def fmt_flops(r: dict) -> str:
    """The GFLOP and TFLOP/s cells of a row ("- | -" where its FLOPs were not counted)."""
    if r.get("flops") is None:
        return "- | -"
    return f"{r['flops'] / 1e9:.1f} | {r['tflops']:.3f}"


def markdown(rows: list[dict]) -> str:
    """A table for people: one line per row, with time and memory relative to the case's
    plain provider (see ``baseline_row``)."""
    head = ("| op | provider | params | dtype | median ms | p20-p80 ms | peak MiB | GFLOP | "
            "TFLOP/s | time / ref | peak / ref |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        base = baseline_row(rows, r)
        t = f"{r['median_ms'] / base['median_ms']:.2f}x" if base else "-"
        m = f"{r['peak_bytes'] / base['peak_bytes']:.3f}x" if base and base["peak_bytes"] else "-"
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(
            f"| {r['op']} | {r['provider']} | {params} | {r['dtype']} | {r['median_ms']:.2f} | "
            f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f} | {r['peak_bytes'] / 2**20:.1f} | "
            f"{fmt_flops(r)} | {t} | {m} |")
    extra = [k for k in EXTRA_COLUMNS if any(k in r for r in rows)]
    if extra:  # the numbers some suites compute themselves, as more columns
        lines[0] += " " + " | ".join(extra) + " |"
        lines[1] += "---|" * len(extra)
        for i, r in enumerate(rows, start=2):
            lines[i] += " " + " | ".join(_fmt(r.get(k)) for k in extra) + " |"
    device = rows[0]["device"] if rows else ""
    commit_ = rows[0]["commit"] if rows else ""
    return "\n".join(lines) + (f"\n\ndevice: {device}; commit: {commit_}; ref: each case's "
                                "plain provider")
