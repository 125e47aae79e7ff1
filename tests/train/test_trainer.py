"""The training loop on a tiny model: every objective x method learns; resume is exact."""

import pytest
import torch

import fastft
from fastft import TrainConfig, Trainer
from fastft.train import data

from .helpers import count_sevens, read_metrics, tiny_setup, write_data

BASE = dict(batch_size=16, max_steps=8, lr=3e-3, warmup_ratio=0.0, schedule="constant",
            progress=False, lora_r=4, max_length=16)


def eval_loss(model, tok, path):
    rows, _ = data.tokenize_sft(data.read_records(path), tok, max_length=16, truncation=True,
                                completion_only=True, skip_invalid=False)
    dev = next(model.parameters()).device  # the Trainer moves the model to CUDA where there is one
    b = {k: v.to(dev) for k, v in data.collate(rows, tok.pad_token_id).items()}
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    labels=b["labels"]).loss.item()
    model.train(was)
    return out


@pytest.mark.parametrize("method", ["lora", "lora-sb", "full"])
@pytest.mark.parametrize("loss", ["ce", "dft", "asft", "otr"])
def test_sft_lowers_the_loss(tmp_path, method, loss):
    model, tok = tiny_setup()
    path = write_data(tmp_path)
    fastft.prepare(model, {"lora": fastft.LoRA(r=4, alpha=8), "lora-sb": fastft.LoRASB(r=4),
                           "full": fastft.Full()}[method])
    before = eval_loss(model, tok, path)
    lr = 1e-2 if method == "lora-sb" else BASE["lr"]
    summary = Trainer(model, tok, str(path), TrainConfig(
        **dict(BASE, lr=lr), method=method, loss=loss, output_dir=str(tmp_path / "run"))).train()
    assert eval_loss(model, tok, path) < before - 0.05
    assert summary["steps"] == 8 and (tmp_path / "run" / "checkpoint-8").is_dir()
    lines = read_metrics(tmp_path / "run")
    assert len(lines) == 8 and {"loss", "grad_norm", "lr", "tokens_per_s",
                                "peak_memory_mb"} <= set(lines[0])


@pytest.mark.parametrize("method,loss", [("full", "ce"), ("lora", "otr"), ("lora", "asft")])
def test_resume_equals_the_uninterrupted_run(tmp_path, method, loss):
    def run(out, steps, resume=None, save_every=0):
        model, tok = tiny_setup()
        cfg = TrainConfig(**dict(BASE, max_steps=steps, batch_size=4, grad_accum=2),
                          method=method, loss=loss, output_dir=str(out), save_every=save_every,
                          resume_from=resume, lora_dropout=0.1 if method == "lora" else 0.0)
        Trainer(model, tok, str(write_data(tmp_path, n=12)), cfg).train()
        return read_metrics(out)

    whole = run(tmp_path / "a", 6, save_every=3)
    resumed = run(tmp_path / "b", 6, resume=str(tmp_path / "a" / "checkpoint-3"))
    assert [m["step"] for m in resumed] == [4, 5, 6]
    exact = not torch.cuda.is_available()  # bit for bit on the CPU
    for a, b in zip(whole[3:], resumed):
        if exact:
            assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
        else:
            assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"])


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    def run(out, batch, accum):
        model, tok = tiny_setup()
        # fp32 on CUDA too (bf16 "auto" would autocast there): the sums must agree to 1e-5
        cfg = TrainConfig(**dict(BASE, max_steps=3, batch_size=batch, grad_accum=accum),
                          method="full", bf16="false", output_dir=str(out))
        Trainer(model, tok, str(write_data(tmp_path)), cfg).train()
        return read_metrics(out), model

    big, m1 = run(tmp_path / "big", 16, 1)
    small, m2 = run(tmp_path / "small", 4, 4)
    for a, b in zip(big, small):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_grpo_raises_the_mean_reward(tmp_path, method):
    model, tok = tiny_setup(seed=1)
    # LoRA starts at B = 0 and moves slower: more steps (the gain is 0.055-0.073 over seeds 0-2)
    cfg = TrainConfig(objective="grpo", method=method, lr=4e-2 if method == "lora" else 5e-3,
                      batch_size=32, prompts_per_step=4, num_generations=8,
                      max_completion_length=6, max_steps=20 if method == "lora" else 12,
                      warmup_ratio=0.0,
                      schedule="constant", progress=False, lora_r=4, beta=0.02,
                      output_dir=str(tmp_path / "run"))
    summary = Trainer(model, tok, str(write_data(tmp_path, kind="prompts")), cfg,
                      reward_fn=count_sevens).train()
    lines = read_metrics(tmp_path / "run")
    first = sum(m["reward_mean"] for m in lines[:3]) / 3
    last = sum(m["reward_mean"] for m in lines[-3:]) / 3
    assert last > first + 0.05, (first, last)
    assert {"reward_std", "kl", "clip_low", "clip_high", "completion_length"} <= set(lines[0])
    assert summary["reward_mean"] == lines[-1]["reward_mean"]


def test_packing_and_gradient_checkpointing_train(tmp_path):
    model, tok = tiny_setup()
    path = write_data(tmp_path)
    fastft.prepare(model, fastft.Full())
    before = eval_loss(model, tok, path)
    Trainer(model, tok, str(path), TrainConfig(**dict(BASE, max_length=64), method="full",
                                               packing=True, gradient_checkpointing=True,
                                               output_dir=str(tmp_path / "run"))).train()
    assert eval_loss(model, tok, path) < before - 0.05


def test_grpo_without_reward_function_is_an_error(tmp_path):
    model, tok = tiny_setup()
    with pytest.raises(fastft.FastftError, match="needs reward_fn"):
        Trainer(model, tok, str(write_data(tmp_path, kind="prompts")),
                TrainConfig(objective="grpo", progress=False))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["lift", "hft", "ltsft"])
def test_sparse_methods_train_through_the_trainer(tmp_path, name):
    """The loss falls; entries outside what the method trains stay bit-identical."""
    model, tok = tiny_setup()
    path = write_data(tmp_path, n=64)
    method = {"lift": fastft.LIFT(lora_rank=2, filter_rank=4, refresh_every=100),
              "hft": fastft.HFT(seed=3), "ltsft": fastft.LTSFT(proportion=0.05)}[name]
    fastft.prepare(model, method)
    before_w, before = snapshot(model), eval_loss(model, tok, path)
    Trainer(model, tok, str(path), TrainConfig(**dict(BASE, max_steps=3, lr=1e-2),
                                               method=name, output_dir=str(tmp_path / "run"))
            ).train()
    assert eval_loss(model, tok, path) < before - 0.02
    changed = {n: (p.detach() != before_w[n]) for n, p in model.named_parameters()}
    assert not any(c.any() for n, c in changed.items() if not n.endswith("proj.weight"))
    if name == "lift":  # per matrix, at most min((m + n) r, m n) entries moved
        for n, c in changed.items():
            if n.endswith("proj.weight"):
                m_, n_ = c.shape
                assert int(c.sum()) <= min((m_ + n_) * 2, m_ * n_), n
    elif name == "hft":  # one stage (one epoch): 2 of the 4 attention matrices per layer
        for layer in range(2):
            attn = [changed[f"model.layers.{layer}.self_attn.{p}_proj.weight"].any()
                    for p in "qkvo"]
            assert sum(bool(a) for a in attn) == 2
    else:  # phase 2 re-trained the global top 5% of |theta - theta0|, from theta0
        total = sum(c.numel() for n, c in changed.items() if n.endswith("proj.weight"))
        moved = sum(int(c.sum()) for n, c in changed.items() if n.endswith("proj.weight"))
        assert 0 < moved <= round(0.05 * total) + 1


@pytest.mark.parametrize("name", ["lift", "ltsft"])
def test_sparse_methods_resume_exactly(tmp_path, name):
    """The method state is restored before its optimizer is made (LT-SFT: from phase 'full')."""
    data_path = write_data(tmp_path, n=32)

    def run(out, resume=None, save_every=0):
        model, tok = tiny_setup()
        fastft.prepare(model, fastft.LIFT(lora_rank=2, filter_rank=4, refresh_every=2)
                       if name == "lift" else fastft.LTSFT(proportion=0.05))
        cfg = TrainConfig(**dict(BASE, batch_size=8, max_steps=6, lr=1e-2), method=name,
                          output_dir=str(out), save_every=save_every, resume_from=resume)
        Trainer(model, tok, str(data_path), cfg).train()
        return read_metrics(out)

    whole = run(tmp_path / "a", save_every=3)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert len(resumed) == len(whole) - 3  # LT-SFT: the rest of phase 1, then all of phase 2
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole[3:]]


def test_the_public_step_is_the_loops_step(tmp_path):
    """Trainer.step() is one step of train(): the same metrics file and weights after two
    steps either way; a step on batches the caller collated equals the step on the same
    batches drawn by the Trainer."""
    path = write_data(tmp_path)

    def trainer(name, steps=2):
        model, tok = tiny_setup()
        cfg = TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, progress=False,
                          max_length=32, output_dir=str(tmp_path / name), log_every=1)
        return Trainer(model, tok, str(path), cfg)

    looped = trainer("loop")
    looped.train()
    stepped = trainer("step")
    first = stepped.step()
    assert set(first) >= {"loss", "grad_norm", "tokens"} and stepped.state["step"] == 1
    assert first["loss"].item() == pytest.approx(read_metrics(tmp_path / "loop")[0]["loss"])
    stepped.step()
    for (n, a), (_, b) in zip(looped.model.named_parameters(),
                              stepped.model.named_parameters()):
        assert torch.equal(a, b), n
    given, drawn = trainer("given"), trainer("drawn")
    batches = given._next_sft_batches()  # what drawn's first step draws itself
    a, b = given.step(batches), drawn.step()
    assert torch.equal(a["loss"], b["loss"]) and a["tokens"] == b["tokens"]


@pytest.mark.parametrize("batch", [{"input_ids": [1, 2]}, [], "text", [{"prompt": "1+1="}]],
                         ids=["list-ids", "empty", "str", "prompt-rows"])
def test_a_step_on_a_batch_of_the_wrong_shape_is_one_clear_error(tmp_path, batch):
    model, tok = tiny_setup()
    cfg = TrainConfig(max_steps=1, batch_size=4, progress=False, max_length=32,
                      output_dir=str(tmp_path / "run"))
    trainer = Trainer(model, tok, str(write_data(tmp_path)), cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(fastft.FastftError, match="Trainer.step.batch. for SFT takes"):
        trainer.step(batch)
    assert trainer.state["step"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
