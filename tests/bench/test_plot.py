"""The suites' PNG figures: ratios to each case's plain provider, drawn from a results JSON,
and ``fastft bench --plot`` redrawing them from the command line."""

import json
import struct
import sys

import pytest

from fastft.bench import markdown, plot
from fastft.cli import main

BASE = dict(dtype="fp32", device="Test CPU (2 cores)", flops=0, tflops=0.0, commit="abc1234")


def row(op, provider, med, p20, p80, peak, suite="demo", params=None, **extra):
    return dict(BASE, op=op, provider=provider, params=params or {"n": 1}, median_ms=med,
                p20_ms=p20, p80_ms=p80, peak_bytes=peak, suite=suite, **extra)


ROWS = [
    # a case whose plain provider is found by name ("reference")
    row("loss", "reference", 4.0, 3.0, 5.0, 400),
    row("loss", "fastft", 2.0, 1.5, 2.5, 100),
    row("loss", "fastft", 8.0, 8.0, 8.0, 800, params={"n": 2}),
    row("loss", "reference", 4.0, 4.0, 4.0, 0, params={"n": 2}),  # no peak measured
    # a case whose suite names its plain provider (and a third provider)
    row("step", "transformers", 10.0, 9.0, 11.0, 1000, baseline="transformers"),
    row("step", "fastft", 5.0, 4.0, 6.0, 300, baseline="transformers"),
    row("step", "peer", 20.0, 20.0, 20.0, 2000, baseline="transformers"),
    # a case with no plain provider: not in the figure
    row("alone", "fastft", 1.0, 1.0, 1.0, 10),
    # another suite's row in the same file
    row("loss", "fastft", 1.0, 1.0, 1.0, 1, suite="other"),
    row("loss", "reference", 2.0, 2.0, 2.0, 1, suite="other"),
]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_ratios_to_the_plain_provider_with_quantile_whiskers():
    demo = [r for r in ROWS if r["suite"] == "demo"]
    got = {(r["op"], r["params"]["n"], r["provider"]): r for r in plot.ratios(demo)}
    assert set(got) == {("loss", 1, "fastft"), ("loss", 2, "fastft"), ("step", 1, "fastft"),
                        ("step", 1, "peer")}
    fast = got["loss", 1, "fastft"]
    assert fast["baseline"] == "reference"
    # median ratio, then p20 / plain's p80 and p80 / plain's p20
    assert fast["time"] == pytest.approx((0.5, 1.5 / 5.0, 2.5 / 3.0))
    assert fast["peak"] == pytest.approx(0.25)
    assert got["loss", 2, "fastft"]["peak"] is None  # the plain provider's peak is 0
    assert got["step", 1, "fastft"]["baseline"] == "transformers"
    assert got["step", 1, "fastft"]["time"] == pytest.approx((0.5, 4 / 11, 6 / 9))
    assert got["step", 1, "peer"]["peak"] == pytest.approx(2.0)
    for it in got.values():  # the whiskers bracket the bar
        assert it["time"][1] <= it["time"][0] <= it["time"][2]


def test_markdown_divides_by_the_plain_provider_the_suite_names():
    table = markdown([r for r in ROWS if r["op"] == "step"])
    lines = {ln.split("|")[2].strip(): ln for ln in table.splitlines() if ln.startswith("| step")}
    assert "| 0.50x | 0.300x |" in lines["fastft"]
    assert "| 2.00x | 2.000x |" in lines["peer"]
    assert "| 1.00x | 1.000x |" in lines["transformers"]


def test_one_figure_per_suite_beside_the_json(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(ROWS))
    lines = []
    written = plot.plot_results(path, echo=lines.append)
    assert sorted(p.name for p in written) == ["demo.png", "other.png"]
    assert all(p.parent == tmp_path for p in written)
    w, h = png_size(tmp_path / "demo.png")
    assert w > 600 and h > 600
    assert lines == [f"figure: {p}" for p in written]
    assert not list(tmp_path.glob("*.tmp"))
    # only the suites asked for
    assert [p.name for p in plot.plot_results(path, tmp_path / "x", suites={"other"},
                                              echo=lines.append)] == ["other.png"]


def test_rows_without_a_suite_make_one_figure_named_after_the_file(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps([{k: v for k, v in r.items() if k != "suite"}
                                for r in ROWS[:2]]))
    assert [p.name for p in plot.plot_results(path, echo=lambda s: None)] == ["old.png"]


def test_cli_redraws_the_figures_from_a_stored_json(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(ROWS))
    assert main(["bench", "--plot", str(path), "--out", str(tmp_path / "figs")]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["demo.png", "other.png"]
    assert "figure:" in capsys.readouterr().out
    assert main(["bench", "--plot", str(path), "--suite", "demo"]) == 0  # beside the JSON
    assert (tmp_path / "demo.png").exists() and not (tmp_path / "other.png").exists()


def one_error_line(capsys, args):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastft: error: ") and "Traceback" not in err[0]
    return err[0]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert "no results file" in one_error_line(capsys, ["bench", "--plot", str(tmp_path / "x")])
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "rows"}')
    assert "not a bench results file" in one_error_line(capsys, ["bench", "--plot", str(bad)])
    assert "--suite" in one_error_line(capsys, ["bench"])
    line = one_error_line(capsys, ["bench", "--suite", "losses,nope", "--out", str(tmp_path)])
    assert "no bench suite named nope" in line and "step" in line  # the list names every suite


def test_without_matplotlib_the_suite_goes_on_with_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(ROWS))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    lines = []
    assert plot.plot_results(path, echo=lines.append) == []
    assert len(lines) == 1 and "skipped" in lines[0] and "pip install matplotlib" in lines[0]
    assert not list(tmp_path.glob("*.png"))
    # asked for explicitly, the figure's absence is the error
    assert "matplotlib is not installed" in one_error_line(capsys, ["bench", "--plot", str(path)])
