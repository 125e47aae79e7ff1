"""LoRA-SB: the gradient-based initialisation of METHODS.md §2, training R, saving."""

import copy

import pytest
import torch

import fastft
from fastft import FastftError
from fastft.methods import lora_sb
from fastft.methods.lora import LoRASBLinear, adapter_layers

from ..helpers import assert_close
from ..tiny_models import batch, tiny

R = 6


def batches(n=3, B=2):
    return [dict(zip(("input_ids", "labels"), batch(B=B, seed=i))) for i in range(n)]


def test_initialisation_is_the_truncated_svd_of_the_sign_update():
    model = tiny("llama")
    plain = copy.deepcopy(model)
    fastft.prepare(model, fastft.LoRASB(r=R, target_modules=["q_proj", "up_proj"]))
    data = batches()
    top = lora_sb.initialize(model, data, total_steps=100, lr=1e-3, warmup_ratio=0.1, n_init=5)
    # the same gradients, by hand, on the plain model: mini-batches of 2, 2, 1 samples
    for i, b in enumerate(data):
        take = [2, 2, 1][i]
        out = plain(input_ids=b["input_ids"][:take], labels=b["labels"][:take])
        (out.loss / take).backward()
    lr_eff = 1e-3 / (0.1 * 100)
    for path, layer in adapter_layers(model).items():
        assert isinstance(layer, LoRASBLinear) and layer.initialized
        g = plain.get_submodule(path).weight.grad
        dw = -lr_eff * torch.sign(g)
        u, s, vh = torch.linalg.svd(dw.t(), full_matrices=False)
        best = (u[:, :R] * s[:R]) @ vh[:R]  # the best rank-R approximation of dW^T
        approx = (layer.lora_B @ layer.lora_R @ layer.lora_A).t()
        # randomized SVD with 10 power iterations on a sign matrix: near the optimum
        err, best_err = (dw.t() - approx).norm(), (dw.t() - best).norm()
        assert best_err <= err <= 1.02 * best_err, path
        assert abs(top[path] - s[0].item()) <= 0.02 * s[0].item(), path
        a = layer.lora_A
        assert_close(a @ a.t(), torch.eye(R), 1e-4, "A has orthonormal rows")
        assert torch.count_nonzero(layer.lora_R - torch.diag(torch.diag(layer.lora_R))) == 0
        assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


def test_training_r_lowers_the_loss_and_only_r_trains():
    model = tiny("qwen2")
    fastft.prepare(model, fastft.LoRASB(r=R))
    data = batches()
    lora_sb.initialize(model, data, total_steps=20, lr=5e-3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_R") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids, labels = data[0]["input_ids"], data[0]["labels"]
    first = model(input_ids=ids, labels=labels).loss.item()
    for _ in range(15):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    assert model(input_ids=ids, labels=labels).loss.item() < first - 0.05


def test_uninitialised_training_is_a_clear_error():
    model = tiny("llama")
    fastft.prepare(model, fastft.LoRASB(r=R))
    model.train()
    ids, labels = batch()
    with pytest.raises(FastftError, match="not initialised"):
        model(input_ids=ids, labels=labels)
    with pytest.raises(FastftError, match="rank 40 exceeds"):
        m2 = tiny("llama")
        fastft.prepare(m2, fastft.LoRASB(r=40))
        lora_sb.initialize(m2, batches(), total_steps=10)


@pytest.mark.peers
def test_saved_lora_sb_loads_in_peft_and_resumes_in_fastft(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny("llama")
    base = copy.deepcopy(model)
    fastft.prepare(model, fastft.LoRASB(r=R))
    lora_sb.initialize(model, batches(), total_steps=10, lr=1e-2)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_R.add_(0.01)
    fastft.save_adapter(model, tmp_path)
    ids, _ = batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert_close(theirs(input_ids=ids).logits, want, 1e-5)
        again = tiny("llama")
        fastft.prepare(again, fastft.LoRASB(r=R))
        fastft.load_adapter(again, tmp_path)
        assert_close(again(input_ids=ids).logits, want, 1e-6)
    assert all(layer.initialized for layer in adapter_layers(again).values())
