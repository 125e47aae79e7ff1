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


def test_masked_thought_masks_only_the_completion_when_the_prompt_is_learnt(tmp_path):
    # completion_only=False labels the prompt too; the paper masks only the response
    t = trainer(tmp_path, masked_thought=0.5, completion_only=False)
    batch = data.collate(t.rows * 20, t.tokenizer.pad_token_id)
    prompt = torch.zeros_like(batch["labels"], dtype=torch.bool)
    for i, r in enumerate(t.rows * 20):
        prompt[i, :r["prompt_len"]] = True
    assert bool(((batch["labels"] != -100) & prompt).any())  # the prompt is labelled
    t.state["step"] = t.total_steps
    out = t._masked_thought(batch, 0)
    masked = out["input_ids"] != batch["input_ids"]
    assert not bool((masked & prompt).any())
    completion = batch["completion_tokens"]
    assert torch.equal(completion, ~prompt & batch["attention_mask"].bool())
    assert abs(float(masked.sum() / completion.sum()) - 0.5) < 0.03


def test_masked_thought_on_packed_rows_masks_only_completions(tmp_path):
    t = trainer(tmp_path, masked_thought=0.5, completion_only=False)
    packed = data.collate_packed(t.rows, t.tokenizer.pad_token_id, max_length=64)
    want = torch.zeros_like(packed["completion_tokens"])
    row, at = 0, 0
    for r in t.rows:  # the packing rule: a new row when the next example does not fit
        if at + len(r["input_ids"]) > 64:
            row, at = row + 1, 0
        want[row, at + r["prompt_len"]:at + len(r["input_ids"])] = True
        at += len(r["input_ids"])
    assert torch.equal(packed["completion_tokens"], want)


class PadIsEos:
    """A tokenizer like Llama-3's and Qwen's: pad is EOS, no unk."""

    def __init__(self, tok, unk=None):
        self.tok, self.unk_token_id = tok, unk
        self.pad_token_id = self.eos_token_id = tok.eos_token_id

    def __len__(self):
        return len(self.tok)


def test_the_mask_token_is_unk_else_named_never_pad_or_eos():
    from fastft.train.trainer import mask_token

    _, tok = tiny_setup()
    assert mask_token(TrainConfig(masked_thought=0.1), tok) == tok.unk_token_id
    assert mask_token(TrainConfig(masked_thought=0.1, mask_token_id=7), tok) == 7
    llama3 = PadIsEos(tok)
    with pytest.raises(FastftError, match="no unk.*--mask-token-id"):
        mask_token(TrainConfig(masked_thought=0.1), llama3)
    with pytest.raises(FastftError, match="unk=.* is its pad/EOS.*--mask-token-id"):
        mask_token(TrainConfig(masked_thought=0.1), PadIsEos(tok, unk=tok.eos_token_id))
    with pytest.raises(FastftError, match="is the tokenizer's pad/EOS token"):
        mask_token(TrainConfig(masked_thought=0.1, mask_token_id=tok.eos_token_id), llama3)
    for bad, name in ((tok.eos_token_id, "EOS"), (tok.pad_token_id, "pad")):
        with pytest.raises(FastftError, match=f"is the tokenizer's {name} token"):
            mask_token(TrainConfig(masked_thought=0.1, mask_token_id=bad), tok)
    with pytest.raises(FastftError, match="outside the tokenizer"):
        mask_token(TrainConfig(masked_thought=0.1, mask_token_id=len(tok)), tok)
    assert mask_token(TrainConfig(masked_thought=0.1, mask_token_id=5), llama3) == 5


def test_a_trainer_without_a_mask_token_stops_before_training(tmp_path):
    model, tok = tiny_setup()
    tok.unk_token = None
    tok.pad_token = tok.eos_token
    with pytest.raises(FastftError, match="--mask-token-id"):
        Trainer(model, tok, str(write_data(tmp_path)),
                TrainConfig(masked_thought=0.2, output_dir=str(tmp_path / "r")))


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


def weighted_ce_by_hand(model, batch):
    """(w, CE) at the predicted tokens (0 elsewhere), on the model's own logits, with the
    TL-Training weights min(N_other / N_key, 9) recomputed here from the key mask."""
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                         reduction="none")
    return labels != -100, ce


def key_weights_by_hand(batch, key_chars):
    """The raw weights: min(N_other / N_key, 9) on the key tokens of each completion."""
    labels = batch["labels"][:, 1:]
    w = torch.zeros(labels.shape)
    for i, keys in enumerate(key_chars):
        comp = labels[i] != -100
        n_comp, n_key = int(comp.sum()), len(keys)
        w[i][comp] = 1.0
        pos = comp.nonzero()[:, 0]
        for p in keys:  # the p-th completion token is a key token
            w[i, pos[p]] = min((n_comp - n_key) / n_key, 9.0)
    return w


KEY_ROWS = [{"prompt": "12+30=", "completion": "the answer is 42", "key_spans": [[14, 16]]},
            {"prompt": "1+1=", "completion": "it is 2"}]
KEY_CHARS = [[14, 15], [6]]  # the digits' tokens in each completion (character tokens)


def key_trainer(tmp_path, **cfg):
    path = tmp_path / "keys.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in KEY_ROWS))
    model, tok = tiny_setup()
    return model, Trainer(model, tok, str(path), TrainConfig(
        batch_size=1, grad_accum=2, max_steps=1, lr=1e-9, progress=False, max_length=64,
        method="full", key_tokens=r"\d+", output_dir=str(tmp_path / "run"), **cfg))


def test_key_token_loss_per_sample_is_the_mean_of_each_samples_weighted_mean(tmp_path):
    # TL-Training (the default key_norm="sample"): sum_i(w CE) / sum_i(w) per sample, then
    # the mean over samples; over two micro-batches of one sample each
    model, t = key_trainer(tmp_path)
    batch = data.collate(t.rows, t.tokenizer.pad_token_id)
    predicted, ce = weighted_ce_by_hand(model, batch)
    w = key_weights_by_hand(batch, KEY_CHARS)
    per_sample = (w * ce).sum(1) / w.sum(1)
    expect = float(per_sample.mean())
    step_form = float((w * ce).sum() / w.sum())
    assert abs(expect - step_form) > 1e-3  # the two forms differ on these rows
    assert torch.allclose(batch["weights"][:, 1:] * predicted, w / w.sum(1, keepdim=True))
    loss = t.train()["final_loss"]
    assert abs(loss - expect) <= 1e-5 * abs(expect)


def test_key_token_loss_over_the_step(tmp_path):
    model, t = key_trainer(tmp_path, key_norm="step")
    batch = data.collate(t.rows, t.tokenizer.pad_token_id)
    predicted, ce = weighted_ce_by_hand(model, batch)
    w = key_weights_by_hand(batch, KEY_CHARS)
    assert torch.allclose(batch["weights"][:, 1:] * predicted, w)
    expect = float((w * ce).sum() / w.sum())
    loss = t.train()["final_loss"]
    assert abs(loss - expect) <= 1e-5 * abs(expect)


def test_per_sample_form_weighs_unmarked_records_as_samples_too(tmp_path):
    # one record with key spans, one without and no regex: under "sample" both count once
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(KEY_ROWS[0]) + "\n" + json.dumps(
        {"prompt": "3+4=", "completion": "seven, it is"}) + "\n")
    model, tok = tiny_setup()
    rows, _ = data.tokenize_sft(data.read_records(str(path)), tok, max_length=64,
                                truncation=True, completion_only=True, skip_invalid=False)
    batch = data.collate(rows, tok.pad_token_id)
    assert torch.allclose(data.item_weight(batch), torch.tensor(2.0))


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
    with pytest.raises(FastftError, match="key_norm must be sample or step"):
        TrainConfig(key_norm="token")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "bc", "weights": [1.0] * 5}) + "\n")
    model, tok = tiny_setup()
    with pytest.raises(FastftError, match="'weights' has 5 numbers but the completion has 2"):
        Trainer(model, tok, str(path), TrainConfig(output_dir=str(tmp_path / "r")))
