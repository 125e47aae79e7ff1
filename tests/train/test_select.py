"""UDS data selection: utility and sketch against materialised logits, the choice, the trainer."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastft import TrainConfig, Trainer
from fastft.errors import FastftError
from fastft.recipe import CausalLMLoss
from fastft.train import data, select

from .helpers import read_metrics, tiny_setup, write_data


def logits(hidden, weight, softcap=None, bias=None, temperature=1.0):
    """The materialised logits in fp64."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def case(B=3, S=6, H=16, V=40, seed=0, lengths=(6, 4, 1)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g)
    weight = torch.randn(V, H, generator=g) / math.sqrt(H)
    mask = torch.zeros(B, S, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return hidden, mask, weight, torch.randn(V, generator=g)


@pytest.mark.parametrize("S,H,softcap,with_bias,temperature", [
    (6, 16, None, False, 1.0),  # the sequence side (S <= H)
    (24, 8, None, False, 1.0),  # the hidden side (S > H)
    (24, 8, None, True, 2.0),  # a bias and a temperature
    (6, 16, 1.5, False, 1.0),  # softcap: the chunked Gram
    (24, 8, 1.5, True, 0.5),
])
def test_utility_is_the_nuclear_norm_of_the_masked_logits(S, H, softcap, with_bias,
                                                          temperature):
    hidden, mask, weight, b = case(S=S, H=H, lengths=(S, S // 2, 1))
    bias = b if with_bias else None
    got = select.utility(hidden, mask, weight, softcap, bias=bias, temperature=temperature)
    z = logits(hidden, weight, softcap, bias, temperature)
    want = torch.stack([torch.linalg.matrix_norm(z[i][mask[i].bool()], "nuc")
                        for i in range(len(z))])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-5)
    # chunks of the vocabulary give the same Gram
    if softcap:
        head = select._Head()
        small = select._features(hidden, mask, weight, softcap=softcap, bias=bias,
                                 temperature=temperature, head=head, proj=None, chunk=7)[0]
        torch.testing.assert_close(small, got, rtol=1e-5, atol=1e-5)


def anisotropic(S, H, V, k, seed=0):
    """Hidden states with one dominant direction (as real LM hidden states and logits
    have): its singular value is ~k sqrt(S), the others ~sqrt(S)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(H, generator=g)
    hidden = torch.randn(1, S, H, generator=g)
    hidden = hidden + k * (1 + torch.randn(1, S, 1, generator=g).abs()) * (u / u.norm())
    weight = torch.randn(V, H, generator=g) / math.sqrt(H)
    return hidden, torch.ones(1, S, dtype=torch.long), weight, torch.randn(V, generator=g)


@pytest.mark.parametrize("S,H,V,k,softcap,with_bias", [
    (48, 64, 1000, 200.0, None, False),  # the sequence side: an fp32 Gram was 2.8% low
    (48, 64, 1000, 500.0, None, True),  # 4.7% low
    (200, 64, 2000, 100.0, None, False),  # the hidden side: 0.8% low
    (48, 64, 1000, 200.0, 30.0, False),  # softcap, the chunked Gram: 1.9% low
    (200, 64, 2000, 100.0, 30.0, True),  # 9.1% low
])
def test_utility_is_exact_on_anisotropic_logits(S, H, V, k, softcap, with_bias):
    hidden, mask, weight, b = anisotropic(S, H, V, k)
    bias = b if with_bias else None
    got = select.utility(hidden, mask, weight, softcap, bias=bias)
    want = torch.linalg.matrix_norm(logits(hidden, weight, softcap, bias)[0], "nuc")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[0].double(), want, rtol=1e-4, atol=0)


def test_anisotropic_samples_rank_by_their_exact_nuclear_norms():
    """A: one singular value of 6000 and 63 of 15 (nuclear norm 6945); B: 64 of 106.25
    (6800). W has orthonormal columns, so the logits' singular values are the hidden
    states'. A wins; an fp32 Gram with a relative eigenvalue floor gave A 6000.0 < B 6800.0."""
    g = torch.Generator().manual_seed(0)
    S = H = 64
    weight = torch.linalg.qr(torch.randn(256, H, generator=g, dtype=torch.float64))[0]

    def sample(spectrum):
        u = torch.linalg.qr(torch.randn(S, S, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(H, H, generator=g, dtype=torch.float64))[0]
        return (u * torch.tensor(spectrum, dtype=torch.float64)) @ v.T

    a = sample([6000.0] + [15.0] * 63)
    b = sample([106.25] * 64)
    hidden = torch.stack([a, b]).float()
    mask = torch.ones(2, S, dtype=torch.long)
    z = logits(hidden, weight.float())
    exact = torch.stack([torch.linalg.matrix_norm(z[i], "nuc") for i in range(2)])
    torch.testing.assert_close(exact, torch.tensor([6945.0, 6800.0], dtype=torch.float64),
                               rtol=1e-6, atol=0)
    got = select.utility(hidden, mask, weight.float())
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=0)
    sel = select.UDSSelector(alpha=0.0, length=S)
    assert sel.select(hidden, mask, weight.float(), 1).tolist() == [0]


def test_the_head_cache_follows_the_weight():
    hidden, mask, weight, _ = case()
    sel = select.UDSSelector(length=8)
    u1, s1 = sel.features(hidden, mask, weight)
    weight.mul_(2.0)  # an optimizer step: in place, a new version
    u2, s2 = sel.features(hidden, mask, weight)
    torch.testing.assert_close(u2, 2 * u1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2, 2 * s1, rtol=1e-5, atol=1e-3)
    # a trained head: fused AdamW updates it in place without a new version, so its G is
    # recomputed at each selection
    w = torch.nn.Parameter(weight.clone())
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    sel = select.UDSSelector(length=8)
    sel.select(hidden, mask, w, 1)
    w.square().sum().backward()
    version = w._version
    opt.step()
    assert w._version == version  # the reason for the rounds
    got = sel.features(hidden, mask, w)[0]
    torch.testing.assert_close(got, select.utility(hidden, mask, w.detach().clone()))


def fft_sketch(z, mask, proj, r1, r2):
    """The documented FFT formulation on materialised logits z [B, S, V] (fp64)."""
    B, S, V = z.shape
    L = proj.sign_l.shape[0]
    x = z * mask.double()[..., None]
    y = torch.fft.rfft(x * proj.sign_v.double(), dim=-1).real[..., proj.cols] * math.sqrt(V / r2)
    y = F.pad(y, (0, 0, 0, L - S))  # zero rows up to the fixed length
    y = torch.fft.rfft(y * proj.sign_l.double()[:, None], dim=-2).real[:, proj.rows]
    return (y * math.sqrt(L / r1)).flatten(1)


@pytest.mark.parametrize("softcap,with_bias,V", [(None, False, 40), (None, True, 301),
                                                 (2.0, True, 301)])
def test_sketch_equals_the_fft_formulation(softcap, with_bias, V):
    hidden, mask, weight, b = case(S=7, H=12, V=V, lengths=(7, 3, 5))
    bias = b if with_bias else None
    r1, r2, L = 4, 16, 20
    got = select.sketch(hidden, mask, weight, r1, r2, seed=3, length=L, softcap=softcap,
                        bias=bias)
    proj = select.draw(V, L, r1, r2, seed=3)
    want = fft_sketch(logits(hidden, weight, softcap, bias), mask, proj, r1, r2)
    assert got.shape == (3, r1 * r2) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max())


def test_default_sketch_is_1024_numbers():
    hidden, mask, weight, _ = case(V=300)
    assert select.sketch(hidden, mask, weight, length=64).shape == (3, 1024)


def test_larger_logit_spectra_win():
    hidden, mask, weight, _ = case(B=1, lengths=(6,))
    scale = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5])
    many = hidden * scale[:, None, None]  # utility scales with the hidden states
    sel = select.UDSSelector(alpha=0.0, length=8)
    best = sel.select(many, mask.expand(5, -1), weight, 2)
    assert best.tolist() == [1, 4]
    assert sel.count == 2  # their sketches entered the queue


def test_a_duplicate_of_the_queue_loses_on_diversity():
    hidden, mask, weight, _ = case(B=1, S=6, lengths=(6,))
    perm = hidden[:, torch.tensor([3, 0, 5, 1, 4, 2])]  # same singular values, other sketch
    sel = select.UDSSelector(alpha=1.0, length=8)
    u, s = sel.features(torch.cat([hidden, perm]), mask.expand(2, -1), weight)
    torch.testing.assert_close(u[0], u[1], rtol=1e-5, atol=0)
    sel.push(s[:1])  # the queue holds the first sample's sketch
    d = sel.diversity(s)
    assert d[0] == 0 and d[1] > 0
    torch.testing.assert_close(d[1], (s[1] - s[0]).norm(), rtol=1e-5, atol=0)
    # the duplicate first: still the other one wins
    assert sel.select(torch.cat([hidden, perm]), mask.expand(2, -1), weight, 1).tolist() == [1]


def test_the_queue_is_fifo_and_round_trips():
    sel = select.UDSSelector(queue_size=3, length=8)
    sk = torch.arange(20.0).reshape(5, 4)
    assert sel.diversity(sk).tolist() == [0.0] * 5  # empty queue
    sel.push(sk[:2])
    sel.push(sk[2:])  # 5 pushed into 3 places: 3, 4, 2 remain (ring order)
    assert sel.count == 3 and sorted(sel.queue[:3, 0].tolist()) == [8.0, 12.0, 16.0]
    x = torch.zeros(1, 4)
    want = torch.stack([(x[0] - sk[i]).norm() for i in (2, 3, 4)]).mean()
    torch.testing.assert_close(sel.diversity(x)[0], want)
    other = select.UDSSelector(queue_size=3, length=8)
    other.load_state(json.loads(json.dumps(sel.state())))
    assert torch.equal(other.queue, sel.queue) and (other.ptr, other.count) == (sel.ptr, 3)


BASE = dict(batch_size=4, grad_accum=1, max_steps=2, lr=3e-3, warmup_ratio=0.0,
            schedule="constant", progress=False, max_length=16, method="full", select="uds",
            bf16="false")  # fp32 on CUDA too: the norms are checked to 1e-3


def test_trainer_trains_on_the_selected_rows(tmp_path, monkeypatch):
    tr, before, chosen, trained, taken = spy_run(monkeypatch, tmp_path, "run")
    tok = tr.tokenizer
    assert [len(t) for t in taken] == [8, 8] and len(chosen) == 2 and len(trained) == 2
    for cand, (_, _, best), ids in zip(taken, chosen, trained):
        assert len(best) == 4
        rows = [tr.rows[cand[i]] for i in best]
        assert torch.equal(ids, data.collate(rows, tok.pad_token_id)["input_ids"])
    # step 1 (empty queue): the 4 largest nuclear norms of the initial model's logits
    b = data.collate([tr.rows[j] for j in taken[0]], tok.pad_token_id)
    with torch.no_grad():
        z = before(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    nuc = torch.stack([torch.linalg.matrix_norm(z[i][b["attention_mask"][i].bool()].double(),
                                                "nuc") for i in range(8)])
    torch.testing.assert_close(chosen[0][0].double().cpu(), nuc, rtol=1e-3, atol=1e-3)
    assert chosen[0][2] == sorted(torch.topk(nuc, 4).indices.tolist())
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["state"]["uds"]["count"] == 8 and state["state"]["uds"]["dim"] == 1024


def test_resume_with_uds_equals_the_uninterrupted_run(tmp_path):
    def run(out, resume=None, save_every=0):
        model, tok = tiny_setup()
        # alpha large enough that the queue decides (a lost queue fails this test)
        cfg = TrainConfig(**dict(BASE, max_steps=4, uds_queue=6, uds_alpha=10.0),
                          output_dir=str(out), save_every=save_every, resume_from=resume)
        Trainer(model, tok, str(write_data(tmp_path, n=12)), cfg).train()
        return read_metrics(out)

    whole = run(tmp_path / "a", save_every=2)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(whole[2:], resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]


@pytest.mark.parametrize("bad", [dict(select="foo"), dict(select_ratio=0.0),
                                 dict(select_ratio=1.5), dict(uds_alpha=-1.0),
                                 dict(uds_queue=0), dict(select="uds", objective="grpo"),
                                 dict(uds_grouping="batch"), dict(uds_start_step=-1)])
def test_bad_selection_settings_are_named(bad):
    with pytest.raises(FastftError, match=next(iter(bad))):
        TrainConfig(**bad)


def grouped_choice_by_hand(u, s, size, k, alpha, queue):
    """The authors' loop: per group of ``size`` candidates, score u + alpha * (mean L2
    distance to the queue, 0 when empty), keep the k best (ties to the earlier), then push
    their sketches."""
    queue, out = [q for q in queue], []
    for g in range(0, len(u), size):
        scores = []
        for i in range(g, g + size):
            d = sum(float((s[i] - q).norm()) for q in queue) / len(queue) if queue else 0.0
            scores.append(float(u[i]) + alpha * d)
        order = sorted(range(size), key=lambda i: (-scores[i], i))[:k]
        best = sorted(g + i for i in order)
        out.append(best)
        queue += [s[i] for i in best]
    return out


def test_micro_grouping_pushes_each_groups_choice_before_the_next():
    g = torch.Generator().manual_seed(1)
    u = torch.rand(8, generator=g)
    s = torch.randn(8, 6, generator=g)
    s[4:6] = s[0] + 0.01 * torch.randn(2, 6, generator=g)  # near group 1's best, if pushed
    s[6:8] = s[0] + 5.0 * torch.randn(2, 6, generator=g)
    u[4:6] += 1.0
    alpha = 2.0
    sel = select.UDSSelector(alpha=alpha, queue_size=16, length=8)
    got = [b.tolist() for b in sel.choose_each(u, s, 4, 2)]
    want = grouped_choice_by_hand(u, s, 4, 2, alpha, [])
    assert got == want
    assert 0 in got[0] and got[1] != [4, 5]  # the push decided group 2's choice ...
    assert grouped_choice_by_hand(u[4:], s[4:], 4, 2, alpha, [])[0] == [0, 1]  # ... not u
    assert sel.count == 4
    torch.testing.assert_close(sel.queue[:4], s[got[0] + got[1]])


def spy_run(monkeypatch, tmp_path, name, **cfg):
    """Train a tiny run; the UDS choices (u, s, best) and the trained micro-batches."""
    chosen, trained, taken = [], [], []
    choose, forward, take = select.UDSSelector.choose, CausalLMLoss.forward, Trainer._take

    def spy_choose(self, u, s, k):
        out = choose(self, u, s, k)
        chosen.append((u.clone(), s.clone(), out.tolist()))
        return out

    def spy_forward(self, batch, **kw):
        trained.append(batch["input_ids"].clone().cpu())
        return forward(self, batch, **kw)

    def spy_take(self, n):
        taken.append(take(self, n))
        return taken[-1]

    monkeypatch.setattr(select.UDSSelector, "choose", spy_choose)
    monkeypatch.setattr(CausalLMLoss, "forward", spy_forward)
    monkeypatch.setattr(Trainer, "_take", spy_take)
    model, tok = tiny_setup()
    before = copy.deepcopy(model).eval()
    tr = Trainer(model, tok, str(write_data(tmp_path, n=16)),
                 TrainConfig(**{**BASE, **cfg}, output_dir=str(tmp_path / name)))
    tr.train()
    monkeypatch.undo()
    return tr, before, chosen, trained, taken


def test_trainer_selects_per_micro_batch(tmp_path, monkeypatch):
    alpha = 0.05
    tr, before, chosen, trained, taken = spy_run(
        monkeypatch, tmp_path, "micro", batch_size=2, grad_accum=2, uds_alpha=alpha)
    pad = tr.tokenizer.pad_token_id
    # 2 steps x 2 micro-batches: 4 candidates each, 2 kept each, in step order
    assert [len(t) for t in taken] == [8, 8] and len(trained) == 4
    assert [len(u) for u, _, _ in chosen] == [4, 4, 4, 4]
    for c, (_, _, best) in enumerate(chosen):
        step, m = divmod(c, 2)
        rows = [tr.rows[taken[step][4 * m + i]] for i in best]
        assert torch.equal(trained[c], data.collate(rows, pad)["input_ids"])
    # the utilities of step 1's first group: the initial model's exact nuclear norms
    b = data.collate([tr.rows[j] for j in taken[0][:4]], pad)
    with torch.no_grad():
        z = before(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    nuc = torch.stack([torch.linalg.matrix_norm(z[i][b["attention_mask"][i].bool()].double(),
                                                "nuc") for i in range(4)])
    torch.testing.assert_close(chosen[0][0].double().cpu(), nuc, rtol=1e-4, atol=1e-4)
    # each step's two groups by the authors' loop, the queue carried over from the steps before
    queue = []
    for step in range(2):
        (u1, s1, b1), (u2, s2, b2) = chosen[2 * step:2 * step + 2]
        want = grouped_choice_by_hand(torch.cat([u1, u2]).cpu(), torch.cat([s1, s2]).cpu(),
                                      4, 2, alpha, queue)
        assert [b1, [4 + i for i in b2]] == want
        queue += [s1[i].cpu() for i in b1] + [s2[i].cpu() for i in b2]


def test_plain_training_until_uds_start_step(tmp_path, monkeypatch):
    # 16 rows, one epoch: 2 plain steps of 4 rows, then one step of 8 candidates
    uds = spy_run(monkeypatch, tmp_path, "uds", max_steps=0, uds_start_step=2)
    plain = spy_run(monkeypatch, tmp_path, "plain", max_steps=2, select=None)
    tr, _, chosen, trained, taken = uds
    assert tr.total_steps == 3 and [len(t) for t in taken] == [4, 4, 8]
    assert len(chosen) == 1  # the selector first runs at step 3
    assert [t.tolist() for t in trained[:2]] == [t.tolist() for t in plain[3]]
    assert taken[:2] == plain[4]
    a, b = read_metrics(tmp_path / "uds"), read_metrics(tmp_path / "plain")
    assert [m["loss"] for m in a[:2]] == [m["loss"] for m in b]
