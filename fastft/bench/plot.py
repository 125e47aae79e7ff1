"""One PNG figure per bench suite: each provider's time and peak memory as ratios to the
case's plain provider (see table.baseline_row), drawn from a results.json.

Bars are the median-time ratio; whiskers run from p20 / (plain's p80) to p80 / (plain's
p20), the widest range the two runs' quantiles allow (so they always bracket the bar).
Peak memory is measured once per case: no whisker. The y axes are logarithmic (base 2);
bars start at the plain provider's 1x (a dashed line), so a faster or smaller provider's
bar hangs below it, and each bar is labelled with its ratio. matplotlib (Agg, no display) is imported only
here, only when a figure is drawn.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

from ..errors import FastftError
from .table import baseline_row, case_key

MISSING = ("fastft: PNG figure skipped: matplotlib is not installed (pip install matplotlib, "
           "or pip install 'fastft[dev]')")


def load_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FastftError(f"no results file {path}: give the results.json that `fastft bench` "
                          "wrote")
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FastftError(f"{path} is not a bench results file (JSON): {e}") from None
    need = {"op", "provider", "params", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_bytes"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and need <= set(r)
                                             for r in rows):
        raise FastftError(f"{path} is not a bench results file: expected a list of rows with "
                          f"{', '.join(sorted(need))}")
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Per case (in the rows' order) and provider other than the plain one: time ratio
    (median, low, high) and peak ratio (None where a peak is 0) against the plain provider.
    Cases without a plain provider are left out."""
    out = []
    for r in rows:
        base = baseline_row(rows, r)
        if base is None or base is r or base["provider"] == r["provider"]:
            continue
        peak = (r["peak_bytes"] / base["peak_bytes"]
                if base["peak_bytes"] > 0 and r["peak_bytes"] > 0 else None)
        out.append(dict(case=case_key(r), op=r["op"], params=r["params"],
                        provider=r["provider"], baseline=base["provider"],
                        time=(r["median_ms"] / base["median_ms"],
                              r["p20_ms"] / base["p80_ms"], r["p80_ms"] / base["p20_ms"]),
                        peak=peak))
    return out


def _labels(items: list[dict]) -> dict[tuple, str]:
    """{case: tick label}: the op, the params that vary among that op's cases (one per
    line), the plain provider."""
    by_op: dict[str, list[dict]] = {}
    for it in items:
        by_op.setdefault(it["op"], []).append(it["params"])
    out = {}
    for it in items:
        seen = by_op[it["op"]]
        vary = [k for k in it["params"] if len({json.dumps(p.get(k)) for p in seen}) > 1]
        extra = "\n".join(f"{k}={it['params'][k]}" for k in vary)  # one line each: narrow
        out[it["case"]] = "\n".join(x for x in (it["op"], extra, f"vs {it['baseline']}") if x)
    return out


def _bars(ax, xs, values, width, color, label, err=None):
    """Bars from 1x to each value, labelled with it."""
    ax.bar(xs, [v - 1.0 for v in values], width, bottom=1.0, yerr=err, capsize=3,
           color=color, label=label)
    for x, v in zip(xs, values):
        ax.annotate(f"{v:.2f}x", (x, v), xytext=(0, 3 if v >= 1 else -3),
                    textcoords="offset points", ha="center", va="bottom" if v >= 1 else "top",
                    fontsize=7)


def draw(rows: list[dict], path: Path, title: str) -> Path:
    """Write the figure of ``rows`` (one suite) to ``path`` (PNG, replaced atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    items = ratios(rows)
    cases = list(dict.fromkeys(it["case"] for it in items))
    providers = list(dict.fromkeys(it["provider"] for it in items))
    labels = _labels(items)
    fig = Figure(figsize=(max(6.0, 1.6 * len(cases) + 2.5), 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    time_ax, peak_ax = fig.subplots(2, 1, sharex=True)
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 11)), fontsize=10)
    width = 0.8 / max(1, len(providers))
    colors = [f"C{i % 10}" for i in range(len(providers))]
    for j, provider in enumerate(providers):
        at = {it["case"]: it for it in items if it["provider"] == provider}
        xs = [i + (j - (len(providers) - 1) / 2) * width for i, c in enumerate(cases) if c in at]
        its = [at[c] for c in cases if c in at]
        med = [it["time"][0] for it in its]
        err = [[m - it["time"][1] for m, it in zip(med, its)],
               [it["time"][2] - m for m, it in zip(med, its)]]
        _bars(time_ax, xs, med, width, colors[j], provider, err)
        peaks = [(x, it["peak"]) for x, it in zip(xs, its) if it["peak"] is not None]
        if peaks:
            _bars(peak_ax, [x for x, _ in peaks], [p for _, p in peaks], width, colors[j],
                  provider)
    for ax, name in ((time_ax, "time / plain (median; p20-p80)"),
                     (peak_ax, "peak memory / plain")):
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_locator(LogLocator(base=2))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.margins(y=0.15)
        ax.set_ylabel(name)
        ax.grid(axis="y", which="major", alpha=0.3)
    if items:
        time_ax.legend(fontsize=8, loc="best")
    else:
        time_ax.text(0.5, 0.5, "no case has a plain provider to compare with",
                     transform=time_ax.transAxes, ha="center")
    peak_ax.set_xticks(range(len(cases)), [labels[c] for c in cases], fontsize=8)
    peak_ax.set_xlim(-0.7, len(cases) - 0.3)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    return path


def plot_results(results: str | Path, out_dir: str | Path | None = None, *,
                 suites: set[str] | None = None, required: bool = False,
                 echo: Callable[[str], None] = print) -> list[Path]:
    """Draw ``<suite>.png`` in ``out_dir`` (default: beside ``results``) for each suite of
    the rows in ``results`` (those of ``suites`` when given). Rows without a suite (older
    files) make one figure named after the file. Without matplotlib: one line saying so,
    and nothing drawn (``required``: a FastftError instead)."""
    rows = load_rows(results)
    results = Path(results)
    out = Path(out_dir) if out_dir is not None else results.parent
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("suite") or results.stem, []).append(r)
    if suites is not None:
        groups = {k: v for k, v in groups.items() if k in suites}
    if not groups:
        if required:
            raise FastftError(f"{results} holds no rows of suite {', '.join(sorted(suites))}")
        return []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if required:
            raise FastftError(MISSING.removeprefix("fastft: ")) from None
        echo(MISSING)
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, group in groups.items():
        devices = ", ".join(dict.fromkeys(str(r.get("device", "?")) for r in group))
        commits = list(dict.fromkeys(str(r.get("commit", "?")) for r in group))
        commit = commits[0] if len(commits) == 1 else \
            f"{commits[0]} .. {commits[-1]}, {len(commits)} commits"
        written.append(draw(group, out / f"{name}.png",
                            f"fastft bench: {name} suite on {devices} (commit {commit})"))
        echo(f"figure: {written[-1]}")
    return written
