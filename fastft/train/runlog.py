"""What a run reports: a metrics JSONL line per logged step, a progress bar, a summary table.

A resumed run first drops the rows past its checkpoint (``RunLog.keep_until``), so
``metrics.jsonl`` holds one row per logged step however often the run was resumed.
"""

from __future__ import annotations

import io
import json
import resource
import sys
import time
from pathlib import Path

import torch

from ..safeio import save_text


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RunLog:
    """Appends metrics to ``metrics.jsonl`` and shows progress (main process only)."""

    def __init__(self, folder: Path, total: int, *, enabled: bool, progress: bool, title: str):
        self.enabled = enabled
        self.path = Path(folder) / "metrics.jsonl"
        self.total, self.title = total, title
        self.bar = None
        self.t0 = time.perf_counter()
        if enabled and progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), transient=False,
                                disable=not sys.stderr.isatty() and not sys.stdout.isatty())
            self.task = self.bar.add_task(title, total=total, info="")
            self.bar.start()

    def keep_until(self, phase: int, step: int, phases: list[str]) -> int:
        """Drop the rows logged after step ``step`` of phase ``phases[phase]``: a run resumed
        from that point logs them again, so each step keeps one row. A line cut short by a
        crash goes too. Returns how many rows were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        order = {name: i for i, name in enumerate(phases)}
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                at = (order.get(row.get("phase", "train"), 0), int(row["step"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                at = None
            if at is not None and at <= (phase, step):
                kept.append(line + "\n")
            elif line.strip():
                dropped += 1
        if dropped:
            save_text("".join(kept), self.path)
        return dropped

    def step(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            info = " ".join(f"{k}={v:.4g}" for k, v in record.items()
                            if k in ("loss", "reward_mean", "lr") and isinstance(v, float))
            self.bar.update(self.task, completed=step, info=info)

    def note(self, text: str) -> None:
        """What the step is doing now (sampling, scoring), shown beside the bar."""
        if self.bar is not None:
            self.bar.update(self.task, info=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def progress(items, description: str, *, enabled: bool):
    """``items`` with a transient progress bar (a long evaluation), when ``enabled`` and
    there is a terminal."""
    if not enabled or not (sys.stderr.isatty() or sys.stdout.isatty()):
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)


def summary_table(title: str, rows: dict) -> str:
    """A two-column table, printed with rich when there is a terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    buf = io.StringIO()
    Console(file=buf, width=100).print(table)
    return buf.getvalue()
