"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning, two phases (METHODS.md §3).

The maskable parameters are the weights of every nn.Linear but the output head
(biases, norms, embeddings and the head stay frozen in both phases). theta0 is
a CPU copy of them taken at ``prepare``.

1. phase "full": fine-tune the maskable weights densely (AdamW);
2. at the start of phase "sparse": keep the K = round(proportion x N) entries of
   largest |theta - theta0| over all maskable weights together (global top-k,
   ties broken by parameter order, then index), reset every maskable weight to
   theta0, and return a fresh SparseAdamW over those entries;
3. phase "sparse": re-train only the masked entries.

``l1 > 0`` adds l1 x sign(theta - theta0) to each maskable weight's gradient
once per optimizer step (the gradient of l1 |theta - theta0|_1), in both
phases; theta0 is then also kept on the weights' device. The result is saved as
a sparse difference (``save_diff``; fastft.methods.sparse_diff) that
``fastft.compose`` adds to a base model, several at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..errors import FastftError, check
from ..optim import SparseAdamW, index_dtype
from . import sparse_diff
from .base import Hooks
from .targets import freeze, linear_modules, param_names, require_prepared

PHASES = ("full", "sparse")


@dataclass
class LTSFT(Hooks):
    """Two-phase LT-SFT; see the module docstring."""

    proportion: float = 0.01
    l1: float = 0.0
    _targets: dict | None = field(default=None, init=False, repr=False, compare=False)
    _model_id: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        check(isinstance(self.proportion, (int, float)) and 0.0 < self.proportion <= 1.0,
              f"LTSFT proportion (the density of the mask) must be in (0, 1]; got "
              f"{self.proportion!r}")
        check(self.l1 >= 0.0, f"LTSFT l1 must be >= 0; got {self.l1!r}")
        self._phase: str | None = None
        self._theta0: dict[str, torch.Tensor] = {}
        self._theta0_dev: dict[str, torch.Tensor] = {}
        self._indices: dict[str, torch.Tensor] = {}
        self._hparams: dict = {}
        self._l1_pending: set[str] = set()

    # ---- set-up -------------------------------------------------------------------------

    def prepare_model(self, model: nn.Module) -> list[str]:
        targets = linear_modules(model)
        freeze(model)
        names = param_names(model)
        self._targets = {names[id(m.weight)]: m.weight for m in targets.values()}
        self._model_id = id(model)
        self._theta0 = {n: p.detach().to("cpu", copy=True) for n, p in self._targets.items()}
        self._phase, self._indices = None, {}
        for n, p in self._targets.items():
            p.requires_grad_(True)
            if self.l1 > 0:
                self._theta0_dev[n] = p.detach().clone()
                p.register_post_accumulate_grad_hook(partial(self._add_l1, n))
        return list(targets)

    @torch.no_grad()
    def _add_l1(self, name: str, p: torch.Tensor) -> None:
        if name in self._l1_pending or p.grad is None:
            return  # once per optimizer step, whatever the gradient accumulation
        p.grad.add_(torch.sign(p - self._theta0_dev[name]), alpha=self.l1)
        self._l1_pending.add(name)

    def phases(self) -> list[str]:
        return list(PHASES)

    def make_optimizer(self, model: nn.Module, *, lr: float, betas=(0.9, 0.999),
                       eps: float = 1e-8, weight_decay: float = 0.0):
        """Dense AdamW over the maskable weights; once in phase "sparse" (a resumed run whose
        method state was loaded first), the SparseAdamW over the saved mask."""
        require_prepared(self, model)
        self._hparams = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        if self._phase == "sparse":
            return self._sparse_optimizer()
        params = list(self._targets.values())
        try:
            return torch.optim.AdamW(params, fused=True, **self._hparams)
        except RuntimeError:
            return torch.optim.AdamW(params, **self._hparams)

    # ---- the phases ---------------------------------------------------------------------

    def on_phase_begin(self, model: nn.Module, optimizer, phase: str):
        require_prepared(self, model)
        check(phase in PHASES, f"LTSFT has phases {PHASES}; got {phase!r}")
        expected = "full" if self._phase is None else "sparse" if self._phase == "full" else None
        if phase != expected:
            raise FastftError(
                f"LTSFT phase {phase!r} run out of order (the last phase begun is "
                f"{self._phase!r}): run phase 'full' (full fine-tuning) and then phase 'sparse' "
                "(the masked re-training), each once, as Trainer does")
        self._phase = phase
        if phase == "full":
            return None
        if not self._hparams and optimizer is not None:
            g = optimizer.param_groups[0]
            self._hparams = dict(lr=g.get("initial_lr", g["lr"]), betas=tuple(g["betas"]),
                                 eps=g["eps"], weight_decay=g["weight_decay"])
        check(bool(self._hparams), "LTSFT: the sparse phase needs the optimizer's settings: call "
              "make_optimizer first, or pass the phase-1 optimizer to on_phase_begin")
        self._select_and_reset()
        return self._sparse_optimizer()

    @torch.no_grad()
    def _select_and_reset(self) -> None:
        """Global top-K of |theta - theta0| over the maskable weights; then theta <- theta0."""
        total = sum(p.numel() for p in self._targets.values())
        k = max(1, round(self.proportion * total))
        best = None
        for n, p in self._targets.items():  # a running top-K of the values: O(K + numel) memory
            d = self._distance(n, p)
            best = d if best is None else torch.cat([best, d.to(best.device)])
            best = torch.topk(best, min(k, best.numel()), sorted=False).values
        threshold = best.min()
        ties = k - int((best > threshold).sum())  # entries equal to the threshold still to take
        self._indices = {}
        for n, p in self._targets.items():
            d = self._distance(n, p)
            take = d > threshold.to(d.device)
            if ties > 0:
                eq = (d == threshold.to(d.device)).nonzero().squeeze(1)[:ties]
                take[eq] = True
                ties -= eq.numel()
            self._indices[n] = take.nonzero().squeeze(1).to(index_dtype(p.numel()))
            p.copy_(self._theta0[n].to(p.device))

    def _distance(self, name: str, p: torch.Tensor) -> torch.Tensor:
        return (p.detach().float() - self._theta0[name].to(p.device).float()).abs().reshape(-1)

    def _sparse_optimizer(self) -> SparseAdamW:
        def masks():
            for n, p in self._targets.items():
                mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
                mask[self._indices[n].to(p.device, torch.int64)] = True
                yield mask.view(p.shape)
        return SparseAdamW(list(self._targets.values()), masks(), **self._hparams)

    def on_step_end(self, model: nn.Module, optimizer, step: int) -> None:
        self._l1_pending.clear()

    # ---- results and state --------------------------------------------------------------

    @property
    def mask_size(self) -> int:
        """Entries trained in phase "sparse" (0 before it)."""
        return sum(i.numel() for i in self._indices.values())

    @torch.no_grad()
    def sparse_difference(self) -> dict:
        """{"shapes", "params": {name: (indices, theta - theta0 at them)}}, the values in
        sparse_diff.value_dtype (exact)."""
        check(self._phase == "sparse", "LTSFT: the sparse difference exists once phase 'sparse' "
              "has begun (the mask is chosen at its start)")
        params = {}
        for n, p in self._targets.items():
            idx, vt = self._indices[n], sparse_diff.value_dtype(p.dtype)
            i64 = idx.to(p.device, torch.int64)
            base = self._theta0[n].reshape(-1)[idx.to("cpu", torch.int64)].to(p.device, vt)
            params[n] = (idx.cpu(), (p.detach().reshape(-1)[i64].to(vt) - base).cpu())
        return {"shapes": {n: list(p.shape) for n, p in self._targets.items()}, "params": params}

    def save_diff(self, model: nn.Module, path):
        """Save the fine-tuning as a sparse difference (safetensors); returns the path."""
        require_prepared(self, model)
        d = self.sparse_difference()
        return sparse_diff.save_sparse_diff(d["params"], d["shapes"], path)

    def state_dict(self) -> dict:
        out: dict = {"phase": self._phase or ""}
        for n, t in self._theta0.items():
            out[f"theta0.{n}"] = t
        for n, t in self._indices.items():
            out[f"indices.{n}"] = t
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        require_prepared(self)
        self._phase = state.get("phase") or None
        for n, p in self._targets.items():
            check(f"theta0.{n}" in state, f"LTSFT state has no theta0 of {n} (saved for "
                  "another model?)")
            t = state[f"theta0.{n}"]
            check(tuple(t.shape) == tuple(p.shape), f"LTSFT state: theta0 of {n} has shape "
                  f"{tuple(t.shape)}, the model's is {tuple(p.shape)}")
            self._theta0[n] = t.to("cpu", p.dtype)
            if n in self._theta0_dev:
                self._theta0_dev[n] = t.to(p.device, p.dtype)
        self._indices = {n: state[f"indices.{n}"].to(p.device) for n, p in self._targets.items()
                         if f"indices.{n}" in state}
        check(self._phase != "sparse" or len(self._indices) == len(self._targets),
              "LTSFT state is in phase 'sparse' but lacks the mask indices")
