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
