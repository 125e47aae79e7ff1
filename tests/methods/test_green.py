"""GreenTrainer: the DP selection against brute force, the importance probe's exact restore,
and a selected step's measured backward FLOPs within the budget."""

import copy
import itertools
import random

import pytest
import torch
import transformers

import fastft
from fastft.errors import FastftError
from fastft.methods import green_select
from fastft.methods.green import probe_importance, selection_for
from fastft.profile.green_costs import measure_costs
from fastft.profile.tracker import FlopRecorder
from fastft.recipe import CausalLMLoss, build_optimizer
from fastft.train import TrainConfig


@pytest.mark.parametrize("seed", range(60))
def test_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    imp = [rng.uniform(-0.3, 1.0) for _ in range(n)]
    dw = [rng.randint(0, 25) for _ in range(n)]
    dy = [rng.randint(0, 25) for _ in range(n)]
    budget = rng.randint(0, 150)
    got = green_select.select(imp, dw, dy, budget)
    assert green_select.cost(got, dw, dy) <= budget
    best = None
    for bits in itertools.product([False, True], repeat=n):
        if any(bits) and green_select.cost(bits, dw, dy) <= budget:
            v = sum(i for i, b in zip(imp, bits) if b)
            best = v if best is None else max(best, v)
    if best is None:
        assert not any(got)
    else:
        assert sum(i for i, b in zip(imp, got) if b) == pytest.approx(best, abs=1e-12)


def test_cost_formula_written_out():
    # tensors 0..3; selecting 1 and 3: dy paid from 1 on, dw of 1 and 3
    assert green_select.cost([False, True, False, True], [1, 2, 4, 8], [10, 20, 40, 80]) == \
        20 + 40 + 80 + 2 + 8


def test_backward_budget():
    assert green_select.backward_budget(0.5, 1.0, 2.0) == pytest.approx(0.25)
    assert green_select.backward_budget(0.2, 1.0, 2.0) == 0.05  # the floor


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).train()


def setup(base):
    model = tiny()
    method = fastft.GreenTrainer(rho=0.5, base=base)
    fastft.prepare(model, method)
    lm = CausalLMLoss(model, TrainConfig())
    opt = build_optimizer(method, model, TrainConfig(lr=1e-2))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (4, 16), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}

    def backward():
        loss, _ = lm(batch, num_items=torch.tensor(64.0))
        loss.backward()
    return model, method, opt, backward, batch


@pytest.mark.parametrize("base", [fastft.Full(), fastft.LoRA(r=4)], ids=["full", "lora"])
def test_probe_restores_weights_and_optimizer_state_bit_for_bit(base):
    model, method, opt, backward, _ = setup(base)
    for _ in range(2):  # a non-trivial optimizer state
        backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    w = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    imp = probe_importance(params, opt, backward)
    assert imp.abs().max() == 1.0 and len(imp) == len(params)
    assert all(torch.equal(a, b) for a, b in zip(params, w))
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for k, st in state["state"].items():
        for key, v in st.items():
            assert torch.equal(after["state"][k][key], v), (k, key)
    assert all(p.grad is None for p in params)


def test_selected_step_backward_flops_within_the_budget():
    model, method, opt, backward, batch = setup(fastft.Full())
    costs = measure_costs(model.config, method.base, batch_size=4, seq_len=16,
                          dtype=torch.float32)
    assert sorted(costs.names) == sorted(n for n, p in model.named_parameters())
    # in the order they run: the embeddings first, a layer's norm before its q_proj, the head last
    assert costs.names[0] == "model.embed_tokens.weight" and costs.names[-1] == "lm_head.weight"
    assert costs.names.index("model.layers.0.input_layernorm.weight") < \
        costs.names.index("model.layers.0.self_attn.q_proj.weight") < \
        costs.names.index("model.layers.1.self_attn.q_proj.weight")
    params = dict(model.named_parameters())
    imp = probe_importance([params[n] for n in costs.names], opt, backward).tolist()
    mask = selection_for(costs, imp, 0.5)
    assert any(mask) and not all(mask)
    for n, m in zip(costs.names, mask):
        params[n].requires_grad_(m)
    rec = FlopRecorder()
    with rec:
        rec.phase = "forward"
        loss, _ = CausalLMLoss(model, TrainConfig())(batch, num_items=torch.tensor(64.0))
        rec.phase = "backward"
        loss.backward()
    rho_bp = green_select.backward_budget(0.5, costs.t_fp, costs.t_bp)
    assert rec.phase_total("backward") <= rho_bp * costs.t_bp
    assert rec.phase_total("forward") == costs.t_fp
    # what was not selected got no gradient
    for n, m in zip(costs.names, mask):
        assert (params[n].grad is not None) == m


def test_green_trains_in_the_trainer(tmp_path):
    from fastft.demo import arithmetic as ar

    tok = ar.tokenizer()
    model = ar.model(tok, hidden=32, layers=2, seed=0)
    pairs = ar.problems(64, seed=2)
    data = tmp_path / "d.jsonl"
    import json
    data.write_text("".join(json.dumps(r) + "\n" for r in ar.sft_records(pairs)))
    cfg = TrainConfig(method="green", rho=0.5, green_interval=1, lr=1e-3, batch_size=16,
                      max_steps=8, max_length=32, output_dir=str(tmp_path / "run"),
                      progress=False)
    tr = fastft.Trainer(model, tok, str(data), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr.train()
    sel = set(tr.method.selected)
    assert sel and len(tr.method.importance) == len(before)
    for n, p in model.named_parameters():  # the last selection's unselected never moved
        if n not in sel and n in before and tr.method._epoch == 0:
            assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("kwargs", [dict(rho=0.0), dict(rho=1.5), dict(rho="0.5"),
                                    dict(interval=0), dict(base=fastft.LIFT())])
def test_bad_settings(kwargs):
    with pytest.raises(FastftError):
        fastft.GreenTrainer(**kwargs)


def test_resume_keeps_the_selection(tmp_path):
    import json

    from fastft.demo import arithmetic as ar

    tok = ar.tokenizer()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n"
                            for r in ar.sft_records(ar.problems(64, seed=2))))
    common = dict(method="green", rho=0.5, green_interval=2, lr=1e-3, batch_size=16,
                  max_length=32, progress=False, save_every=4)

    def run(out, steps, resume=None):
        model = ar.model(tok, hidden=32, layers=2, seed=0)
        cfg = TrainConfig(max_steps=steps, output_dir=str(out), resume_from=resume, **common)
        tr = fastft.Trainer(model, tok, str(data), cfg)
        tr.train()
        return tr, model

    straight, m1 = run(tmp_path / "a", 8)
    resumed, m2 = run(tmp_path / "b", 8)  # same run, then resumed from its step 4
    again, m3 = run(tmp_path / "c", 8, resume=str(tmp_path / "b" / "checkpoint-4"))
    assert again.method.selected == straight.method.selected
    assert [h["steps"] for h in again.method.history] == \
        [h["steps"] for h in straight.method.history]
    for (n, a), b in zip(m1.named_parameters(), m3.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
