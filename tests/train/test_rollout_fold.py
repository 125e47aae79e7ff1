"""GRPO rollouts decode with the adapters folded into a working copy of their weights.

The frozen base weights stay bit-identical, the folded model samples what the unfolded
one samples (same seed), LoRA-SB folds B R A, and each step reports its time split.
"""

import contextlib
import gc
import weakref

import pytest
import torch

import fastft
from fastft import TrainConfig, Trainer
from fastft.errors import FastftError
from fastft.methods.lora import adapter_layers
from fastft.recipe import CausalLMLoss
from fastft.train import fold, rollout

from ..tiny_models import tiny
from .helpers import read_metrics, tiny_setup, write_data

TIMES = ("time_generate_s", "time_logprobs_s", "time_update_s")


def reward(prompts, completions, **_):
    return [float(len(c) % 3) + 0.5 * c.count("1") for c in completions]


def randomise_adapters(model, seed=0):
    """Non-zero adapters (B starts at zero), so that folding changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in (layer.lora_A, layer.lora_B, getattr(layer, "lora_R", None)):
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if hasattr(layer, "initialized"):
                layer.initialized = True


def make_trainer(tmp_path, method="lora", **cfg):
    model, tok = tiny_setup()
    config = TrainConfig(objective="grpo", method=method, prompts_per_step=2, num_generations=3,
                         batch_size=4, max_completion_length=6, lr=1e-2, progress=False,
                         output_dir=str(tmp_path / "run"), **cfg)
    trainer = Trainer(model, tok, str(write_data(tmp_path, n=6, kind="grpo")), config,
                      reward_fn=reward)
    return trainer, model, tok


def no_fold(monkeypatch):
    monkeypatch.setattr(rollout, "folded_adapters", lambda m: contextlib.nullcontext(m))


def test_a_grpo_step_leaves_every_base_weight_bit_identical(tmp_path):
    trainer, model, _ = make_trainer(tmp_path, beta=0.05)
    randomise_adapters(model)
    layers = adapter_layers(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    objects = {n: layer.base_layer.weight for n, layer in layers.items()}
    adapters = {n: layer.lora_B.detach().clone() for n, layer in layers.items()}
    seen = []
    generate = model.generate

    def spy(*args, **kwargs):  # what the layers look like while sampling
        seen.append([(layer.merged, torch.equal(layer.base_layer.weight, objects[n]))
                     for n, layer in layers.items()])
        return generate(*args, **kwargs)

    model.generate = spy
    torch.manual_seed(0)
    trainer._grpo_step()
    trainer.optimizer.step()
    assert seen and all(merged and not same for merged, same in seen[0])  # it ran folded
    after = dict(model.named_parameters())
    assert base.keys() <= after.keys()
    for n, w in base.items():
        assert torch.equal(after[n], w), n
    for n, layer in layers.items():
        assert layer.base_layer.weight is objects[n] and not layer.merged
        assert not torch.equal(layer.lora_B, adapters[n])  # the adapters did train


def test_folded_sampling_equals_unfolded_sampling(tmp_path, monkeypatch):
    model, tok = tiny_setup()
    fastft.prepare(model, fastft.LoRA(r=4))
    randomise_adapters(model)
    cfg = TrainConfig(objective="grpo", num_generations=4, max_completion_length=8)
    prompts = ["12+7=", "3+45=", "60+1="]
    torch.manual_seed(3)
    folded = rollout.generate(model, tok, prompts, cfg, torch.device("cpu"))
    no_fold(monkeypatch)
    torch.manual_seed(3)
    plain = rollout.generate(model, tok, prompts, cfg, torch.device("cpu"))
    assert torch.equal(folded["completion_ids"], plain["completion_ids"])
    assert folded["texts"] == plain["texts"]
    # the sampled tokens' log-probs: folded and unfolded forward agree within fp32 rounding
    batch = rollout.batch_rows(folded, torch.zeros(12), slice(0, 12))
    loss_model = CausalLMLoss(model, cfg)
    unfolded = loss_model.logprobs(batch)
    with fold.folded_adapters(model):
        folded_logps = loss_model.logprobs(batch)
    torch.testing.assert_close(folded_logps, unfolded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_folded_weight_is_the_merged_weight(arch):
    """The fold is fastft.merge's arithmetic, on a copy: merged and folded models match."""
    model = tiny(arch)
    fastft.prepare(model, fastft.LoRA(r=4))
    randomise_adapters(model)
    layers = adapter_layers(model)
    folded = {n: fold.folded_weight(layer) for n, layer in layers.items()}
    fastft.merge(model, keep=True)
    for n, layer in layers.items():
        assert torch.equal(folded[n], layer.base_layer.weight), n
        assert folded[n].is_contiguous()  # in the base's own layout ([in, out] for Conv1D)


@pytest.mark.parametrize("arch,method", [("llama", "lora-sb"), ("gpt2", "lora"),
                                         ("gpt2", "lora-sb"), ("qwen2", "lora")])
def test_folded_forward_and_greedy_decoding_match(arch, method):
    """LoRA-SB folds B R A; a Conv1D base (GPT-2, weight [in, out]) folds in its layout."""
    model = tiny(arch)
    fastft.prepare(model, fastft.LoRASB(r=4) if method == "lora-sb" else fastft.LoRA(r=4))
    randomise_adapters(model, seed=1)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        ref_out = model.generate(input_ids=ids, **kw)
        with fold.folded_adapters(model):
            assert all(layer.merged for layer in adapter_layers(model).values())
            got = model(input_ids=ids).logits
            got_out = model.generate(input_ids=ids, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_out, ref_out)
    assert not any(layer.merged for layer in adapter_layers(model).values())


def test_only_active_adapters_fold_and_an_error_restores_the_weights():
    model = tiny("llama")
    fastft.prepare(model, fastft.LoRA(r=4))
    randomise_adapters(model)
    layers = list(adapter_layers(model).values())
    layers[0].disabled = True  # the reference policy's state: nothing to fold
    layers[1].merge()  # already folded into W0 by fastft.merge: not folded twice
    weights = [layer.base_layer.weight for layer in layers]
    saved = [w.clone() for w in weights]
    with pytest.raises(RuntimeError, match="inside"):
        with fold.folded_adapters(model):
            assert layers[0].base_layer.weight is weights[0] and not layers[0].merged
            assert layers[1].base_layer.weight is weights[1] and layers[1].merged
            assert all(layer.base_layer.weight is not w
                       for layer, w in zip(layers[2:], weights[2:]))
            copies = [weakref.ref(layer.base_layer.weight) for layer in layers[2:]]
            raise RuntimeError("inside")
    gc.collect()
    assert all(c() is None for c in copies)  # the folded copies are freed
    assert all(layer.base_layer.weight is w for layer, w in zip(layers, weights))
    assert [layer.merged for layer in layers] == [False, True] + [False] * (len(layers) - 2)
    assert all(torch.equal(w, s) for w, s in zip(weights, saved))
    full = tiny("llama")
    fastft.prepare(full, fastft.Full())
    with fold.folded_adapters(full):  # full fine-tuning: nothing to fold
        assert not adapter_layers(full)


def test_the_metrics_carry_the_time_split(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, beta=0.05, max_steps=2)
    torch.manual_seed(0)
    metrics, _ = trainer._grpo_step()
    for key in TIMES:
        assert isinstance(metrics[key], float) and metrics[key] > 0, key
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.train()
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and all(set(TIMES) <= set(r) for r in rows)
    assert all(r[k] >= 0 for r in rows for k in TIMES)


def test_generation_cache_option():
    cfg = TrainConfig(objective="grpo", max_completion_length=40)
    assert cfg.generation_cache == "auto"
    assert rollout.cache_options(cfg, 30, torch.device("cpu")) == {}  # the CPU path as before
    on_cuda = rollout.cache_options(cfg, 30, torch.device("cuda"))  # no GPU needed to ask
    assert on_cuda["cache_implementation"] == "static" and not on_cuda["disable_compile"]
    assert on_cuda.get("max_cache_len", 128) == 128  # 70 tokens, rounded up to 64s
    assert rollout.cache_options(cfg.replace(generation_cache="dynamic"), 30, "cuda") == {}
    assert rollout.cache_options(cfg.replace(generation_cache="static"), 30,
                                 "cpu")["cache_implementation"] == "static"
    with pytest.raises(FastftError, match="generation_cache"):
        TrainConfig(generation_cache="compiled")


def test_a_static_cache_samples_what_the_dynamic_one_does(tmp_path):
    """generation_cache="static" on the CPU: a static KV cache, uncompiled (transformers
    compiles on CUDA only); the same seed samples the same completions."""
    model, tok = tiny_setup()
    fastft.prepare(model, fastft.LoRA(r=4))
    randomise_adapters(model)
    prompts = ["12+7=", "3+45=", "60+1="]
    out = {}
    for cache in ("dynamic", "static"):
        cfg = TrainConfig(objective="grpo", num_generations=2, max_completion_length=8,
                          generation_cache=cache)
        torch.manual_seed(5)
        out[cache] = rollout.generate(model, tok, prompts, cfg, torch.device("cpu"))
    assert torch.equal(out["static"]["completion_ids"], out["dynamic"]["completion_ids"])
    assert torch.equal(out["static"]["completion_mask"], out["dynamic"]["completion_mask"])
