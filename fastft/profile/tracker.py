"""What one traced training step allocates and computes.

``MemoryTracker``: a dispatch mode that follows every tensor storage an op
creates until it is freed, with a category (parameters, gradients, optimizer
state, activations, temporaries, inputs) and the module that made it; it keeps
the peak of the live bytes and what they were at that moment. Fused ops declare
the transient workspace their kernels use (``backends.workspace``); it counts
toward the peak while the op runs. The autograd engine sums the gradients that
reach one tensor from several uses (a tied embedding and head, a residual stream)
in place where it holds the only reference to the first; under a dispatch mode it
adds them out of place, and the tracker counts such a sum as the real step does
(``_accumulation``). (torch's MemTracker does the same job but cannot follow a
model with frozen parameters: it hooks every parameter.)

``FlopRecorder``: torch's FlopCounterMode, with every count also filed under
(innermost module, op, phase).
"""

from __future__ import annotations

import re
import sys
import weakref
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from .. import backends

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries", "inputs")


def module_pattern(name: str) -> str:
    """'CausalLMLoss.model.model.layers.3.mlp.up_proj' -> 'model.layers.*.mlp.up_proj'."""
    if name == "CausalLMLoss":  # the Trainer's loss module: the fused loss head
        return "(loss head)"
    name = name.split(".", 1)[1] if "." in name else ""
    if name.startswith("model."):  # CausalLMLoss.model.<the model's own names>
        name = name[len("model."):]
    return re.sub(r"\.\d+(?=\.|$)", ".*", name) or "(model)"


class MemoryTracker(TorchDispatchMode):
    def __init__(self, kind: str = "cuda"):
        super().__init__()
        self.kind = kind  # the device kind whose workspace the fused ops declare
        self.live: dict[int, list] = {}  # id(storage) -> [bytes, category, module, finalizer]
        self.current: Counter = Counter()
        self.peak_bytes = 0
        self.peak: dict[str, int] = {}
        self.phase = "forward"
        self.modules = None  # a ModuleTracker (the flop recorder's), for the running module
        self.saved_by_module: Counter = Counter()  # activations alive at the end of forward
        self._workspace = 0
        # an engine's gradient sum whose peak waits on its first operand's fate:
        # (that operand's storage key, the live bytes by category with the sum)
        self._pending: tuple[int, dict] | None = None

    # ---- bookkeeping --------------------------------------------------------------------

    def track(self, t: torch.Tensor, category: str, module: str | None = None,
              move: bool = True, check: bool = True) -> None:
        """File the storage of ``t`` under ``category`` (if already tracked: moved there
        when ``move``; a view an op returns stays where its storage is). ``check=False``
        leaves the peak to the caller."""
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" and not _fake(t):
            return
        if check:
            self._settle()
        st = t.untyped_storage()
        key = id(st)
        entry = self.live.get(key)
        if entry is not None:
            if move and entry[1] != category:
                self.current[entry[1]] -= entry[0]
                self.current[category] += entry[0]
                entry[1] = category
            return
        n = st.nbytes()
        fin = weakref.finalize(st, self._free, key)
        fin.atexit = False
        self.live[key] = [n, category, module, fin]
        self.current[category] += n
        if check:
            self._check_peak()

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current[entry[1]] -= entry[0]

    def _check_peak(self) -> None:
        total = sum(self.current.values()) + self._workspace
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak = {c: self.current[c] for c in CATEGORIES}
            self.peak["temporaries"] += self._workspace
            self.peak["phase"] = self.phase

    def _on_workspace(self, nbytes: dict) -> None:
        self._settle()
        self._workspace += int(nbytes[self.kind])
        self._check_peak()

    def _settle(self) -> None:
        """Decide the pending gradient sum: its first operand freed as the sum returned means
        the engine held the only reference to it, and the real engine adds into it in place
        (no new bytes, nothing to check); still alive, the real engine also allocates the sum
        beside both operands, the peak it counts here."""
        if self._pending is None:
            return
        key, snapshot = self._pending
        self._pending = None
        if key in self.live:
            total = sum(snapshot[c] for c in CATEGORIES)
            if total > self.peak_bytes:
                self.peak_bytes = total
                self.peak = dict(snapshot)

    def end_forward(self) -> None:
        """Note the activations alive now (saved for backward), by module."""
        self._settle()
        self.saved_by_module = Counter()
        for n, cat, module, _ in self.live.values():
            if cat == "activations":
                self.saved_by_module[module_pattern(module or "")] += n

    def detach(self) -> None:
        self._settle()
        for entry in self.live.values():
            entry[3].detach()
        self.live.clear()

    # ---- the mode -----------------------------------------------------------------------

    def __enter__(self):
        backends.workspace_listeners.append(self._on_workspace)
        return super().__enter__()

    def __exit__(self, *args):
        self._settle()
        backends.workspace_listeners.remove(self._on_workspace)
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._settle()
        self._workspace = 0
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        category = "activations" if self.phase == "forward" else "temporaries"
        module = _innermost(self.modules.parents) if self.modules is not None else None
        first = _accumulation(func, args, kwargs, out, sys._getframe().f_back)
        if first is not None and id(first.untyped_storage()) in self.live:
            self._workspace = 0
            self.track(out, category, module, move=False, check=False)
            self._pending = (id(first.untyped_storage()),
                             {**{c: self.current[c] for c in CATEGORIES}, "phase": self.phase})
            return out
        # a fused op's outputs (its gradient buffers) exist beside its workspace (the logits
        # chunk) while its kernels run: tracked before the workspace is released
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, category, module, move=False)
        self._workspace = 0
        return out


def _accumulation(func, args, kwargs, out, caller) -> torch.Tensor | None:
    """The first operand of the autograd engine's own sum of two gradients, or None.

    Where several uses of a tensor send it gradients, the engine's input buffer sums them
    (torch/csrc/autograd/input_buffer.cpp, ``accumulate``): with grad mode off it adds the
    second into the first in place (``old.add_(new)``) when the first is a dense plain tensor
    of which it holds the only reference, its storage included (not a view: the base holds
    that storage too), else ``old + new``. A tensor subclass, and any tensor while a dispatch
    mode is active (``isTensorSubclassLike``), takes the second path, so a fake trace sees
    ``aten.add.Tensor`` where a real step allocates nothing (a tied head's and embedding's
    [vocab, hidden] gradients: one more of them at the peak). The sum
    is recognised as an ``add`` without ``alpha`` of two tensors shaped as its output, with
    grad mode off, while a backward node runs, called by the engine's C++ code with no
    Python frame (a custom Function's backward, a hook) between it and the engine's entry
    (``caller``: the frame that called the mode). Whether the engine held the only reference
    shows once the sum returns: the first operand is then freed (``MemoryTracker._settle``)."""
    if func is not torch.ops.aten.add.Tensor or kwargs or len(args) != 2:
        return None
    first, second = args
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
            and isinstance(out, torch.Tensor)):
        return None
    if torch.is_grad_enabled() or torch._C._current_autograd_node() is None:
        return None
    if first.shape != out.shape or second.shape != out.shape or first.dtype != out.dtype:
        return None
    if first._is_view() or not _dense(first) or not _called_by_the_engine(caller):
        return None
    return first


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its elements exactly once, in some order of its dimensions
    (``is_non_overlapping_and_dense``)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# frames of torch's own wrappers around a mode's __torch_dispatch__
_WRAPPER_MODULES = ("torch._dynamo.", "torch._compile", "torch.utils._python_dispatch")


def _called_by_the_engine(frame) -> bool:
    entry = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if entry is None:
        return False
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
            _WRAPPER_MODULES):
        frame = frame.f_back
    return frame is not None and frame.f_code is entry.__code__


def _fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


class FlopRecorder(FlopCounterMode):
    """FlopCounterMode whose counts are also kept by (innermost module, op, phase), with the
    order in which modules first run in the forward (``first_op``: any op; ``first_flop``:
    an op with FLOPs)."""

    def __init__(self, memory: MemoryTracker | None = None):
        super().__init__(display=False)
        self.memory = memory
        self.phase = "forward"
        self.by: dict[tuple[str, str, str], int] = defaultdict(int)
        self.first_op: dict[str, int] = {}
        self.first_flop: dict[str, int] = {}
        self._ops = 0  # ops seen in the forward: the clock of first_op / first_flop

    def __enter__(self):
        out = super().__enter__()
        if self.memory is not None:  # the memory tracker files allocations by module too
            self.memory.modules = self.mod_tracker
        self._backward_module = ""
        self._made_by: dict[int, tuple[str, weakref.ref]] = {}
        self._hook = torch.nn.modules.module.register_module_forward_hook(self._on_forward)
        return out

    def __exit__(self, *args):
        self._hook.remove()
        self._made_by = {}
        return super().__exit__(*args)

    def _on_forward(self, mod, args, output):
        """Mark where each module's backward begins and ends: a hook on its output's gradient
        (begins) and on its inputs' (ends: back in the module that made the input, else in
        the parent). The module tracker's own backward attribution mixes up modules that
        share an input (q, k, v)."""
        if self.phase != "forward":
            return
        name = self.mod_tracker._get_mod_name(mod)
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        for t in tree_leaves(args):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                back = self._maker(t) or parent
                t.register_hook(lambda g, back=back: self._enter(back))
        for t in tree_leaves(output):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                if (self._maker(t) or "").startswith(name + "."):
                    continue  # a child's output passed through: its backward is the child's
                self._made_by[id(t)] = (name, weakref.ref(t))
                t.register_hook(lambda g, name=name: self._enter(name))

    def _maker(self, t: torch.Tensor) -> str | None:
        """The module whose output ``t`` is, if any. Keyed by id, checked by a weak reference:
        a freed output's id is reused by later tensors, which then took its module (the
        backward's FLOPs went to the wrong tensors, now and then)."""
        made = self._made_by.get(id(t))
        return made[0] if made is not None and made[1]() is t else None

    def _enter(self, name: str) -> None:
        self._backward_module = name

    def _count_flops(self, func_packet, out, args, kwargs):
        where = _innermost(self.mod_tracker.parents) or ""
        if self.phase == "backward":
            where = self._backward_module
        if self.phase == "forward":
            self._ops += 1
            self.first_op.setdefault(where, self._ops)
        if func_packet in self.flop_registry:
            formula = self.flop_registry[func_packet]
            n = formula(*args, **kwargs, out_val=out)
            for par in set(self.mod_tracker.parents):
                self.flop_counts[par][func_packet] += n
            op, forward = _op_name(func_packet), n
            if func_packet in _fused_loss_ops() and self.phase == "forward":
                # the fused losses form their gradients in the forward call: that share is
                # the backward's (their last two arguments: need_grad_hidden, _weight)
                forward = formula(*args[:-2], False, False, **kwargs, out_val=out)
                self.by[(where, op, "backward")] += n - forward
            self.by[(where, op, self.phase)] += forward
            if self.phase == "forward" and n > 0:
                self.first_flop.setdefault(where, self._ops)
        return out

    def phase_total(self, phase: str, module: str | None = None) -> int:
        return sum(n for (m, _, ph), n in self.by.items()
                   if ph == phase and (module is None or m == module))


def _fused_loss_ops() -> set:
    from ..ops import linear_cross_entropy, linear_grpo, linear_otr  # noqa: F401 (registers)

    ops = torch.ops.fastft
    return {ops.linear_cross_entropy, ops.linear_otr, ops.linear_grpo}


def _innermost(parents) -> str | None:
    names = [p for p in parents if p != "Global"]
    return max(names, key=lambda n: n.count(".")) if names else None


def _op_name(packet) -> str:
    name = str(packet)
    return name.replace("aten.", "").replace("fastft.", "fastft::")


def _register_cpu_attention() -> None:
    """torch counts the CUDA attention kernels' FLOPs but not the CPU flash kernel's: the
    same formulas for it, so a step traced (or run) on the CPU counts its attention."""
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in flop_registry:
        @register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in flop_registry:
        @register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                 **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_attention()


def _kv_heads_as_query_heads(args: tuple, first: int) -> tuple:
    """``args`` with the key and value of grouped-query attention (fewer heads than the
    query, [b, h, s, d]) replaced by the shapes they have once broadcast to the query's heads:
    what the kernel computes, and what torch's sdpa formulas before 2.13 require."""
    q, k, v = args[first:first + 3]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return args
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == hq or hkv == 0 or hq % hkv:
        return args
    k, v = (torch.Size((t.shape[0], hq, *t.shape[2:])) for t in (k, v))
    return (*args[:first], q, k, v, *args[first + 3:])


def _count_grouped_query_attention() -> None:
    """Wrap the FLOP formulas of the sdpa ops (forward: query at 0; backward: at 1) so that
    a model with fewer key/value heads than query heads (Llama 3, Mistral, Qwen) is counted
    on every torch: torch 2.11's formulas reject those shapes and stop the whole count."""
    aten = torch.ops.aten
    for name, first in [("_scaled_dot_product_flash_attention", 0),
                        ("_scaled_dot_product_efficient_attention", 0),
                        ("_scaled_dot_product_cudnn_attention", 0),
                        ("_scaled_dot_product_flash_attention_for_cpu", 0),
                        ("_scaled_dot_product_flash_attention_backward", 1),
                        ("_scaled_dot_product_efficient_attention_backward", 1),
                        ("_scaled_dot_product_cudnn_attention_backward", 1),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", 1)]:
        op = getattr(aten, name, None)
        original = flop_registry.get(op) if op is not None else None
        if original is None or getattr(original, "_fastft_gqa", False):
            continue

        def formula(*args, _original=original, _first=first, **kwargs):
            return _original(*_kv_heads_as_query_heads(args, _first), **kwargs)

        formula._fastft_gqa = True
        flop_registry[op] = formula


_count_grouped_query_attention()
