"""HFT: Half Fine-Tuning, half of the matrices of each category frozen per stage (METHODS.md §3).

Per stage, in every layer: 2 of the 4 attention matrices (q, k, v, o) chosen at
random; of the 3 MLP matrices (gate, up, down), 2 in a random half of the
layers and 1 in the others. With an odd number of layers L the half is rounded
up (``ceil(L / 2)`` layers train 2), so that at least half of the 3L MLP
matrices train (ceil(3L / 2)), as in an even model. The chosen matrices train
densely (weight and bias); the others get ``requires_grad=False``, so autograd
forms no weight gradient for them at all. Embeddings, norms and the output head
stay frozen, as in the paper's default procedure. The draw is a pure function
of (``seed``, stage index) and is redone at each stage: ``stage="epoch"`` (each
epoch), an int N (every N optimizer steps) or ``"once"``. The optimizer
(``make_optimizer``: torch's AdamW over every matrix HFT may train) skips the
frozen ones, whose gradient is None, and keeps their moments for when they are
drawn again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import check
from .base import Hooks
from .targets import freeze, layer_index, linear_modules, require_prepared

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def draw(layers: list[int], seed: int, stage: int) -> dict[int, tuple[set[str], set[str]]]:
    """{layer: (trained attention names, trained MLP names)} for one stage."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + stage)
    order = sorted(layers)
    half = (len(order) + 1) // 2  # rounded up: ceil(3L / 2) of the 3L MLP matrices train
    two = {order[i] for i in torch.randperm(len(order), generator=g)[:half].tolist()}
    out = {}
    for layer in order:
        attn = {ATTENTION[i] for i in torch.randperm(4, generator=g)[:2].tolist()}
        mlp = {MLP[i] for i in torch.randperm(3, generator=g)[:2 if layer in two else 1].tolist()}
        out[layer] = (attn, mlp)
    return out


@dataclass
class HFT(Hooks):
    """Half Fine-Tuning; see the module docstring."""

    stage: str | int = "epoch"
    seed: int = 0
    _targets: dict | None = field(default=None, init=False, repr=False, compare=False)
    _model_id: int | None = field(default=None, init=False, repr=False, compare=False)
    _stage_index: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self):
        check(self.stage in ("epoch", "once") or (isinstance(self.stage, int) and
                                                  not isinstance(self.stage, bool) and
                                                  self.stage >= 1),
              f"HFT stage must be 'epoch', 'once' or a number of steps >= 1; got {self.stage!r}")

    def prepare_model(self, model: nn.Module) -> list[str]:
        layers: dict[int, dict[str, tuple[str, nn.Linear]]] = {}
        for path, mod in linear_modules(model).items():
            name, idx = path.rsplit(".", 1)[-1], layer_index(path)
            if name in ATTENTION + MLP and idx is not None:
                layers.setdefault(idx, {})[name] = (path, mod)
        check(bool(layers), "HFT found no layer with q_proj, k_proj, v_proj, o_proj, gate_proj, "
              "up_proj, down_proj: it needs a Llama-style decoder (separate projections)")
        for idx, mods in sorted(layers.items()):
            missing = [n for n in ATTENTION + MLP if n not in mods]
            check(not missing, f"HFT: layer {idx} lacks {', '.join(missing)}; HFT needs the 4 "
                  "attention and 3 MLP projections as separate nn.Linear layers")
        self._targets, self._model_id = layers, id(model)
        freeze(model)
        return self.apply(0)

    def apply(self, stage: int) -> list[str]:
        """Set requires_grad for ``stage``'s draw (frozen matrices lose their gradient);
        returns the paths of the trained matrices."""
        require_prepared(self)
        trained = []
        for i, (attn, mlp) in sorted(draw(list(self._targets), self.seed, stage).items()):
            for name in ATTENTION + MLP:
                path, mod = self._targets[i][name]
                on = name in attn or name in mlp
                for p in mod.parameters():
                    p.requires_grad_(on)
                    if not on:
                        p.grad = None
                if on:
                    trained.append(path)
        self._stage_index = stage
        return trained

    def make_optimizer(self, model: nn.Module, *, lr: float, betas=(0.9, 0.999),
                       eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.AdamW:
        """AdamW over every matrix HFT may train (frozen ones have no grad and are skipped)."""
        require_prepared(self, model)
        params = [p for mods in self._targets.values() for _, mod in mods.values()
                  for p in mod.parameters()]
        try:
            return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps,
                                     weight_decay=weight_decay, fused=True)
        except RuntimeError:
            return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps,
                                     weight_decay=weight_decay)

    def on_epoch_begin(self, model: nn.Module, optimizer, epoch: int) -> None:
        if self.stage == "epoch":
            self.apply(epoch)

    def on_step_end(self, model: nn.Module, optimizer, step: int) -> None:
        if isinstance(self.stage, int) and step > 0 and step % self.stage == 0:
            self.apply(step // self.stage)

    def state_dict(self) -> dict:
        return {"stage_index": self._stage_index}

    def load_state_dict(self, state: dict) -> None:
        self.apply(int(state.get("stage_index", 0)))
