"""A LoRA trained by fastft's Trainer on the real model, saved in PEFT's layout and loaded by
PEFT onto a fresh copy of the base: PEFT's model gives fastft's logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastft
from fastft.methods.lora import adapter_layers


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.pretrained
@pytest.mark.peers
def test_peft_loads_the_trained_adapter_and_gives_fastfts_logits(smollm2, tmp_path):
    peft = pytest.importorskip("peft")
    model = smollm2.fresh()
    cfg = fastft.TrainConfig(method="lora", lora_r=8, lora_alpha=16, max_steps=3, batch_size=2,
                             lr=2e-3, warmup_ratio=0.0, max_length=64, progress=False,
                             output_dir=str(tmp_path / "run"))
    summary = fastft.Trainer(model, smollm2.tokenizer, smollm2.records(6), cfg).train()
    folder = tmp_path / "run" / "checkpoint-3" / "adapter"
    assert summary["checkpoint"] == str(folder.parent) and (folder / "adapter_config.json").is_file()
    assert all(layer.lora_B.abs().max() > 0 for layer in adapter_layers(model).values())
    model.eval()
    ids, _ = smollm2.batch(2, 96, skip=6)  # text the adapter was not trained on
    ours = logits(model, ids)
    base = AutoModelForCausalLM.from_pretrained(str(smollm2.folder), dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    assert len([n for n, _ in theirs.named_modules() if n.endswith("lora_A.default")]) == \
        len(adapter_layers(model)) == 30 * 7
    want = logits(theirs, ids)
    scale = want.abs().max()
    # three steps moved the logits by 28% of the largest (measured); PEFT gives them exactly
    assert (want - logits(smollm2.model, ids)).abs().max() > 1e-2 * scale
    assert (ours - want).abs().max() <= 1e-5 * scale, (ours - want).abs().max() / scale
