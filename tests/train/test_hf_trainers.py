"""A fastft.prepare'd model under transformers' Trainer and TRL's SFTTrainer (issue 9 point 8).

transformers.Trainer calls ``model(**batch)`` with labels: fastft's patched forward
computes the loss with the fused cross-entropy from the hidden states.

TRL's SFTTrainer (1.16) wraps the instance's forward with its own fused LM head
(``trl.trainer.utils.add_fused_lm_head``): a call with ``fused_lm_head=True`` runs
``model.base_model`` (the decoder, with fastft's LoRA layers in it) and a chunked
log-prob kernel over ``lm_head.weight`` that returns per-token log_probs, entropy and
is_top1 without the [B, S, V] logits; the loss, ``entropy`` and ``mean_token_accuracy``
it logs come from these. fastft's forward stays underneath as the wrapper's original
forward, for the calls without ``fused_lm_head`` (generation, ``compute_loss_func``,
label smoothing, logits for ``compute_metrics``). So a prepared model and a PEFT model
go through the same head, and differ only in their LoRA layers.

The model: the demo's character tokenizer and a 2-layer tied-embedding Llama whose
embedding is scaled by 10, so that the logits have a spread (std about 1) and the
top-1 predictions have margins: token accuracy is then not 0 and does not hinge on
near-ties. LoRA B is random (not zero), so the adapters change the first step's loss.

Non-defaults: output_dir, max_steps=2, per_device_train_batch_size=2 and report_to=[]
(asked); logging_steps=1, so that the first step is logged on its own (the defaults,
500 for Trainer and 10 for SFTConfig, would log no step of a 2-step run); and, for
SFTConfig's default bf16=True, use_cpu=True: without a GPU, TrainingArguments raises
"Your setup doesn't support bf16/gpu. You need to assign use_cpu ..." otherwise. On
the CPU, bf16=True trains under torch.autocast("cpu", torch.bfloat16).
"""

import copy
import math

import pytest
import torch

import fastft
from fastft.demo import arithmetic as ar
from fastft.methods.lora import adapter_layers

from ..helpers import RTOL
from .helpers import tiny_setup

R, ALPHA = 4, 8
# a batch of 2 rows holds at least 14 completion tokens (6 or 7 characters and EOS each):
# under bf16 one near-tie top-1 may flip
ONE_TOKEN = 1 / 14


def scaled_model():
    model, tok = tiny_setup()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)  # tied: the head too
    return model, tok


def prepared(model):
    fastft.prepare(model, fastft.LoRA(r=R, alpha=ALPHA))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


def twins():
    """(fastft model, PEFT model) from the same base with the same initial adapters, and tok."""
    peft = pytest.importorskip("peft")
    model, tok = scaled_model()
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0))
    prepared(model)
    with torch.no_grad():
        for path, layer in adapter_layers(model).items():
            other = theirs.base_model.model.get_submodule(path)
            other.lora_A["default"].weight.copy_(layer.lora_A)
            other.lora_B["default"].weight.copy_(layer.lora_B)
    return model, theirs, tok


def records(n=8):
    return ar.sft_records(ar.problems(n, seed=0))


def tokenized(tok):
    """Rows of equal length: <bos> prompt completion <eos>, the prompt masked in the labels."""
    import datasets

    rows = []
    for r in records():
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p + c, [-100] * len(p) + c))
    n = max(len(ids) for ids, _ in rows)
    return datasets.Dataset.from_list([
        dict(input_ids=ids + [tok.pad_token_id] * (n - len(ids)),
             attention_mask=[1] * len(ids) + [0] * (n - len(ids)),
             labels=lab + [-100] * (n - len(lab))) for ids, lab in rows])


def train_hf(model, ds, out, **overrides):
    """Two steps of transformers.Trainer; the per-step log entries."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], logging_steps=1, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def train_sft(model, tok, out, **overrides):
    """Two steps of TRL's SFTTrainer on prompt/completion rows; the per-step log entries."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=2,
                     report_to=[], logging_steps=1, use_cpu=True, **overrides)
    trainer = SFTTrainer(model=model, args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(records()))
    assert trainer.args.bf16 == overrides.get("bf16", True)  # TRL's default is bf16
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def close(ours, theirs, rtol, name):
    assert math.isfinite(ours) and math.isclose(ours, theirs, rel_tol=rtol, abs_tol=1e-7), \
        f"{name}: fastft {ours} vs PEFT {theirs} (rtol {rtol})"


def test_trainer_trains_a_prepared_lora_model(tmp_path):
    pytest.importorskip("accelerate")
    model, tok = scaled_model()
    prepared(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs = train_hf(model, tokenized(tok), tmp_path)
    assert [h["step"] for h in logs] == [1, 2]
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in logs)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    for n, p in model.named_parameters():  # transformers.Trainer moves it to CUDA if it can
        if n in trained:
            assert not torch.equal(p.cpu(), before[n]), f"{n} did not change"
        else:
            assert torch.equal(p.cpu(), before[n]), f"frozen {n} changed"


@pytest.mark.peers
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_trainer_logs_the_loss_of_peft(tmp_path, bf16):
    ours, theirs, tok = twins()
    ds = tokenized(tok)
    extra = dict(bf16=True, use_cpu=True) if bf16 else {}  # default TrainingArguments: fp32
    a = train_hf(ours, ds, tmp_path / "fastft", **extra)
    b = train_hf(theirs, ds, tmp_path / "peft", **extra)
    # under autocast PEFT's lm_head runs in bf16; fastft's fused CE takes the fp32 residual
    # stream and head as they are
    rtol = RTOL[torch.bfloat16] if bf16 else RTOL[torch.float32]
    close(a[0]["loss"], b[0]["loss"], rtol, "step 1 loss")
    close(a[1]["loss"], b[1]["loss"], rtol, "step 2 loss")


@pytest.mark.peers
@pytest.mark.parametrize("bf16", [None, False], ids=["defaults-bf16", "fp32"])
def test_sft_trainer_logs_the_loss_accuracy_and_entropy_of_peft(tmp_path, bf16):
    pytest.importorskip("trl")
    ours, theirs, tok = twins()
    extra = {} if bf16 is None else dict(bf16=bf16)
    a = train_sft(ours, tok, tmp_path / "fastft", **extra)
    b = train_sft(theirs, tok, tmp_path / "peft", **extra)
    assert [h["step"] for h in a] == [h["step"] for h in b] == [1, 2]
    first, peer = a[0], b[0]
    assert 0 < peer["mean_token_accuracy"] < 1 and peer["entropy"] > 0.1  # a meaningful check
    if bf16 is None:
        # both models' layers and TRL's head run in bf16 under autocast: one bf16 rounding
        # (2**-8 relative) on activations; the top-1 of a near-tie may flip
        rtol, acc_tol = RTOL[torch.bfloat16], ONE_TOKEN
    else:
        rtol, acc_tol = RTOL[torch.float32], 0.0
    close(first["loss"], peer["loss"], rtol, "step 1 loss")
    close(first["entropy"], peer["entropy"], rtol, "step 1 entropy")
    assert abs(first["mean_token_accuracy"] - peer["mean_token_accuracy"]) <= acc_tol, \
        f"step 1 mean_token_accuracy: fastft {first} vs PEFT {peer}"
    close(a[1]["loss"], b[1]["loss"], rtol, "step 2 loss")


@pytest.mark.peers
def test_a_trl_head_added_before_prepare_fails_clearly():
    utils = pytest.importorskip("trl.trainer.utils")
    model, tok = scaled_model()
    utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    prepared(model)  # replaces the forward that TRL wrapped
    ids = torch.tensor([tok("12+34=")["input_ids"]])
    with pytest.raises(fastft.FastftError, match="prepare the model before creating the TRL"):
        model(input_ids=ids, labels=ids, fused_lm_head=True)
