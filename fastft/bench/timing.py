"""Timed runs of benchmark cases: counts of runs, providers interleaved, CUDA events.

fastft/bench/harness.py measures cases with these: ``interleaved_times`` runs the
providers of one case round after round (``rounds``), each a count of runs set by its
speed (``rep_count``), timed by CUDA events with the L2 cleared before each run, or by
the CPU's monotonic clock.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


MIN_REPS = 25  # timed runs of a case, at least (CUDA and CPU)
TIME_BUDGET_MS = 1500.0  # a fast case runs more often, up to this much time (and 1000 runs)
MAX_REPS = 1000
GRAPH_BELOW_MS = 0.5  # cases faster than this also get a CUDA-graph time
WARMUPS = {"cuda": 3, "cpu": 0}  # untimed runs before timing (CPU: measure's runs suffice)
_FLUSH = None


def rep_count(one_ms: float | None, *, min_reps: int = MIN_REPS,
              budget_ms: float = TIME_BUDGET_MS, max_reps: int = MAX_REPS) -> int:
    """Timed runs of a case that took ``one_ms`` once: at least ``min_reps``, more for a fast
    case, up to ``budget_ms`` of runs, never over ``max_reps`` (which wins over the floor:
    a rehearsal's 3). A count, not a time, so that every provider gets its full count."""
    fill = int(budget_ms // max(one_ms, 1e-3)) if one_ms is not None else 0
    return int(min(max_reps, max(min_reps, fill)))


def rounds(counts: list[int]) -> list[list[int]]:
    """The interleaving of timed runs: per round, how many consecutive runs each provider
    does. There are as many rounds as the fewest runs asked, each provider's runs spread
    evenly over them, so a fast provider runs a block of several runs where a slow one runs
    one, and all of them span the same stretch of time."""
    n = max(1, min(counts))
    return [[c * (r + 1) // n - c * r // n for c in counts] for r in range(n)]


def _cuda_run(fn):
    """One timed run of ``fn`` between CUDA events, the L2 cache cleared (a 256 MB write,
    outside the timed span) before it; returns a function giving its milliseconds once the
    device has synchronised."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _FLUSH.zero_()
    a.record()
    fn()
    b.record()
    return lambda: a.elapsed_time(b)


def _cpu_run(fn):
    """One timed run of ``fn`` on the monotonic clock; returns a function giving its ms."""
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return lambda: ms


def interleaved_times(fns: list, device: str, *, min_reps: int = MIN_REPS,
                      budget_ms: float = TIME_BUDGET_MS, max_reps: int = MAX_REPS,
                      probe: Callable[[], int] | None = None):
    """Milliseconds of each timed run of each of ``fns`` (the providers of one case), their
    runs interleaved: round after round, each provider runs its block (``rounds``), the
    first provider of a round rotating, so that clock and thermal drift fall on all alike.

    Each fn gets ``WARMUPS[device]`` untimed runs, then, where its count depends on its
    speed, one run that sets it (``rep_count``). ``probe`` (e.g. ``triton_cache_entries``)
    is read before and after each block: returns (times per fn, the sum of each fn's
    probe changes)."""
    run = _cuda_run if device == "cuda" else _cpu_run
    counts = []
    for fn in fns:
        for _ in range(WARMUPS.get(device, 0)):
            fn()
        one = None
        if budget_ms > 0 and max_reps > min_reps:
            _sync(device)
            first = run(fn)
            _sync(device)
            one = first()
        counts.append(rep_count(one, min_reps=min_reps, budget_ms=budget_ms,
                                max_reps=max_reps))
    pending, changes = [[] for _ in fns], [0] * len(fns)
    for r, blocks in enumerate(rounds(counts)):
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            before = probe() if probe else 0
            pending[i] += [run(fns[i]) for _ in range(blocks[i])]
            changes[i] += (probe() - before) if probe else 0
    _sync(device)
    return [[t() for t in p] for p in pending], changes


def cuda_times(fn, *, min_reps: int = MIN_REPS, budget_ms: float = TIME_BUDGET_MS) -> list[float]:
    """Milliseconds of each of n timed runs of ``fn`` alone (CUDA events), n from a count,
    not a time (``rep_count``)."""
    return interleaved_times([fn], "cuda", min_reps=min_reps, budget_ms=budget_ms)[0][0]


def graph_median_ms(fn, case) -> float | None:
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
