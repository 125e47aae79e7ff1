"""The GPU user's first path on its CPU stand-in: bf16 autocast (the Trainer's default on CUDA),
bf16 and fp16 weights, for every method; adapters stay fp32 on a half-precision model."""

import pytest
import torch
import torch.nn.functional as F

import fastft
from fastft import TrainConfig, Trainer

from ..helpers import assert_close
from ..tiny_models import batch, tiny
from .helpers import read_metrics, tiny_setup, write_data

METHODS = {"lora": lambda: fastft.LoRA(r=4, alpha=8), "lora-sb": lambda: fastft.LoRASB(r=4),
           "full": fastft.Full, "lift": lambda: fastft.LIFT(lora_rank=2, filter_rank=4),
           "hft": fastft.HFT, "ltsft": lambda: fastft.LTSFT(proportion=0.05),
           "green": lambda: fastft.GreenTrainer(rho=0.5, interval=1)}


def run(tmp_path, method, bf16, name):
    model, tok = tiny_setup()
    fastft.prepare(model, METHODS[method]())
    cfg = TrainConfig(batch_size=4, max_steps=2, lr=1e-3, warmup_ratio=0.0, schedule="constant",
                      progress=False, max_length=16, method=method, bf16=bf16,
                      output_dir=str(tmp_path / name))
    trainer = Trainer(model, tok, str(write_data(tmp_path, n=8)), cfg)
    trainer.train()
    return trainer, read_metrics(tmp_path / name)


@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_under_cpu_bf16_autocast_matches_fp32(tmp_path, method):
    """bf16=true runs every step under torch.autocast (here "cpu", on a GPU "cuda"); the
    losses follow the fp32 run's within bf16 rounding and the trained weights stay fp32."""
    trainer, half = run(tmp_path, method, "true", "bf16")
    assert trainer.autocast
    _, full = run(tmp_path, method, "false", "fp32")
    steps = 4 if method == "ltsft" else 2
    assert len(half) == len(full) == steps
    for a, b in zip(half, full):
        assert abs(a["loss"] - b["loss"]) <= 2e-2 * abs(b["loss"]), (a["loss"], b["loss"])
        assert a["grad_norm"] > 0
    for p in trainer.model.parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32


def peft_twin(model, fast):
    """The same LoRA in PEFT, with fastft's adapter weights copied in."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    twin = peft.get_peft_model(model, cfg)
    ours = {n: p for n, p in fast.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "lora_" in n:
                key = n.removeprefix("base_model.model.").replace(".default.weight", "")
                p.copy_(ours[key])
    return twin


@pytest.mark.peers
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_lora_under_autocast_matches_peft(weights, amp):
    """A prepared LoRA model under autocast: loss and adapter gradients as PEFT's (which
    runs torch's own autocast-aware linears), on fp32 and bf16 weights."""
    fast = fastft.prepare(tiny("llama", dtype=weights).train(), fastft.LoRA(r=4, alpha=8))
    with torch.no_grad():
        for n, p in fast.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    twin = peft_twin(tiny("llama", dtype=weights).train(), fast)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=amp):
        loss = fast(input_ids=ids, labels=labels).loss
        logits = twin(input_ids=ids).logits
        expect = F.cross_entropy(logits.float()[:, :-1].reshape(-1, logits.shape[-1]),
                                 labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    expect.backward()
    assert_close(loss, expect, 2e-2, "loss")
    grads = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p.grad
             for n, p in twin.named_parameters() if p.grad is not None}
    n_checked = 0
    for n, p in fast.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
            g = grads[n]
            rel = float((p.grad - g).norm() / g.norm())
            assert rel < 5e-2, (n, rel)
            n_checked += 1
        else:
            assert p.grad is None, n
    assert n_checked == 28


@pytest.mark.parametrize("choice,expect", [("float32", torch.float32), ("base", torch.bfloat16)])
def test_adapter_dtype_on_a_bf16_model(choice, expect):
    model = fastft.prepare(tiny("llama", dtype=torch.bfloat16).train(),
                           fastft.LoRA(r=4, adapter_dtype=choice))
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == expect for p in adapters)
    ids, labels = batch()
    loss = model(input_ids=ids, labels=labels).loss  # bf16 weights, no autocast
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad.dtype == expect for p in adapters
                                        if p.requires_grad)


@pytest.mark.parametrize("method", ["full", "lift", "hft", "ltsft", "green"])
def test_other_methods_on_bf16_weights_under_autocast(method):
    model = fastft.prepare(tiny("llama", dtype=torch.bfloat16).train(), METHODS[method]())
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all()
                           for p in trained if p.grad is not None)
