"""SparseAdamW: AdamW that keeps state only for the trained entries of each weight.

For a parameter with a mask, the optimizer holds the flat indices of the
masked entries (int32 when the weight has fewer than 2**31 entries, else int64)
and compact fp32 m, v of the same length; the fused op
``fastft::sparse_adam_step`` gathers the gradient there and updates m, v and the
weight entries in place (bias correction, decoupled weight decay, fp32 math on
fp32/bf16/fp16 weights), one call (one Triton launch) per bucket of parameters
sharing group, device and dtypes (fastft.optim.buckets). Entries outside the
mask never change. Parameters without a mask (None) get torch's ordinary (fused
where supported) AdamW.

Gradients, two ways:

- plain: ``step()`` reads ``param.grad`` as set by backward (or by hand), like
  any torch optimizer;
- hooks (``attach_hooks()``, turned on by the trainer): a post-accumulate-grad
  hook gathers each masked parameter's dense gradient into a compact fp32
  buffer as soon as it is complete (adding across gradient-accumulation
  micro-batches) and frees it, so at most one dense gradient exists at a time.
  ``zero_grad()`` zeroes the buffers.

Gradient clipping without dense gradients: ``grad_norm_sq()`` (the squared
norm over the masked entries' gradients and the dense parameters' gradients, a
0-d tensor: no sync), ``scale_grads_(factor)``, and ``clip_grad_norm_(max_norm)``
built from the two, as torch.nn.utils.clip_grad_norm_ computes it.

``refresh(new_masks)`` changes masks: surviving entries keep m, v, new ones
start at zero, step counts are kept. ``state_dict()`` holds tensors and plain
numbers/lists only; fastft.optim.save / load write it to one safetensors file
atomically and read it back exactly.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from ..errors import FastftError, check
from . import buckets as bk
from . import dense as dense_mod

FORMAT = "fastft.SparseAdamW/1"
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_END = object()


def index_dtype(numel: int) -> torch.dtype:
    """int32 where every flat index of a weight with ``numel`` entries fits, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def state_bytes_for(numel: int, k: int) -> int:
    """Bytes of SparseAdamW state for a weight of ``numel`` entries with ``k`` masked:
    the indices plus fp32 m and v."""
    return k * (torch.empty(0, dtype=index_dtype(numel)).element_size() + 8)


def _fake(t: Tensor) -> bool:
    """A tensor without values (meta, or fake while fastft.profile traces a step)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def mask_indices(mask: Tensor) -> Tensor:
    """Sorted flat indices of the True entries of ``mask`` (int32 or int64, see index_dtype)."""
    return mask.reshape(-1).nonzero().squeeze(1).to(index_dtype(mask.numel()))


def random_mask(shape, density: float, *, generator: torch.Generator | None = None,
                device=None) -> Tensor:
    """A bool mask with exactly round(density x numel) True entries drawn uniformly."""
    check(isinstance(density, (int, float)) and 0.0 < density <= 1.0,
          f"density must be in (0, 1]; got {density!r}")
    numel = int(torch.Size(shape).numel())
    k = max(1, round(density * numel))
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:k]] = True
    return mask.view(shape).to(device)


class SparseAdamW(torch.optim.Optimizer):
    """AdamW with compact state for masked parameters; see the module docstring.

    ``params``: tensors or param-group dicts, as for any torch optimizer.
    ``masks``: one entry per parameter, in order (groups flattened): a bool
    tensor of the parameter's shape, or None for a dense parameter. Any iterable
    works; it is consumed one mask at a time, so a generator keeps one mask alive.
    """

    def __init__(self, params, masks, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        _check_hparams(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])),
                                      eps=float(eps), weight_decay=float(weight_decay)))
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._index = {p: i for i, p in enumerate(self._params)}
        self._masked = [False] * len(self._params)
        it = iter(masks)
        for i, p in enumerate(self._params):
            mask = next(it, _END)
            if mask is _END:
                raise FastftError(f"SparseAdamW got {i} masks for {len(self._params)} "
                                  "parameters: give one per parameter (None for a dense one)")
            if mask is not None:
                self._masked[i] = True
                idx = self._indices(i, p, mask)
                self.state[p] = {"idx": idx, "exp_avg": torch.zeros(idx.numel(), device=p.device),
                                 "exp_avg_sq": torch.zeros(idx.numel(), device=p.device),
                                 "step": 0}
        if next(it, _END) is not _END:
            raise FastftError(f"SparseAdamW got more masks than its {len(self._params)} "
                              "parameters: give one per parameter, in order")
        self._grad_buf: dict[int, Tensor] | None = None  # compact fp32 gradients (hook mode)
        self._has_grad = [False] * len(self._params)
        self._handles: list = []
        self._buckets = bk.make(self.param_groups, self._masked, self._index)
        self._repack(self._buckets)
        self._dense = dense_mod.make(self.param_groups, self._masked, self._index)

    # ---- masks and state ----------------------------------------------------------------

    def _indices(self, i: int, p: Tensor, mask) -> Tensor:
        check(isinstance(mask, Tensor) and (mask.dtype == torch.bool or (
              mask.dim() == 1 and mask.dtype in (torch.int32, torch.int64))),
              f"mask {i} must be a bool tensor of the parameter's shape, a 1-d tensor of flat "
              "indices (int64/int32), or None for a dense parameter; got "
              f"{type(mask).__name__ if not isinstance(mask, Tensor) else mask.dtype}")
        check(mask.dtype != torch.bool or tuple(mask.shape) == tuple(p.shape),
              f"mask {i} has shape {tuple(mask.shape)} but its parameter has shape "
              f"{tuple(p.shape)}: masks are aligned with the parameters, one per parameter")
        check(p.dtype in WEIGHT_DTYPES,
              f"parameter {i} is {p.dtype}; SparseAdamW trains float32, bfloat16 or float16 "
              "weights")
        check(p.is_contiguous(), f"parameter {i} is not contiguous: its masked entries are "
              "addressed by flat index; make the weight contiguous first")
        check(p.requires_grad, f"parameter {i} has a mask but does not require grad: set "
              "requires_grad_(True) on it, or give None and leave it out")
        if mask.dtype == torch.bool:
            return mask_indices(mask.to(p.device))
        # flat indices (LIFT gives its top-k this way: no mask, and a count known from shapes)
        idx = torch.sort(mask.to(p.device, torch.int64)).values
        if not _fake(idx) and idx.numel():
            check(bool(idx[0] >= 0) and bool(idx[-1] < p.numel()) and
                  (idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all())),
                  f"the indices of parameter {i} must be distinct flat indices in "
                  f"[0, {p.numel()})")
        return idx.to(index_dtype(p.numel()))

    def _repack(self, which) -> None:
        for b in which:
            bk.pack(b, self._params, self.state, self._grad_buf)

    def masked(self, i: int) -> bool:
        """Whether parameter ``i`` (in order, groups flattened) has a mask."""
        return self._masked[i]

    @property
    def params(self) -> list[Tensor]:
        return list(self._params)

    def indices(self, i: int) -> Tensor | None:
        """The flat indices of parameter ``i``'s trained entries (None for a dense one)."""
        return self.state[self._params[i]]["idx"] if self._masked[i] else None

    @torch.no_grad()
    def refresh(self, new_masks) -> None:
        """Change the masks: one entry per parameter (None: keep). Surviving entries keep
        m, v (and a pending compact gradient); new entries start at zero; steps are kept."""
        it, changed = iter(new_masks), set()
        for i, p in enumerate(self._params):
            mask = next(it, None)
            if mask is None:
                continue
            check(self._masked[i], f"refresh: parameter {i} is dense in this optimizer; only "
                  "masked parameters get new masks (give None for it)")
            st = self.state[p]
            old, new = st["idx"], self._indices(i, p, mask)
            pos, found = _locate(old, new)
            for key in ("exp_avg", "exp_avg_sq"):
                st[key] = _carry(st[key], pos, found)
            if self._grad_buf is not None:
                self._grad_buf[i] = _carry(self._grad_buf[i], pos, found)
            st["idx"] = new
            changed.add(i)
        self._repack([b for b in self._buckets if changed.intersection(b.members)])

    def state_bytes(self) -> int:
        """Bytes of optimizer state: indices, m, v of masked parameters, AdamW state of dense."""
        total = sum(t.nbytes for b in self._buckets for t in b.flat.values())
        if self._dense is not None:
            total += sum(t.nbytes for st in self._dense.state.values() for t in st.values()
                         if isinstance(t, Tensor))
        return total

    # ---- gradients ----------------------------------------------------------------------

    def attach_hooks(self) -> SparseAdamW:
        """Consume each masked parameter's dense gradient as soon as it is accumulated."""
        if self._handles:
            return self
        if self._grad_buf is None:
            self._grad_buf = {}
            self._repack(self._buckets)  # allocates the flat compact gradients
        for i, p in enumerate(self._params):
            if self._masked[i]:
                self._handles.append(p.register_post_accumulate_grad_hook(partial(self._consume, i)))
        return self

    def detach_hooks(self) -> None:
        """Back to plain mode (gradients in ``.grad``); pending compact gradients are kept."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def _consume(self, i: int, p: Tensor) -> None:
        self._grad_buf[i].add_(p.grad.reshape(-1).index_select(0, self.state[p]["idx"]))
        self._has_grad[i] = True
        p.grad = None

    def _mode(self, i: int) -> str | None:
        """Where masked parameter i's gradient is: "compact", "dense" (.grad), or None."""
        if self._has_grad[i]:
            return "compact"
        return "dense" if self._params[i].grad is not None else None

    @torch.no_grad()
    def grad_norm_sq(self) -> Tensor:
        """Squared L2 norm of the gradients this optimizer would apply (0-d fp32, no sync)."""
        dev = self._params[0].device
        parts = []
        sq = lambda g: torch.linalg.vector_norm(g, dtype=torch.float32).square().to(dev)  # noqa: E731
        for b in self._buckets:
            modes = [self._mode(i) for i in b.members]
            if b.grad is not None and "dense" not in modes:  # the zeros of the others add 0
                parts.append(sq(b.grad))
                continue
            for i, mode in zip(b.members, modes):
                p = self._params[i]
                if mode == "compact":
                    parts.append(sq(self._grad_buf[i]))
                elif mode == "dense":
                    parts.append(sq(p.grad.reshape(-1).index_select(0, self.state[p]["idx"])))
        parts += [sq(p.grad) for i, p in enumerate(self._params)
                  if not self._masked[i] and p.grad is not None]
        return torch.stack(parts).sum() if parts else torch.zeros((), device=dev)

    def grad_tensors(self) -> list[Tensor]:
        """Every tensor that holds a gradient this optimizer would apply: the compact buffers
        of the hooks and the dense ``.grad`` of the rest (for data-parallel averaging, which
        then moves the masked entries only)."""
        out = [b.grad for b in self._buckets if b.grad is not None]
        out += [p.grad for i, p in enumerate(self._params)
                if p.grad is not None and (not self._masked[i] or not self._has_grad[i])]
        return out

    @torch.no_grad()
    def scale_grads_(self, factor) -> None:
        """Multiply every gradient this optimizer holds by ``factor`` (number or 0-d tensor)."""
        f = lambda g: factor.to(g.device) if isinstance(factor, Tensor) else factor  # noqa: E731
        for b in self._buckets:
            if b.grad is not None:
                b.grad.mul_(f(b.grad))
        for p in self._params:
            if p.grad is not None:
                p.grad.mul_(f(p.grad))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> Tensor:
        """Scale the gradients so that their total norm is at most ``max_norm``; returns the
        norm before clipping (as torch.nn.utils.clip_grad_norm_, without a sync)."""
        norm = self.grad_norm_sq().sqrt()
        self.scale_grads_(torch.clamp(max_norm / (norm + eps), max=1.0))
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self._buckets:
            if b.grad is not None:
                b.grad.zero_()
        for i, p in enumerate(self._params):
            self._has_grad[i] = False
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    # ---- the step -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for b in self._buckets:
            g = self.param_groups[b.group]
            hp = (float(g["lr"]), float(g["betas"][0]), float(g["betas"][1]), float(g["eps"]),
                  float(g["weight_decay"]))
            params = [self._params[i] for i in b.members]
            modes = [self._mode(i) for i in b.members]
            steps = {self.state[p]["step"] for p in params}
            if len(steps) == 1 and len(set(modes)) == 1 and modes[0] is not None:
                t = steps.pop() + 1  # the common case: one call for the whole bucket
                for p in params:
                    self.state[p]["step"] = t
                grads = [b.grad] if modes[0] == "compact" else [p.grad for p in params]
                torch.ops.fastft.sparse_adam_step(
                    params, grads, b.flat["idx"], b.flat["exp_avg"], b.flat["exp_avg_sq"],
                    b.offsets, *hp, t, modes[0] == "compact")
                continue
            for i, p, mode in zip(b.members, params, modes):
                if mode is None:
                    continue
                st = self.state[p]
                st["step"] += 1
                grad = self._grad_buf[i] if mode == "compact" else p.grad
                torch.ops.fastft.sparse_adam_step(
                    [p], [grad], st["idx"], st["exp_avg"], st["exp_avg_sq"],
                    [0, st["idx"].numel()], *hp, st["step"], mode == "compact")
        if self._dense is not None:
            self._dense.step(self.param_groups)
        return loss

    # ---- state dict ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Tensors and JSON-able values only: ``state.<i>.idx|exp_avg|exp_avg_sq`` (CPU
        copies of the views into the flat buffers, so no two share memory) and
        ``dense.<i>.<key>`` tensors, ``steps`` (None for a dense parameter),
        ``param_groups`` (hyper-parameters and parameter positions)."""
        out: dict = {"format": FORMAT, "param_groups": [
            {**{k: _jsonable(v) for k, v in g.items() if k != "params"},
             "params": [self._index[p] for p in g["params"]]} for g in self.param_groups]}
        steps = []
        for i, p in enumerate(self._params):
            steps.append(self.state[p]["step"] if self._masked[i] else None)
            if self._masked[i]:
                for k in bk.KEYS:
                    out[f"state.{i}.{k}"] = self.state[p][k].to("cpu", copy=True)
        if self._dense is not None:
            out.update(self._dense.state_tensors(self._index))
        out["steps"] = steps
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        check(isinstance(state, dict) and state.get("format") == FORMAT,
              f"not a SparseAdamW state dict (format {state.get('format')!r}, expected {FORMAT})")
        groups, steps = state["param_groups"], state["steps"]
        check(len(groups) == len(self.param_groups) and all(
            len(g["params"]) == len(o["params"]) for g, o in zip(groups, self.param_groups)),
            "SparseAdamW state dict: its parameter groups do not match this optimizer's")
        check(len(steps) == len(self._params) and
              all((s is not None) == m for s, m in zip(steps, self._masked)),
              "SparseAdamW state dict: masked / dense parameters do not match this optimizer's "
              "(was it saved for another model or method?)")
        for g, o in zip(groups, self.param_groups):
            o.update({k: tuple(v) if k == "betas" else v for k, v in g.items() if k != "params"})
        for i, p in enumerate(self._params):
            if self._masked[i]:
                self.state[p] = self._loaded(i, p, state, int(steps[i]))
                if self._grad_buf is not None:
                    self._grad_buf[i] = torch.zeros(self.state[p]["idx"].numel(), device=p.device)
                self._has_grad[i] = False
        self._repack(self._buckets)
        if self._dense is not None:
            self._dense.load(state, self._index)

    def _loaded(self, i: int, p: Tensor, state: dict, step: int) -> dict:
        idx = state[f"state.{i}.idx"].to(p.device)
        check(idx.dtype == index_dtype(p.numel()) and idx.dim() == 1,
              f"SparseAdamW state dict: indices of parameter {i} are {idx.dtype}, expected "
              f"{index_dtype(p.numel())}")
        check(idx.numel() == 0 or int(idx.max()) < p.numel(),
              f"SparseAdamW state dict: indices of parameter {i} exceed its {p.numel()} entries "
              "(saved for another model?)")
        st = {"idx": idx, "step": step}
        for k in ("exp_avg", "exp_avg_sq"):
            t = state[f"state.{i}.{k}"]
            check(t.shape == idx.shape,
                  f"SparseAdamW state dict: {k} of parameter {i} does not match its indices")
            st[k] = t.to(device=p.device, dtype=torch.float32)
        return st


def _carry(values: Tensor, pos: Tensor, found: Tensor) -> Tensor:
    """Values of the new entries: the old value where the entry survives, else zero."""
    if values.numel() == 0:
        return torch.zeros(found.shape, device=found.device)
    return torch.where(found, values[pos], 0.0)


def _locate(old: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """(pos, found): for each new index, its position in the sorted old ones, and whether
    it is there."""
    if old.numel() == 0:
        return torch.zeros_like(new, dtype=torch.int64), torch.zeros_like(new, dtype=torch.bool)
    pos = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
    return pos, old[pos] == new


def _jsonable(v):
    if isinstance(v, Tensor):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


def _check_hparams(lr, betas, eps, weight_decay) -> None:
    check(isinstance(lr, (int, float)) and lr >= 0, f"lr must be a number >= 0; got {lr!r}")
    check(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
          f"betas must be two numbers in [0, 1); got {betas!r}")
    check(eps >= 0, f"eps must be >= 0; got {eps!r}")
    check(weight_decay >= 0, f"weight_decay must be >= 0; got {weight_decay!r}")
