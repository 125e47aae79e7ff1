"""Masked Thought and key-token weighted SFT, through the trainer, against formulas written here."""

import json

import pytest
import torch
import torch.nn.functional as F

from fastft import FastftError, TrainConfig, Trainer
from fastft.train import data
from fastft.train.key_tokens import weights_from_mask

from .helpers import read_metrics, tiny_setup, write_data


def trainer(tmp_path, n=16, **cfg):
    model, tok = tiny_setup()
    config = TrainConfig(**{**dict(batch_size=8, max_steps=30, progress=False, max_length=32,
                                   output_dir=str(tmp_path / "run")), **cfg})
    return Trainer(model, tok, str(write_data(tmp_path, n=n)), config)


def test_masked_thought_rate_ramp_and_untouched_labels(tmp_path):
    t = trainer(tmp_path, masked_thought=0.4)
    rows = t.rows * 40
    batch = data.collate(rows, t.tokenizer.pad_token_id)
    completion = batch["labels"] != -100
    for step, p in ((0, 0.0), (10, 0.2), (20, 0.4), (29, 0.4)):  # ramp over 2/3 of 30 steps
        t.state["step"] = step
        out = t._masked_thought(batch, 0)
        masked = out["input_ids"] != batch["input_ids"]
        assert torch.equal(out["labels"], batch["labels"])
        assert not bool((masked & ~completion).any())  # prompt and padding never
        rate = float(masked.sum() / completion.sum())
        assert abs(rate - p) < 0.03, (step, rate, p)
        assert bool((out["input_ids"][masked] == t.mask_token_id).all())
        again = t._masked_thought(batch, 0)  # deterministic from (seed, step, micro-batch)
        assert torch.equal(again["input_ids"], out["input_ids"])


def test_masked_thought_resumes_exactly(tmp_path):
    def run(out, steps, resume=None, save_every=0):
        cfg = dict(max_steps=steps, batch_size=4, masked_thought=0.3, output_dir=str(out),
                   save_every=save_every, resume_from=resume, warmup_ratio=0.0, lr=3e-3)
        model, tok = tiny_setup()
        Trainer(model, tok, str(write_data(tmp_path, n=12)), TrainConfig(
            progress=False, max_length=32, **cfg)).train()
        return read_metrics(out)

    whole = run(tmp_path / "a", 6, save_every=3)
    resumed = run(tmp_path / "b", 6, resume=str(tmp_path / "a" / "checkpoint-3"))
    assert [m["loss"] for m in whole[3:]] == [m["loss"] for m in resumed]


def test_key_token_weights_formula():
    assert weights_from_mask([True, False, False, False], 9.0) == [3.0, 1.0, 1.0, 1.0]
    assert weights_from_mask([True] + [False] * 20, 9.0)[0] == 9.0  # capped
    assert weights_from_mask([True, True, False], 9.0) == [1.0, 1.0, 1.0]  # N_key >= N_other
    assert weights_from_mask([False, False], 9.0) == [1.0, 1.0]


def weighted_loss_by_hand(model, batch):
    """sum(w CE) / sum(w) over the predicted tokens, on the model's own logits."""
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    w = batch["weights"][:, 1:] * (labels != -100)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                         reduction="none")
    return float((w * ce).sum() / w.sum())


def test_key_token_weighted_loss_through_the_trainer(tmp_path):
    path = tmp_path / "keys.jsonl"
    rows = [{"prompt": "12+30=", "completion": "the answer is 42", "key_spans": [[14, 16]]},
            {"prompt": "1+1=", "completion": "it is 2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = tiny_setup()
    t = Trainer(model, tok, str(path), TrainConfig(batch_size=2, max_steps=1, lr=1e-9,
                                                   progress=False, max_length=64, method="full",
                                                   key_tokens=r"\d+",
                                                   output_dir=str(tmp_path / "run")))
    batch = data.collate(t.rows, tok.pad_token_id)
    w = batch["weights"]
    key = w[0] > 1.0
    n_comp = int((batch["labels"][0] != -100).sum())
    n_key = int(key.sum())
    assert n_key == 2 and torch.allclose(w[0][key], torch.tensor((n_comp - n_key) / n_key))
    assert int((w[1] > 1).sum()) == 1  # the regex marks "2" in the second
    expect = weighted_loss_by_hand(model, batch)
    loss = t.train()["final_loss"]
    assert abs(loss - expect) <= 1e-5 * abs(expect)


def test_all_ones_weights_equal_the_unweighted_loss(tmp_path):
    model, tok = tiny_setup()
    comp = ["4", " ", "2"]
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"prompt": "40+2=", "completion": "".join(comp),
                                "weights": [1.0] * 3}) + "\n")
    plain = tmp_path / "p.jsonl"
    plain.write_text(json.dumps({"prompt": "40+2=", "completion": "".join(comp)}) + "\n")
    common = dict(batch_size=1, max_steps=1, lr=1e-9, progress=False, max_length=32)
    a = Trainer(model, tok, str(path), TrainConfig(**common, output_dir=str(tmp_path / "a")))
    b = Trainer(model, tok, str(plain), TrainConfig(**common, output_dir=str(tmp_path / "b")))
    assert "weights" in a.rows[0]
    assert abs(a.train()["final_loss"] - b.train()["final_loss"]) < 1e-6


def test_bad_recipe_values(tmp_path):
    with pytest.raises(FastftError, match="masked_thought .a probability. must be in"):
        TrainConfig(masked_thought=1.0)
    with pytest.raises(FastftError, match="is not a valid regex"):
        TrainConfig(key_tokens="(")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "bc", "weights": [1.0] * 5}) + "\n")
    model, tok = tiny_setup()
    with pytest.raises(FastftError, match="'weights' has 5 numbers but the completion has 2"):
        Trainer(model, tok, str(path), TrainConfig(output_dir=str(tmp_path / "r")))
