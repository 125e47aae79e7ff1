"""The step suite: every provider a CPU has runs one training step of the same computation.

No timings are asserted: the rows' fields, the providers of each case, and the loss of
the first step, which is the same number for every provider of a case (same model,
adapters and data) when the providers compute the same step.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import fastft
from fastft.bench import harness, run_suite
from fastft.bench.suites import _llama, _trl, losses, step
from fastft.bench.suites._common import head_inputs

pytestmark = pytest.mark.peers
FIELDS = {"op", "provider", "params", "dtype", "device", "median_ms", "p20_ms", "p80_ms",
          "peak_bytes", "flops", "tflops", "commit", "tokens", "tokens_per_s", "first_loss",
          "suite"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """run_suite over the quick step suite, each case measured in this process (the
    fresh subprocess per case would import torch, transformers, PEFT and TRL each time)."""
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    if torch.cuda.is_available():
        pytest.skip("the fastft Trainer trains on the GPU here: its CPU cases are skipped")
    out = tmp_path_factory.mktemp("step")
    cases = step.cases("cpu", quick=True)

    def in_process(suite, index, device, quick):
        assert (suite, device, quick) == ("step", "cpu", True)
        return harness.measure(cases[index], device, min_seconds=0.0, max_reps=2)

    def group_in_process(suite, indices, device, quick):  # the providers of a case, interleaved
        assert (suite, device, quick) == ("step", "cpu", True)
        return harness.measure_group([cases[i] for i in indices], device, min_seconds=0.0,
                                     max_reps=2)

    mp = pytest.MonkeyPatch()
    mp.setattr(harness, "_run_in_subprocess", in_process)
    mp.setattr(harness, "_run_group_in_subprocess", group_in_process)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: one thread is as fast, and steadier on a busy CPU
    lines = []
    try:
        rows = run_suite("step", "cpu", out, quick=True, echo=lines.append)
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return rows, out, lines


def by_case(rows):
    out = {}
    for r in rows:
        out.setdefault(r["op"], {})[r["provider"]] = r
    return out


def test_every_cpu_provider_runs_and_the_cuda_only_ones_say_why(results):
    rows, _, lines = results
    got = {op: set(p) for op, p in by_case(rows).items()}
    assert got == {"lora_sft": {"fastft", "transformers+peft", "trl_sft"},
                   "full_sft": {"fastft", "transformers"},
                   "grpo_update": {"fastft", "trl"}, "grpo_step": {"fastft"}}
    skipped = [ln for ln in lines if ln.startswith("skip ")]
    assert len(skipped) == 3 and all("CUDA only" in ln for ln in skipped)
    assert sum("liger" in ln for ln in skipped) == 2
    assert any("grpo_step/fastft+static_cache" in ln for ln in skipped)


def test_rows_carry_the_step_fields(results):
    rows, _, _ = results
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["suite"] == "step" and r.get("baseline") == step.BASELINE.get(r["op"])
        assert r["flops"] > 0 and r["median_ms"] > 0
        # tokens_per_s is rounded to 0.1 and computed from the median before that was
        # rounded to 4 decimals of a ms
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["median_ms"] * 1e-3),
                                                  rel=1e-5, abs=0.06)
    cases = by_case(rows)
    B, S = rows[0]["params"]["batch"], rows[0]["params"]["seq"]
    for op in ("lora_sft", "full_sft"):
        assert {r["tokens"] for r in cases[op].values()} == {B * S}
    p = cases["grpo_update"]["fastft"]["params"]
    n = p["prompts"] * p["generations"] * (p["prompt_len"] + p["completion_len"])
    assert {r["tokens"] for r in cases["grpo_update"].values()} == {n}


def test_first_step_loss_is_the_same_for_every_provider_of_a_case(results):
    """Same model, adapters and data: fastft's first loss is the plain provider's."""
    rows, _, _ = results
    cases = by_case(rows)
    lora = cases["lora_sft"]
    assert lora["fastft"]["first_loss"] > 1.0  # a cross-entropy over 1024 words, not a zero
    assert abs(lora["fastft"]["first_loss"] - lora["transformers+peft"]["first_loss"]) < 1e-4
    assert abs(lora["trl_sft"]["first_loss"] - lora["transformers+peft"]["first_loss"]) < 1e-4
    full = cases["full_sft"]
    assert abs(full["fastft"]["first_loss"] - full["transformers"]["first_loss"]) < 1e-4
    # the adapters count: the LoRA model's loss is not the base model's
    assert abs(lora["fastft"]["first_loss"] - full["fastft"]["first_loss"]) > 1e-4
    grpo = cases["grpo_update"]
    assert abs(grpo["fastft"]["first_loss"] - grpo["trl"]["first_loss"]) < 1e-4


def test_table_and_figure(results):
    rows, out, _ = results
    md = (out / "results.md").read_text()
    assert "| lora_sft | transformers+peft |" in md and "tokens_per_s" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| full_sft | transformers |"))
    assert "| 1.00x | 1.000x |" in line  # the plain provider against itself
    assert json.loads((out / "results.json").read_text()) == rows
    png = (out / "step.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_lora_providers_adapt_the_same_layers():
    peft = pytest.importorskip("peft")  # noqa: F841
    shape, dtype = step._model_shape("cpu", quick=True)
    ours = _llama.fastft_prepare(_llama.llama(shape, dtype, "cpu"), lora=True)
    theirs = _llama.peft_lora(_llama.llama(shape, dtype, "cpu"))
    from fastft.methods.lora import adapter_layers

    mine = adapter_layers(ours)
    other = {p: m for p, m in theirs.base_model.model.named_modules()
             if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)}
    assert set(mine) == set(other) and len(mine) == 7 * shape["layers"]
    for path, m in mine.items():
        assert torch.equal(m.lora_A, other[path].lora_A["default"].weight)
        assert torch.equal(m.lora_B, other[path].lora_B["default"].weight)
        assert m.lora_B.abs().sum() > 0


def test_trl_stand_ins_compute_fastfts_losses_and_gradients():
    """TRL's fused head (the losses suite's ``trl`` peer, and the GRPO update's) computes
    the quantity fastft's loss does: the same value and gradients."""
    pytest.importorskip("trl")
    h, w, y = head_inputs(64, 16, 300, "fp32", "cpu")
    model = _trl.head_model(lambda ids: h[None], w)
    theirs = model(input_ids=torch.zeros(1, 64, dtype=torch.long), shift_labels=y[None],
                   fused_lm_head=True).loss
    ours = fastft.losses.cross_entropy(h, w, y)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(theirs, (h, model.lm_head.weight)),
                    torch.autograd.grad(ours, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    hidden, tokens, mask, adv, old, ref_lp = losses._grpo_inputs(h, w, y, S=16)
    B, S, H = hidden.shape
    model = _trl.head_model(lambda ids: torch.cat([hidden, hidden.new_zeros(B, 1, H)], 1), w,
                            outputs=("log_probs", "entropy"))
    theirs = _trl.grpo_loss(model, max_completion_length=S, beta=0.04)(dict(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1).long(),
        completion_ids=tokens, completion_mask=mask.long(), advantages=adv,
        num_items_in_batch=mask.sum(), old_per_token_logps=old, ref_per_token_logps=ref_lp))
    ours = fastft.losses.grpo(hidden, w, tokens, adv, mask=mask, old_logps=old,
                              ref_logps=ref_lp, beta=0.04)[0]
    assert ours.abs() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(theirs, (hidden, model.lm_head.weight)),
                    torch.autograd.grad(ours, (hidden, w))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def gpu_targets():
    path = Path(__file__).resolve().parents[2] / "benches" / "gpu_targets.py"
    spec = importlib.util.spec_from_file_location("gpu_targets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_targets_judge_the_lora_step():
    rows = [dict(op="lora_sft", provider=p, params={"layers": 2}, dtype="bf16",
                 tokens_per_s=tps, peak_bytes=peak, median_ms=1.0)
            for p, tps, peak in (("fastft", 1400.0, 50), ("transformers+peft", 1000.0, 100),
                                 ("transformers+peft+liger", 1300.0, 60))]
    verdicts = {v["target"]: (v["ratio"], v["met"]) for v in gpu_targets().judge(rows)}
    assert verdicts == {"tokens/s >= 1.3x transformers+peft": (1.4, True),
                        "tokens/s >= 1.1x transformers+peft+liger": (round(1400 / 1300, 4),
                                                                     False),
                        "peak <= 0.6x transformers+peft": (0.5, True)}
