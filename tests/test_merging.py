"""Model soups and LiNeS (fastft/merging.py, fastft/soups.py) on tiny Llamas, checked against
the formulas computed here: the soup of one model is the model, bit for bit; a uniform soup is
the mean; a greedy soup keeps the sort order and the strict-improvement rule; LiNeS scales
the update of each block by alpha + beta l / (L - 1); adapters merged on the fly give what
merging them first gives; each input is read one tensor at a time."""

import json
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastft import merging, soups
from fastft.cli import main
from fastft.errors import FastftError

from .train.helpers import tiny_setup, write_data


def save_model(folder, seed=0, layers=3, dtype=None, **kw):
    model, tok = tiny_setup(seed=seed, layers=layers, **kw)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Four tiny 3-layer Llamas (different seeds) as model folders."""
    root = tmp_path_factory.mktemp("models")
    return [save_model(root / f"m{i}", seed=i) for i in range(4)]


def test_soup_of_one_model_is_the_model(models, tmp_path):
    out = soups.uniform_soup([models[1]], tmp_path / "soup")
    got, want = weights(out), weights(models[1])
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (models[1] / name).read_bytes()
    bf16 = save_model(tmp_path / "bf16", seed=5, dtype=torch.bfloat16)
    got, want = weights(soups.uniform_soup([bf16], tmp_path / "soup16")), weights(bf16)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)


def test_sharded_input_is_read_through_its_index(models, tmp_path):
    model, tok = tiny_setup(seed=1, layers=3)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    tok.save_pretrained(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    got = weights(soups.uniform_soup([tmp_path / "sharded", models[2]], tmp_path / "soup"))
    one, two = model.state_dict(), weights(models[2])
    assert all(torch.equal(got[k], (one[k] + two[k]) / 2) for k in two)


def test_run_folder_takes_its_newest_checkpoint(models, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    shutil.copytree(models[0], run / "checkpoint-2")
    shutil.copytree(models[2], run / "checkpoint-10")  # newer: 10 > 2, not by name
    got, want = weights(soups.uniform_soup([run], tmp_path / "soup")), weights(models[2])
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_uniform_soup_is_the_mean(models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = soups.uniform_soup(models[:3], tmp_path / "soup")
    got, w = weights(out), [weights(m) for m in models[:3]]
    for k in w[0]:
        assert torch.equal(got[k], (w[0][k] + w[1][k] + w[2][k]) / 3), k
    assert json.loads((out / "fastft_merge.json").read_text()) == {
        "method": "uniform soup", "inputs": [str(m) for m in models[:3]]}
    model = AutoModelForCausalLM.from_pretrained(out)  # a transformers model folder
    torch.testing.assert_close(model.model.layers[2].mlp.up_proj.weight,
                               got["model.layers.2.mlp.up_proj.weight"], rtol=0, atol=0)
    assert not list(tmp_path.glob(".soup*"))  # no temporary folder left


def test_greedy_soup_keeps_the_sort_order_and_strict_improvement(models, tmp_path):
    """A stub eval_fn with known scores: each model alone, and each candidate soup by its
    members (read from the recipe the candidate folder holds)."""
    m = [str(p) for p in models]
    alone = {m[0]: 0.1, m[1]: 0.5, m[2]: 0.3, m[3]: 0.2}  # order: m1, m2, m3, m0
    soup = {frozenset([m[1], m[2]]): 0.6,  # better than 0.5: kept
            frozenset([m[1], m[2], m[3]]): 0.6,  # equal, not strictly better: left out
            frozenset([m[1], m[2], m[0]]): 0.65}  # better: kept
    calls = []

    def eval_fn(folder):
        if str(folder) in alone:
            calls.append(str(folder))
            return alone[str(folder)]
        members = json.loads((folder / "fastft_merge.json").read_text())["inputs"]
        calls.append(members)
        return soup[frozenset(members)]

    r = soups.greedy_soup(m, tmp_path / "soup", eval_fn)
    assert calls == [m[0], m[1], m[2], m[3], [m[1], m[2]], [m[1], m[2], m[3]],
                     [m[1], m[2], m[0]]]
    assert r["order"] == [m[1], m[2], m[3], m[0]] and r["kept"] == [m[1], m[2], m[0]]
    assert r["soup_score"] == 0.65 and [t["kept"] for t in r["trials"]] == [True, False, True]
    got, w = weights(tmp_path / "soup"), [weights(p) for p in models]
    for k in w[0]:
        assert torch.equal(got[k], (w[1][k] + w[2][k] + w[0][k]) / 3), k
    assert json.loads((tmp_path / "soup" / "fastft_merge.json").read_text())["kept"] == r["kept"]
    assert not list(tmp_path.glob(".soup*"))


def test_heldout_score_is_minus_the_models_own_loss(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastft.train import data

    path = write_data(tmp_path, n=6)
    score = soups.heldout_score(path, models[0], max_length=64, batch_size=16)(models[0])
    tok = AutoTokenizer.from_pretrained(models[0])
    rows, _ = data.tokenize_sft(data.read_records(path), tok, max_length=64, truncation=True,
                                completion_only=True, skip_invalid=False)
    batch = data.collate(rows, tok.pad_token_id)
    with torch.no_grad():
        loss = AutoModelForCausalLM.from_pretrained(models[0])(**batch).loss
    # on CUDA the score comes from the GPU (another summation order than this CPU loss)
    assert score == pytest.approx(-float(loss), rel=1e-4 if torch.cuda.is_available() else 1e-5)


def test_greedy_soup_from_the_command_line(models, tmp_path, capsys):
    path = write_data(tmp_path, n=6)
    assert main(["soup", *map(str, models[:3]), "--out", str(tmp_path / "soup"), "--greedy",
                 "--eval-data", str(path), "--max-length", "64"]) == 0
    recipe = json.loads((tmp_path / "soup" / "fastft_merge.json").read_text())
    assert recipe["order"] == sorted(recipe["scores"], key=lambda k: -recipe["scores"][k])
    assert recipe["kept"][0] == recipe["order"][0]
    score = soups.heldout_score(path, models[0], max_length=64)(tmp_path / "soup")
    assert score == pytest.approx(recipe["soup_score"], rel=1e-5)
    assert "greedy soup of" in capsys.readouterr().out


def expected_lines(base, tuned, alpha, beta, n_layers):
    """The authors' LiNeS_scaling, per tensor: alpha + beta l / (L - 1) for a tensor of block
    l, alpha for every tensor outside the blocks (embeddings, final norm, head); a factor of
    exactly 1 copies the fine-tuned tensor (as documented)."""
    out = {}
    for k in tuned:
        s = alpha + beta * int(k.split(".")[2]) / (n_layers - 1) if ".layers." in k else alpha
        delta = tuned[k].float() - base[k].float()
        out[k] = tuned[k] if s == 1 else (base[k].float() + s * delta).to(tuned[k].dtype)
    return out


def test_lines_ends_and_the_formula_per_layer(models, tmp_path):
    base, tuned = weights(models[0]), weights(models[1])
    got = weights(merging.lines(models[0], models[1], tmp_path / "one", alpha=1.0, beta=0.0))
    assert all(torch.equal(got[k], tuned[k]) for k in tuned)
    got = weights(merging.lines(models[0], models[1], tmp_path / "zero", alpha=0, beta=0))
    assert all(torch.equal(got[k], base[k]) for k in base)
    for alpha, beta in ((0.3, None), (0.2, 0.5)):
        out = merging.lines(models[0], models[1], tmp_path / f"mid{alpha}", alpha, beta)
        got = weights(out)
        want = expected_lines(base, tuned, alpha, 1 - alpha if beta is None else beta, 3)
        assert all(torch.equal(got[k], want[k]) for k in want)
        factors = json.loads((out / "fastft_merge.json").read_text())["factors"]
        b = 1 - alpha if beta is None else beta
        assert factors == pytest.approx([alpha, alpha + b / 2, alpha + b])
    # the middle block really is scaled by its own factor, not its neighbours'
    k = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(got[k] - base[k], 0.45 * (tuned[k] - base[k]))


def test_lines_block_names():
    assert merging.layer_of("transformer.h.7.attn.c_attn.weight", 12) == 7
    assert merging.layer_of("model.layers.3.mlp.experts.5.w1.weight", 12) == 3
    assert merging.layer_of("encoder.layer.2.output.dense.weight", 12) == 2
    assert merging.layer_of("transformer.wte.weight", 12) == 0
    assert merging.layer_of("model.embed_tokens.weight", 12) == 0
    assert merging.layer_of("transformer.ln_f.weight", 12) == 0
    assert merging.layer_of("model.norm.weight", 12) == 0
    assert merging.layer_of("lm_head.weight", 12) == 0
    assert merging.layer_of("gpt_neox.embed_out.weight", 12) == 0
    assert merging.layer_of("model.vision_proj.weight", 12) is None


def with_extra(src, dst, name, value, **more):
    shutil.copytree(src, dst)
    w = weights(dst)
    w[name] = value
    w.update(more)
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_lines_scales_everything_outside_the_blocks_by_alpha(models, tmp_path):
    """An untied head and a fine-tuned final norm: they, like the embeddings, get alpha, the
    factor of the authors' LiNeS_scaling for every tensor with no block index."""
    def untied(src, dst, seed):
        g = torch.Generator().manual_seed(seed)
        w = weights(src)
        head = torch.randn(w["model.embed_tokens.weight"].shape, generator=g)
        norm = 1 + 0.1 * torch.randn(w["model.norm.weight"].shape, generator=g)
        return with_extra(src, dst, "lm_head.weight", head, **{"model.norm.weight": norm})

    base_dir, tuned_dir = untied(models[0], tmp_path / "b", 1), untied(models[1], tmp_path / "t", 2)
    base, tuned = weights(base_dir), weights(tuned_dir)
    got = weights(merging.lines(base_dir, tuned_dir, tmp_path / "out", 0.2, 0.5))
    want = expected_lines(base, tuned, 0.2, 0.5, 3)
    assert all(torch.equal(got[k], want[k]) for k in want)
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert not torch.equal(tuned[k], base[k])
        torch.testing.assert_close(got[k] - base[k], 0.2 * (tuned[k] - base[k]))
    recipe = json.loads((tmp_path / "out" / "fastft_merge.json").read_text())
    assert recipe["outside"] == 0.2 and recipe["factors"] == pytest.approx([0.2, 0.45, 0.7])


def test_lines_parameter_in_no_block_must_be_unchanged(models, tmp_path):
    base = with_extra(models[0], tmp_path / "b", "model.extra_scale", torch.ones(4))
    same = with_extra(models[1], tmp_path / "same", "model.extra_scale", torch.ones(4))
    got = weights(merging.lines(base, same, tmp_path / "out", 0.5))
    assert torch.equal(got["model.extra_scale"], torch.ones(4))
    changed = with_extra(models[1], tmp_path / "changed", "model.extra_scale", torch.zeros(4))
    with pytest.raises(FastftError, match="cannot place model.extra_scale in a block"):
        merging.lines(base, changed, tmp_path / "out2", 0.5)
    assert not (tmp_path / "out2").exists()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, models):
    """Two LoRA checkpoints (adapter/ with the tokenizer) of models[0], and each merged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fastft

    root = tmp_path_factory.mktemp("adapters")
    tok = AutoTokenizer.from_pretrained(models[0])
    made, merged = [], []
    for i in range(2):
        torch.manual_seed(10 + i)
        model = AutoModelForCausalLM.from_pretrained(models[0])
        fastft.prepare(model, fastft.LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj",
                                                                        "down_proj"]))
        for layer in fastft.methods.lora.adapter_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.5)
        ckpt = root / f"run{i}" / "checkpoint-3"
        fastft.save_adapter(model, ckpt / "adapter")
        tok.save_pretrained(ckpt / "adapter")
        fastft.merge(model).save_pretrained(root / f"merged{i}")
        tok.save_pretrained(root / f"merged{i}")
        made.append(ckpt.parent)
        merged.append(root / f"merged{i}")
    return made, merged


def test_adapters_merged_on_the_fly_give_the_soup_of_the_merged(models, adapters, tmp_path):
    made, merged = adapters
    cfg = json.loads((made[0] / "checkpoint-3" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(models[0])  # the base from the config
    got = weights(soups.uniform_soup(made, tmp_path / "fly"))
    want = weights(soups.uniform_soup(merged, tmp_path / "first"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "fly" / "tokenizer.json").is_file()
    one = weights(soups.uniform_soup([made[0]], tmp_path / "one", base=models[0]))  # --base
    assert all(torch.equal(one[k], v) for k, v in weights(merged[0]).items())
    lines = weights(merging.lines(models[0], made[1], tmp_path / "lines", 1.0, 0.0))
    assert all(torch.equal(lines[k], v) for k, v in weights(merged[1]).items())


def test_each_input_is_read_one_tensor_at_a_time(models, adapters, tmp_path, monkeypatch):
    """No input has two of its tensors alive at once (counted with weak references)."""
    live, peak, read, kept = {}, {}, {}, []
    get = merging.FullModel.get

    def counted(self, name):
        t = get(self, name)
        key = id(self)
        kept.append(self)  # alive, so that no later input gets its id
        live[key] = live.get(key, 0) + 1
        peak[key] = max(peak.get(key, 0), live[key])
        read[key] = read.get(key, 0) + 1

        def gone():
            live[key] -= 1
        weakref.finalize(t, gone)
        return t

    monkeypatch.setattr(merging.FullModel, "get", counted)
    soups.uniform_soup(models[:3], tmp_path / "soup")
    assert len(peak) == 3 and max(peak.values()) == 1 and set(read.values()) == {len(weights(models[0]))}
    peak.clear()
    soups.uniform_soup(adapters[0], tmp_path / "adapters")
    merging.lines(models[0], models[1], tmp_path / "lines", 0.4)
    assert len(peak) == 4 and max(peak.values()) == 1


@pytest.mark.parametrize("bad", [float("nan"), None, "0.5", torch.ones(2)])
def test_greedy_soup_eval_fn_must_return_a_finite_number(models, tmp_path, bad):
    with pytest.raises(FastftError, match="eval_fn returned .* it must return a finite number"):
        soups.greedy_soup(models[:2], tmp_path / "soup", lambda folder: bad)
    assert not (tmp_path / "soup").exists() and not list(tmp_path.glob(".soup*"))
