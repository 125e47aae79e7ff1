"""ASFT's reference policy stays the initial model, whatever trains (the head included)."""

import copy

import pytest
import torch

import fastft
from fastft import TrainConfig, Trainer
from fastft.patch import output_head
from fastft.recipe import loss_model

from .helpers import tiny_setup, write_data


@pytest.mark.parametrize("method", ["full", "lift", "lora"])
def test_asft_reference_logits_are_the_initial_models(tmp_path, monkeypatch, method):
    model, tok = tiny_setup()
    if method == "lift":
        fastft.prepare(model, fastft.LIFT(lora_rank=2, filter_rank=4))
    initial = copy.deepcopy(model).eval()
    seen = []
    real = loss_model.CausalLMLoss.forward

    def spy(self, batch, **kw):
        seen.append((batch, kw))
        return real(self, batch, **kw)

    monkeypatch.setattr(loss_model.CausalLMLoss, "forward", spy)
    cfg = TrainConfig(method=method, loss="asft", batch_size=4, max_steps=3, lr=1e-2,
                      warmup_ratio=0.0, progress=False, max_length=16, bf16="false",
                      output_dir=str(tmp_path / "run"))
    trainer = Trainer(model, tok, str(write_data(tmp_path, n=12)), cfg)
    trainer.train()
    head = output_head(model).weight
    initial.to(head.device)  # the Trainer moved the model to CUDA where there is one
    assert not torch.equal(head, output_head(initial).weight) or method != "full"
    batch, kw = seen[-1]  # the third step's: the model has moved twice
    w_ref = kw.get("ref_weight", head)
    seen_logits = kw["ref_hidden"].float() @ w_ref.float().t()
    with torch.no_grad():
        expect = initial(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(seen_logits, expect.float(), rtol=1e-5, atol=1e-5)
