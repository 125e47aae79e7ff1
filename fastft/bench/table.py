"""The markdown table of benchmark rows, each case relative to its plain provider."""

from __future__ import annotations

import json

PLAIN = ("reference", "plain", "unfused", "dense", "dense_adamw")

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
