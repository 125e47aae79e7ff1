"""Bad input to the fused losses gets one clear FastftError naming the problem."""

import pytest
import torch

import fastft
from fastft import FastftError


def args(T=5, H=8, V=20):
    return torch.randn(T, H), torch.randn(V, H), torch.randint(0, V, (T,))


@pytest.mark.parametrize("mutate,words", [
    (lambda h, w, y: (torch.randn(5, 7), w, y), "hidden size 7"),
    (lambda h, w, y: (h, w, y[:4]), "labels has shape (4,)"),
    (lambda h, w, y: (h, w, y.float()), "integer token ids"),
    (lambda h, w, y: (h, w, torch.tensor([0, 1, 20, 3, 4])), "outside [0, 20)"),
    (lambda h, w, y: (h, w, torch.tensor([0, -5, 2, 3, 4])), "outside [0, 20)"),
    (lambda h, w, y: (h.half(), w, y), "cast one to the other"),
    (lambda h, w, y: (h, w[0], y), "output head [V, H]"),
])
def test_bad_tensors(mutate, words):
    h, w, y = mutate(*args())
    with pytest.raises(FastftError, match=words.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        fastft.losses.cross_entropy(h, w, y)


@pytest.mark.parametrize("kw,words", [
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(softcap=-1.0), "softcap must be > 0"),
    (dict(label_smoothing=1.0), "label_smoothing must be in"),
    (dict(reduction="sum", num_items_in_batch=4), "num_items_in_batch sets the divisor"),
    (dict(weights=torch.ones(3)), "one value per row"),
])
def test_bad_options(kw, words):
    with pytest.raises(FastftError, match=words):
        fastft.losses.cross_entropy(*args(), **kw)


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "cudnn")
    with pytest.raises(FastftError, match="not a backend"):
        fastft.losses.cross_entropy(*args())


def rollout_args(B=2, S=3, H=8, V=20):
    return (torch.randn(B, S, H), torch.randn(V, H), torch.randint(0, V, (B, S)),
            torch.randn(B)), dict(mask=torch.ones(B, S))


@pytest.mark.parametrize("change,words", [
    (lambda a, k: ((a[0], a[1], a[2], torch.randn(3)), k), r"advantages must have one value per "
     r"sequence, shape \(2,\)"),
    (lambda a, k: (a, dict(mask=torch.ones(2, 4))), r"mask must have shape \(2, 3\)"),
    (lambda a, k: (a, dict(k, loss_type="ppo")), "loss_type must be one of"),
    (lambda a, k: (a, dict(k, importance_level="seq")), "importance_level must be"),
    (lambda a, k: (a, dict(k, temperature=-1.0)), "temperature must be > 0"),
    (lambda a, k: (a, dict(k, beta=0.1)), "pass ref_logps"),
    (lambda a, k: (a, dict(k, old_logps=torch.zeros(2, 2))), r"old_logps must have shape"),
    (lambda a, k: ((a[0][0], *a[1:]), k), r"hidden must be \[B, S, H\]"),
    (lambda a, k: ((a[0], a[1], a[2].float(), a[3]), k), "integer token ids"),
    (lambda a, k: ((a[0], a[1], a[2] + 20, a[3]), k), r"outside \[0, 20\)"),
])
def test_grpo_bad_input(change, words):
    args, kw = change(*rollout_args())
    with pytest.raises(FastftError, match=words):
        fastft.losses.grpo(*args, **kw)


def test_grpo_ignores_ids_under_the_mask():
    (h, w, tok, adv), kw = rollout_args()
    tok[0, 2] = 10**6  # padding, masked out
    kw["mask"][0, 2] = 0
    loss, _ = fastft.losses.grpo(h, w, tok, adv, **kw)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kw,words", [
    (dict(k=0), r"k \(rollouts per row\) must be an int >= 1"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(beta=-1.0), "beta"),
    (dict(seed=-3), "seed must be an int"),
    (dict(k=2, samples=torch.zeros(5, 3, dtype=torch.long)), r"samples must have shape \(5, 2\)"),
    (dict(k=1, samples=torch.full((5, 1), 99)), r"samples hold token ids outside \[0, 20\)"),
])
def test_otr_bad_input(kw, words):
    with pytest.raises(FastftError, match=words):
        fastft.losses.otr(*args(), **kw)


def test_asft_bad_reference():
    h, w, y = args()
    with pytest.raises(FastftError, match="ref_hidden has shape"):
        fastft.losses.asft(h, w, y, ref_hidden=torch.randn(4, 8))
    with pytest.raises(FastftError, match="reference head must share the vocabulary"):
        fastft.losses.asft(h, w, y, ref_hidden=h, ref_weight=torch.randn(21, 8))
    with pytest.raises(FastftError, match="kl_coef must be >= 0"):
        fastft.losses.asft(h, w, y, ref_hidden=h, kl_coef=-0.1)


def test_group_advantages_bad_input():
    with pytest.raises(FastftError, match="group_size must divide"):
        fastft.losses.group_advantages(torch.ones(6), 4)
    with pytest.raises(FastftError, match="scale must be one of"):
        fastft.losses.group_advantages(torch.ones(8), 4, scale="std")
