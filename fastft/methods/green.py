"""GreenTrainer: adaptive backpropagation (METHODS.md §5).

Every ``interval`` epochs, on the step's batch: one probe optimizer step gives
each candidate tensor an importance I_k = -sum(g1 * (w1 - w0)) (g1: the gradient
at w1), after which the weights and the optimizer state are put back exactly;
then ``green_select.select`` keeps the tensors of largest importance whose
backward FLOPs fit the budget. Unselected tensors get requires_grad=False: their
weight-gradient GEMMs never run and backpropagation stops below the deepest
selected tensor.

The per-tensor costs t_dw (weight gradient) and t_dy (activation gradient
through it) are measured by fastft.profile (``fastft/profile/green_costs.py``)
from the FLOP counts of fake-traced steps; the Trainer hands them in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import check
from . import green_select
from .base import Hooks
from .lora import Full, LoRA, LoRASB


def selection_for(costs, importance: list[float], rho: float) -> list[bool]:
    """The DP's selection under rho's backward budget (METHODS.md §5), on costs rounded up
    to integers, then filled with what the rounding left out (exact costs)."""
    budget = green_select.backward_budget(rho, costs.t_fp, costs.t_bp) * costs.t_bp
    dw, dy, units = green_select.quantize(costs.t_dw, costs.t_dy, budget)
    mask = green_select.select(importance, dw, dy, units)
    mask = green_select.fill(mask, importance, costs.t_dw, costs.t_dy, budget)
    check(green_select.cost(mask, costs.t_dw, costs.t_dy) <= budget * (1 + 1e-12),
          "GreenTrainer: the selection's backward FLOPs exceed the budget")
    return mask


@dataclass
class GreenTrainer(Hooks):
    """Adaptive backpropagation over the tensors ``base`` trains (full or LoRA adapters)."""

    rho: float = 0.5
    interval: int = 2
    base: object = field(default_factory=Full)
    costs: object = field(default=None, init=False, repr=False, compare=False)  # green_costs.Costs
    selected: list[str] | None = field(default=None, init=False, repr=False, compare=False)
    importance: list[float] | None = field(default=None, init=False, repr=False, compare=False)
    # every selection made: {"epoch", "selected", "steps" (optimizer steps it trained)}
    history: list = field(default_factory=list, init=False, repr=False, compare=False)
    _epoch: int = field(default=-1, init=False, repr=False, compare=False)
    _stale: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        check(isinstance(self.rho, (int, float)) and not isinstance(self.rho, bool)
              and 0 < self.rho <= 1, f"GreenTrainer rho must be in (0, 1] (the share of full "
              f"fine-tuning's FLOPs kept); got {self.rho!r}")
        check(isinstance(self.interval, int) and not isinstance(self.interval, bool)
              and self.interval >= 1, f"GreenTrainer interval must be an integer >= 1 "
              f"(epochs between selections); got {self.interval!r}")
        check(isinstance(self.base, (Full, LoRA, LoRASB)),
              "GreenTrainer's base must be fastft.Full() or fastft.LoRA(...) / LoRASB(...); "
              f"got {type(self.base).__name__}")

    def prepare_model(self, model: nn.Module) -> list[str]:
        from ..patch import apply_method

        targets = apply_method(model, self.base)
        self._candidates = [n for n, p in model.named_parameters() if p.requires_grad]
        return targets

    # ---- selection ----------------------------------------------------------------------

    def due(self, epoch: int) -> bool:
        return epoch != self._epoch and (self.selected is None or epoch % self.interval == 0)

    def reselect(self, model: nn.Module, optimizer, epoch: int, backward, costs,
                 reduce=None) -> None:
        """At the start of every ``interval``-th epoch: probe, then select. ``backward()``
        runs forward + backward of the step's batch (gradients accumulate into .grad);
        ``costs()`` measures the tensors' backward costs (called once, then kept);
        ``reduce(tensor)`` averages a tensor over processes (data parallel)."""
        if not self.due(epoch):
            if self._stale:  # resumed: the checkpoint's selection, not yet on this model
                self.apply(model)
            return
        self._epoch = epoch
        params = dict(model.named_parameters())
        cands = [params[n] for n in self._candidates]
        if self.costs is None:
            self.costs = costs()
            check(sorted(self.costs.names) == sorted(self._candidates),
                  "GreenTrainer: the measured tensors are not the ones the base method trains")
        for p in cands:
            p.requires_grad_(True)
        imp = probe_importance(cands, optimizer, backward)
        if reduce is not None:
            imp = reduce(imp)
        by_name = dict(zip(self._candidates, imp.tolist()))
        self.importance = [by_name[n] for n in self.costs.names]
        mask = selection_for(self.costs, self.importance, self.rho)
        self.selected = [n for n, m in zip(self.costs.names, mask) if m]
        self.history.append({"epoch": epoch, "selected": self.selected, "steps": 0})
        self.apply(model)

    def on_step_end(self, model: nn.Module, optimizer, step: int) -> None:
        if self.history:
            self.history[-1]["steps"] += 1

    def apply(self, model: nn.Module) -> None:
        self._stale = False
        keep = set(self.selected or [])
        for n in self._candidates:
            model.get_parameter(n).requires_grad_(n in keep)

    def state_dict(self) -> dict:
        return {"selected": self.selected, "epoch": self._epoch, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.selected, self._epoch = state.get("selected"), state.get("epoch", -1)
        self.history = list(state.get("history", []))
        self._stale = self.selected is not None


@torch.no_grad()
def _snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def probe_importance(params: list[torch.Tensor], optimizer, backward) -> torch.Tensor:
    """I_k = -sum(g1 * (w1 - w0)) / max |I| after one optimizer step from the current
    weights; the weights and the optimizer state (and every param group's settings) are
    restored exactly. The step runs at the groups' initial learning rate when the
    schedule's current one is 0 (warm-up), so that the probe moves the weights."""
    w0 = _snapshot(params)
    state = copy.deepcopy(optimizer.state_dict())
    groups = [dict(g) for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        if not g["lr"]:
            g["lr"] = g.get("initial_lr", g["lr"])
    optimizer.zero_grad(set_to_none=True)
    backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    backward()
    with torch.no_grad():
        imp = torch.stack([
            -(p.grad.float() * (p.float() - w.float())).sum() if p.grad is not None
            else torch.zeros((), device=p.device) for p, w in zip(params, w0)])
        for p, w in zip(params, w0):
            p.copy_(w)
    optimizer.zero_grad(set_to_none=True)
    optimizer.load_state_dict(state)
    for g, saved in zip(optimizer.param_groups, groups):
        g.update({k: v for k, v in saved.items() if k != "params"})
    top = imp.abs().max()
    return imp / torch.where(top > 0, top, torch.ones_like(top))
