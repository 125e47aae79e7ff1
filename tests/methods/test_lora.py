"""fastft.prepare with LoRA on tiny Llama, Qwen2, Mistral and Gemma models."""

import copy
import re

import pytest
import torch

import fastft
from fastft import FastftError
from fastft.methods.lora import LoRALinear, adapter_layers

from ..helpers import assert_close
from ..tiny_models import ARCHS, batch, tiny

ARCH_NAMES = list(ARCHS)
LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("targets,expect", [
    ("all-linear", LINEARS),
    (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    (r"model\.layers\.1\.mlp\..*", {"gate_proj", "up_proj", "down_proj"}),
])
def test_prepare_replaces_exactly_the_targets(arch, targets, expect):
    model = tiny(arch)
    fastft.prepare(model, fastft.LoRA(r=4, target_modules=targets))
    layers = adapter_layers(model)
    assert {p.rsplit(".", 1)[-1] for p in layers} == expect
    if isinstance(targets, str) and targets != "all-linear":
        assert all(re.fullmatch(targets, p) for p in layers)
    assert not isinstance(model.lm_head, LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_targets_naming_nothing_list_the_linear_layers():
    model = tiny("llama")
    with pytest.raises(FastftError) as e:
        fastft.prepare(model, fastft.LoRA(target_modules=["query", "value"]))
    msg = str(e.value)
    assert "names no linear layer" in msg
    for name in LINEARS:
        assert name in msg
    assert not hasattr(model, "_fastft")


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_loss_head_equals_the_models_own_loss_and_logits_are_unchanged(arch):
    model = tiny(arch)
    plain = copy.deepcopy(model)
    ids, labels = batch()
    want = plain(input_ids=ids, labels=labels)
    fastft.prepare(model, fastft.Full())
    got = model(input_ids=ids, labels=labels)
    assert got.logits is None  # the fused loss never builds them
    assert_close(got.loss, want.loss, 1e-5)
    assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, 1e-6)
    got.loss.backward()
    want.loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        assert_close(p.grad, q.grad, 1e-4, n)


def test_lora_freezes_base_weights_no_grad_no_optimizer_state():
    model = tiny("llama")
    fastft.prepare(model, fastft.LoRA(r=4))
    randomize_b(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        is_lora = name.endswith(("lora_A", "lora_B"))
        assert (p.grad is not None) == is_lora, name
        assert (p in opt.state) == is_lora, name
    # what a dense W0 gradient and Adam state would have cost: nothing of it exists
    n_lora = sum(p.numel() for p in opt.state)
    assert n_lora < 0.2 * sum(p.numel() for p in model.parameters())


def test_merge_folds_adapters_into_a_plain_model():
    model = tiny("qwen2")
    ids, _ = batch()
    fastft.prepare(model, fastft.LoRA(r=4, alpha=16, rslora=True))
    randomize_b(model)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merged = fastft.merge(model)
        after = merged(input_ids=ids).logits
    assert not adapter_layers(merged) and not hasattr(merged, "_fastft")
    assert "forward" not in vars(merged)
    assert_close(after, before, 1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])  # gpt2: Conv1D, W0 stored [in, out]
def test_merge_keep_then_unmerge_restores_w0(arch):
    model = tiny(arch)
    ids, labels = batch()
    fastft.prepare(model, fastft.LoRA(r=4, alpha=8))
    randomize_b(model, seed=2)
    layers = adapter_layers(model)
    with torch.no_grad():  # a delta small beside W0, as a trained LoRA's is
        for layer in layers.values():
            layer.lora_B.mul_(0.01)
    w0 = {p: layer.base_layer.weight.clone() for p, layer in layers.items()}
    adapters = {p: (layer.lora_A.clone(), layer.lora_B.clone()) for p, layer in layers.items()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
        loss_before = model(input_ids=ids, labels=labels).loss
        assert fastft.merge(model, keep=True) is model
        fastft.merge(model, keep=True)  # merged layers are not folded twice
        assert all(layer.merged for layer in adapter_layers(model).values())
        assert_close(model(input_ids=ids).logits, before, 1e-5, "merged logits")
        assert_close(model(input_ids=ids, labels=labels).loss, loss_before, 1e-5, "merged loss")
        with pytest.raises(FastftError, match="unmerge"):
            with fastft.disable_adapters(model):
                pass
        fastft.unmerge(model)
        after = model(input_ids=ids).logits
    assert_close(after, before, 1e-6, "unmerged logits")
    for path, layer in adapter_layers(model).items():
        assert not layer.merged
        w, orig = layer.base_layer.weight, w0[path]
        delta = layer.delta_weight()
        # within one rounding of W0 + delta; bit-exact where the merge kept W0's last bit:
        # W0 + delta of W0's sign and power of two that did not round on a tie
        eps = torch.finfo(torch.float32).eps
        assert bool(((w - orig).abs() <= eps * (orig.abs() + delta.abs())).all()), path
        merged = orig + delta
        tie = ((orig.double() + delta.double()) - merged.double()).abs() \
            == (torch.nextafter(merged.abs(), torch.tensor(float("inf"))) - merged.abs()) / 2
        kept = (torch.frexp(orig)[1] == torch.frexp(merged)[1]) & \
            (orig.sign() == merged.sign()) & ~tie
        assert kept.float().mean() > 0.5 and torch.equal(w[kept], orig[kept]), path
        assert torch.equal(layer.lora_A, adapters[path][0])  # the adapters are untouched
        assert torch.equal(layer.lora_B, adapters[path][1])
    plain = fastft.merge(model)  # keep=False: a plain transformers model again
    assert not adapter_layers(plain) and not hasattr(plain, "_fastft")
    assert_close(logits_of(plain, ids), before, 1e-5, "merge(keep=False)")


def test_unpatch_of_a_merged_model_unmerges_first():
    model = tiny("llama")
    ids, _ = batch()
    want = logits_of(model, ids)
    fastft.prepare(model, fastft.LoRA(r=4))
    randomize_b(model)
    fastft.merge(model, keep=True)
    fastft.unpatch(model)
    assert_close(logits_of(model, ids), want, 1e-5)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_unpatch_restores_the_original_model():
    model = tiny("mistral")
    ids, _ = batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    fastft.prepare(model, fastft.LoRA(r=4))
    randomize_b(model)
    fastft.unpatch(model)
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, want, 0)
    assert all(type(m).__name__ == "Linear" for n, m in model.named_modules()
               if n.endswith(("q_proj", "down_proj")))


def test_disable_adapters_gives_the_base_model():
    model = tiny("gemma")
    ids, _ = batch()
    base = copy.deepcopy(model)
    fastft.prepare(model, fastft.LoRA(r=4))
    randomize_b(model)
    with torch.no_grad(), fastft.disable_adapters(model):
        assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, 1e-6)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-4


def test_dropout_runs_the_composition_in_training_only():
    model = tiny("llama")
    fastft.prepare(model, fastft.LoRA(r=4, dropout=0.5))
    randomize_b(model)
    ids, labels = batch()
    model.train()
    torch.manual_seed(0)
    a = model(input_ids=ids, labels=labels).loss
    torch.manual_seed(1)
    b = model(input_ids=ids, labels=labels).loss
    assert a.item() != b.item()  # dropout is applied
    model.eval()
    assert model(input_ids=ids, labels=labels).loss.item() == \
        model(input_ids=ids, labels=labels).loss.item()


def test_prepare_twice_and_bad_method():
    model = tiny("llama")
    with pytest.raises(FastftError, match="method must be"):
        fastft.prepare(model, "lora")
    fastft.prepare(model, fastft.LoRA(r=2))
    with pytest.raises(FastftError, match="already prepared"):
        fastft.prepare(model, fastft.LoRA(r=2))
    with pytest.raises(FastftError, match="r must be an int"):
        fastft.LoRA(r=0)


@pytest.mark.peers
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_logits_and_every_lora_gradient_equal_peft(arch):
    peft = pytest.importorskip("peft")
    model = tiny(arch)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    fastft.prepare(model, fastft.LoRA(r=4, alpha=8))
    randomize_b(model)
    pairs = []
    for path, layer in adapter_layers(model).items():
        other = theirs.base_model.model.get_submodule(path)
        with torch.no_grad():
            other.lora_A["default"].weight.copy_(layer.lora_A)
            other.lora_B["default"].weight.copy_(layer.lora_B)
        pairs.append((path, layer, other))
    ids, labels = batch()
    assert_close(model(input_ids=ids).logits, theirs(input_ids=ids).logits, 1e-5, "logits")
    ours, peers = model(input_ids=ids, labels=labels).loss, theirs(input_ids=ids, labels=labels).loss
    assert_close(ours, peers, 1e-5, "loss")
    ours.backward()
    peers.backward()
    for path, layer, other in pairs:
        assert_close(layer.lora_A.grad, other.lora_A["default"].weight.grad, 1e-5, path + ".A")
        assert_close(layer.lora_B.grad, other.lora_B["default"].weight.grad, 1e-5, path + ".B")
