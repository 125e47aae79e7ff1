"""Adapters on disk in PEFT's layout: fastft <-> PEFT both ways, atomic writes, clear errors."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import fastft
from fastft import FastftError
from fastft.methods.lora import adapter_layers

from ..helpers import assert_close
from ..tiny_models import batch, tiny
from .test_lora import randomize_b


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_saved_layout_and_config(tmp_path):
    model = tiny("llama")
    fastft.prepare(model, fastft.LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    fastft.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert not list(tmp_path.glob(".*.tmp"))  # nothing left from the atomic writes


def test_round_trip_through_fastft(tmp_path):
    model = tiny("qwen2")
    fastft.prepare(model, fastft.LoRA(r=4, alpha=16))
    randomize_b(model)
    ids, _ = batch()
    fastft.save_adapter(model, tmp_path)
    fresh = fastft.load_adapter(tiny("qwen2"), tmp_path)  # prepares it from the config
    assert_close(logits(fresh, ids), logits(model, ids), 1e-6)


@pytest.mark.peers
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_peft_loads_a_fastft_adapter(tmp_path, arch):
    peft = pytest.importorskip("peft")
    model = tiny(arch)
    base = copy.deepcopy(model)
    fastft.prepare(model, fastft.LoRA(r=4, alpha=8, rslora=True))
    randomize_b(model)
    fastft.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    ids, _ = batch()
    assert_close(logits(theirs, ids), logits(model, ids), 1e-5)


@pytest.mark.peers
def test_fastft_loads_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny("mistral"), peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = fastft.load_adapter(tiny("mistral"), tmp_path)
    assert {p.rsplit(".", 1)[-1] for p in adapter_layers(ours)} == {"q_proj", "down_proj"}
    ids, _ = batch()
    assert_close(logits(ours, ids), logits(theirs, ids), 1e-5)


def test_adapter_that_does_not_fit_is_a_clear_error(tmp_path):
    model = tiny("llama")
    fastft.prepare(model, fastft.LoRA(r=4))
    fastft.save_adapter(model, tmp_path)
    other = tiny("llama")
    fastft.prepare(other, fastft.LoRA(r=8))
    with pytest.raises(FastftError, match="a different rank or base model"):
        fastft.load_adapter(other, tmp_path)
    with pytest.raises(FastftError, match="adapter_config.json not found"):
        fastft.load_adapter(other, tmp_path / "missing")
    with pytest.raises(FastftError, match="no fastft adapters to save"):
        fastft.save_adapter(tiny("llama"), tmp_path / "x")
