"""The quant bench suite measures the same numbers by every provider; its GPU targets read it."""

import importlib.util
from pathlib import Path

import torch

from fastft.bench.suites import quant
from fastft.ops import fake_quant_act, hadamard


def test_every_provider_computes_the_same_result():
    for case in quant.cases("cpu", quick=True):
        if case.provider == "copy" or case.op == "train_step":
            continue
        out = case.build()()
        x = torch.randn(case.params["rows"], case.params["n"],
                        generator=torch.Generator().manual_seed(0))
        expect = hadamard(x) if case.op == "hadamard" else fake_quant_act(x, 4, rotate=True)
        if case.op == "hadamard":
            torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
        else:  # a rounding tie may land a step apart between fp32 orders of summation
            assert float((out - expect).abs().gt(1e-4).float().mean()) < 0.01


def test_gpu_targets_judge_the_transform_and_the_fused_op():
    path = Path(__file__).resolve().parents[2] / "benches" / "gpu_targets.py"
    spec = importlib.util.spec_from_file_location("gpu_targets", path)
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    rows = [dict(op="hadamard", provider=p, params=dict(rows=8192, n=n), dtype="bf16",
                 median_ms=ms) for n in (8192, 14336) for p, ms in (("fastft", 1.1), ("copy", 1.0))]
    rows += [dict(op="rotate_fake_quant", provider=p, params=dict(rows=8192, n=4096, bits=4),
                  dtype="bf16", median_ms=ms) for p, ms in (("fastft", 1.4), ("copy", 1.0))]
    verdicts = targets.judge(rows)
    by = {(v["op"], v["params"]["n"]): v["met"] for v in verdicts}
    assert by == {("hadamard", 8192): True, ("rotate_fake_quant", 4096): False}


def test_train_step_cases_run_and_roste_is_judged_against_the_plain_step():
    steps = [c for c in quant.cases("cpu", quick=True) if c.op == "train_step"]
    assert {c.provider for c in steps} == {"fastft", "plain"}
    for c in steps:
        c.build()()  # one step each, no error
