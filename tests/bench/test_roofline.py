"""The roofline of benches/gpu_targets.py on a synthetic results.json: the op's minimal
bytes and FLOPs, the achieved rates, and the share of the bound on the device's peaks."""

import importlib.util
import json
from pathlib import Path

import pytest

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture(scope="module")
def targets():
    path = Path(__file__).resolve().parents[2] / "benches" / "gpu_targets.py"
    spec = importlib.util.spec_from_file_location("gpu_targets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(op, provider, params, ms, dtype="bf16", device=H100, **extra):
    return dict(op=op, provider=provider, params=params, dtype=dtype, device=device,
                median_ms=ms, **extra)


def test_device_peaks_by_name(targets):
    assert targets.device_peaks(H100)["hbm"] == 3.35e12
    assert targets.device_peaks("NVIDIA H200")["hbm"] == 4.8e12
    assert targets.device_peaks("NVIDIA H200")["tensor"] == targets.device_peaks(H100)["tensor"]
    assert targets.device_peaks("NVIDIA H100 PCIe")["hbm"] == 2.0e12
    assert targets.device_peaks("AMD EPYC (2 cores)") is None


def test_a_memory_bound_row_against_the_sheet_and_a_measured_copy(targets):
    n_bytes = 2 * 8192 * 4096 * 2  # one read and one write of x [8192, 4096] in bf16
    rows = [row("hadamard", "fastft", dict(rows=8192, n=4096), 0.05),
            row("hadamard", "copy", dict(rows=8192, n=4096), 0.045, bytes_moved=n_bytes,
                gbps=n_bytes / 0.045e-3 / 1e9)]
    by = {r["provider"]: r for r in targets.roofline(rows)}
    ours = by["fastft"]
    assert ours["bytes"] == n_bytes and ours["bound"] == "memory"
    assert ours["gbps"] == pytest.approx(n_bytes / 0.05e-3 / 1e9)
    assert ours["pct"] == pytest.approx(100 * n_bytes / 3.35e12 / 0.05e-3)  # 80.1%
    assert ours["pct_copy"] == pytest.approx(90.0)  # the copy's 2.98 TB/s: 0.045 / 0.05
    assert by["copy"]["pct_copy"] == pytest.approx(100.0)
    assert "80.1% of memory roofline" in targets.format_roofline(ours)


def test_compute_bound_gemms_and_the_loss_head(targets):
    lora = dict(T=8192, n_in=4096, n_out=4096, r=16)
    flops = 4 * 8192 * 4096 * 4096 + 6 * 8192 * 16 * 8192
    head = dict(T=8192, H=4096, V=128256, head="train")
    rows = [row("lora_linear", "fastft", lora, 1.5),
            row("cross_entropy", "fastft", head, 40.0, device="NVIDIA H200"),
            row("cross_entropy", "fastft", dict(head, head="frozen"), 30.0,
                device="NVIDIA H200")]
    lines = targets.roofline(rows)
    assert lines[0]["flops"] == flops and lines[0]["bound"] == "compute"
    assert lines[0]["tflops"] == pytest.approx(flops / 1.5e-3 / 1e12)
    assert lines[0]["pct"] == pytest.approx(100 * flops / 989e12 / 1.5e-3)  # 37.5%
    train, frozen = lines[1], lines[2]
    assert train["flops"] == 6 * 8192 * 128256 * 4096 and train["peak"] == "H200"
    assert frozen["flops"] == 4 * 8192 * 128256 * 4096
    assert frozen["bytes"] == 2 * (2 * 8192 * 4096 + 128256 * 4096) + 8 * 8192


def test_ops_without_a_formula_take_the_least_any_provider_did(targets):
    """A sparse step: the fewest DRAM bytes a provider reports moving; a training step: the
    fewest FLOPs counted; optimizer state (nothing timed) and unknown devices: no bound."""
    sp = dict(model="llama-3-8b x2 layers", density=0.05)
    step = dict(hidden=4096, layers=2, batch=4, seq=2048)
    rows = [row("sparse_adamw_step", "fastft", sp, 2.0, bytes_moved=4e9, gbps=2000.0),
            row("sparse_adamw_step", "dense_adamw", sp, 9.0, bytes_moved=30e9, gbps=3333.0),
            row("lora_sft", "fastft", step, 500.0, flops=3e14),
            row("lora_sft", "transformers+peft", step, 700.0, flops=3.2e14),
            row("optimizer_state", "lift", dict(model="tiny-llama"), 0.001, state_bytes=10),
            row("hadamard", "fastft", dict(rows=256, n=1024), 0.2, dtype="fp32",
                device="AMD EPYC (2 cores)")]
    lines = {(r["op"], r["provider"]): r for r in targets.roofline(rows)}
    assert lines[("sparse_adamw_step", "dense_adamw")]["bytes"] == 4e9
    assert lines[("sparse_adamw_step", "fastft")]["pct"] == pytest.approx(
        100 * 4e9 / 3.35e12 / 2e-3)
    assert lines[("lora_sft", "transformers+peft")]["flops"] == 3e14
    assert lines[("lora_sft", "fastft")]["bound"] == "compute"
    assert ("optimizer_state", "lift") not in lines
    cpu = lines[("hadamard", "fastft")]
    assert "pct" not in cpu and cpu["gbps"] == pytest.approx(2 * 256 * 1024 * 4 / 0.2e-3 / 1e9)
    assert "no peaks known" in targets.format_roofline(cpu)


def test_main_prints_the_roofline_and_stores_it_beside_the_verdicts(targets, tmp_path,
                                                                      capsys):
    rows = [row("hadamard", p, dict(rows=8192, n=4096), ms) for p, ms in
            (("fastft", 0.05), ("copy", 0.045))]
    results = tmp_path / "results.json"
    results.write_text(json.dumps(rows))
    assert targets.main([str(results), str(tmp_path / "targets.json")]) == 0
    out = capsys.readouterr().out
    assert "MET " in out and "roofline" in out and "% of memory roofline (H100" in out
    stored = json.loads((tmp_path / "roofline.json").read_text())
    assert [r["provider"] for r in stored] == ["fastft", "copy"]
    assert isinstance(json.loads((tmp_path / "targets.json").read_text()), list)
