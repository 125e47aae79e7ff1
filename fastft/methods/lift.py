"""LIFT: train the principal weights that emerge after rank reduction (METHODS.md §3).

Every nn.Linear but the output head; embeddings, norms, biases and the head are
frozen. Per matrix W (m x n): the rank-``filter_rank`` approximation W_hat
(truncated SVD; randomized SVD with q = 2 x rank when ``fast_svd``), then the
k = min((m + n) x lora_rank, m x n) entries of largest |W_hat| (a LoRA-equal
parameter budget; ``largest=False`` takes the smallest, as the authors'
released configs do). Only those entries train, with SparseAdamW (betas
(0.9, 0.95), eps 1e-6); every ``refresh_every`` optimizer steps the masks are
recomputed from the current weights, surviving entries keeping their m, v.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import check
from ..optim import SparseAdamW
from .base import Hooks
from .targets import freeze, linear_modules, require_prepared


def budget(shape, lora_rank: int) -> int:
    """Entries LIFT trains in an m x n matrix: min((m + n) x lora_rank, m x n)."""
    m, n = shape
    return min((m + n) * lora_rank, m * n)


@torch.no_grad()
def principal_indices(weight: torch.Tensor, lora_rank: int, filter_rank: int,
                      largest: bool = True, *, fast_svd: bool = False, seed: int = 0
                      ) -> torch.Tensor:
    """Flat indices (unsorted) of the ``budget(weight.shape, lora_rank)`` entries of largest
    (or smallest) magnitude in the rank-``filter_rank`` approximation of ``weight``."""
    check(weight.dim() == 2, f"LIFT masks 2-d weights; got shape {tuple(weight.shape)}")
    m, n = weight.shape
    check(isinstance(filter_rank, int) and 1 <= filter_rank <= min(m, n),
          f"LIFT filter_rank {filter_rank} is above the rank of a {m} x {n} matrix (at most "
          f"{min(m, n)}): use filter_rank <= {min(m, n)}")
    check(isinstance(lora_rank, int) and lora_rank >= 1,
          f"LIFT lora_rank must be an int >= 1; got {lora_rank!r}")
    w = weight.detach().float()
    if fast_svd:
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=min(2 * filter_rank, m, n))
        w_hat = (u[:, :filter_rank] * s[:filter_rank]) @ v[:, :filter_rank].t()
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        w_hat = (u[:, :filter_rank] * s[:filter_rank]) @ vh[:filter_rank]
    k = budget((m, n), lora_rank)
    return torch.topk(w_hat.abs().reshape(-1), k, largest=largest, sorted=False).indices


@torch.no_grad()
def principal_mask(weight: torch.Tensor, lora_rank: int, filter_rank: int, largest: bool = True,
                   *, fast_svd: bool = False, seed: int = 0) -> torch.Tensor:
    """Bool mask of the ``budget(weight.shape, lora_rank)`` entries of largest (or smallest)
    magnitude in the rank-``filter_rank`` approximation of ``weight``."""
    top = principal_indices(weight, lora_rank, filter_rank, largest, fast_svd=fast_svd,
                            seed=seed)
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[top] = True
    return mask.view(weight.shape)


@dataclass
class LIFT(Hooks):
    """Principal-weight sparse fine-tuning; ``betas``/``eps`` None take the trainer's."""

    lora_rank: int = 128
    filter_rank: int = 64
    refresh_every: int = 400
    largest: bool = True
    fast_svd: bool = False
    betas: tuple[float, float] | None = (0.9, 0.95)
    eps: float | None = 1e-6
    seed: int = 0
    _targets: dict | None = field(default=None, init=False, repr=False, compare=False)
    _model_id: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("lora_rank", "filter_rank"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"LIFT {name} must be an int >= 1; got {v!r}")
        check(isinstance(self.refresh_every, int) and self.refresh_every >= 0,
              f"LIFT refresh_every must be an int >= 0 (0: never); got {self.refresh_every!r}")

    def prepare_model(self, model: nn.Module) -> list[str]:
        targets = linear_modules(model)
        for path, mod in targets.items():
            m, n = mod.weight.shape
            check(self.filter_rank <= min(m, n),
                  f"LIFT filter_rank {self.filter_rank} is above the rank of {path} ({m} x {n}, "
                  f"rank at most {min(m, n)}): use filter_rank <= {min(m, n)} (fastft train: "
                  "--lift-filter-rank)")
        freeze(model)
        for mod in targets.values():
            mod.weight.requires_grad_(True)
        self._targets, self._model_id = targets, id(model)
        return list(targets)

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The principal mask of one weight with this method's settings."""
        return principal_mask(weight, self.lora_rank, self.filter_rank, self.largest,
                              fast_svd=self.fast_svd, seed=self.seed)

    def indices(self, weight: torch.Tensor) -> torch.Tensor:
        """The flat indices of :meth:`mask`'s entries (what SparseAdamW takes; no bool mask
        is formed, and the count is known without looking at the values)."""
        return principal_indices(weight, self.lora_rank, self.filter_rank, self.largest,
                                 fast_svd=self.fast_svd, seed=self.seed)

    def make_optimizer(self, model: nn.Module, *, lr: float, betas=(0.9, 0.999),
                       eps: float = 1e-8, weight_decay: float = 0.0) -> SparseAdamW:
        require_prepared(self, model)
        params = [mod.weight for mod in self._targets.values()]
        return SparseAdamW(params, (self.indices(p) for p in params), lr=lr,
                           betas=self.betas if self.betas is not None else betas,
                           eps=self.eps if self.eps is not None else eps,
                           weight_decay=weight_decay)

    def refresh(self, optimizer: SparseAdamW) -> None:
        """Recompute every mask from the current weights (surviving entries keep m, v)."""
        optimizer.refresh(self.indices(p) if optimizer.masked(i) else None
                          for i, p in enumerate(optimizer.params))

    def on_step_end(self, model: nn.Module, optimizer, step: int) -> None:
        if self.refresh_every and step > 0 and step % self.refresh_every == 0:
            self.refresh(optimizer)
