"""The op contract: which backend runs an op, and why.

Every fused op of fastft is declared once (``fastft/ops/<op>.py``) as a
``torch.library`` custom op with a fake (meta) implementation and a registered
autograd formula, and lists the backends it implements. At call time the op
asks :func:`choose` for a backend, given the device of its inputs:

- CUDA tensors: ``triton``, else ``cuda`` (a CUDA C++ kernel), else ``torch``;
- CPU tensors: ``cpp`` (a C++ kernel from csrc/), else ``torch`` (the op's
  chunked PyTorch path);
- ``FASTFT_BACKEND=triton|cuda|cpp|torch|reference`` asks for one backend. An
  op that lacks it, or a device that cannot run it, falls back along
  ``triton -> cuda -> cpp -> torch -> reference`` to the first that works;
  ``fastft info`` prints the choice and the reason. Triton runs on the CPU
  only under ``TRITON_INTERPRET=1`` (the kernel tests).
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field

import torch

from .errors import FastftError

BACKENDS = ("triton", "cuda", "cpp", "torch", "reference")
DEFAULT_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
# fastft.profile listens here while it traces a step: a fake implementation calls
# workspace(nbytes) for the transient buffers its kernels use beyond their outputs
workspace_listeners: list = []


def workspace(nbytes: dict) -> None:
    """Declare the transient workspace of the op being traced, ``{"cuda": bytes, "cpu":
    bytes}`` by the device kind that would run it (a no-op when nothing listens)."""
    for listen in workspace_listeners:
        listen(nbytes)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts to on ``device`` now, or None when it is off: what the
    wrappers of the (autocast-opaque) custom ops cast their inputs to."""
    dev = device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def no_autocast(fn):
    """Run an op's implementation with autocast off.

    A custom op is opaque to autocast, yet its implementation would run under
    the caller's autocast state, turning its fp32-accumulating GEMMs into bf16
    ones. The Python wrapper casts the op's inputs as autocast would; inside,
    the op computes in the dtypes it chose. With autocast already off (the
    common case inside a custom op, whose dispatch leaves it off) the two
    context managers, about 6 us a call, are not entered.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    # torch.library reads the schema from the signature, annotations resolved in fn's module
    wrapper.__signature__ = inspect.signature(fn, eval_str=True)
    return wrapper


def eager_ok(*tensors) -> bool:
    """Whether an op may skip the custom-op dispatcher (tens of microseconds a call) and run
    its implementation through a plain autograd.Function: not while torch.compile traces, not
    under a dispatch mode (fake tensors, fastft.profile's counters), and only for plain
    tensors (no subclass, no torch.func wrapper). Elsewhere the custom op, which those need,
    runs."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(t is None or (type(t) is torch.Tensor and not wrapped(t)) for t in tensors)


@dataclass
class OpInfo:
    """What ``fastft info`` and :func:`choose` know about one op."""

    name: str
    summary: str
    backends: tuple[str, ...]
    cpp_extension: str | None = None  # name of the csrc extension behind the cpp backend
    notes: dict[str, str] = field(default_factory=dict)


_OPS: dict[str, OpInfo] = {}
_broken: dict[str, str] = {}  # backend key -> why it cannot run here


def register(info: OpInfo) -> OpInfo:
    for b in info.backends:
        if b not in BACKENDS:
            raise ValueError(f"{info.name}: unknown backend {b!r}")
    _OPS[info.name] = info
    return info


def registered() -> dict[str, OpInfo]:
    """The ops registered so far: each op module registers itself when imported (``fastft
    info`` imports fastft.ops first, so that all of them are listed)."""
    return dict(_OPS)


def requested() -> str | None:
    name = os.environ.get("FASTFT_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise FastftError(
            f"FASTFT_BACKEND={name!r} is not a backend; use one of {', '.join(BACKENDS)} "
            "or unset it to let fastft choose by device."
        )
    return name


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def mark_broken(key: str, why: str) -> None:
    """Record that a backend failed to build or load, so later calls fall back."""
    _broken[key] = why


def why_unavailable(op: OpInfo, backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend not in op.backends:
        return "the op has no such kernel"
    if backend == "triton":
        if device.type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError:
                return "triton is not installed"
            return None
        return None if interpreter_on() else "Triton on the CPU needs TRITON_INTERPRET=1"
    if backend == "cuda":
        if device.type != "cuda":
            return "needs a CUDA device"
        return _broken.get(f"cuda:{op.cpp_extension}")  # csrc/<name>.cu failed to build
    if backend == "cpp":
        if device.type != "cpu":
            return "the C++ kernels run on the CPU"
        key = f"cpp:{op.cpp_extension}"
        return _broken.get(key)
    return None


def choose(op: OpInfo, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device``."""
    return explain(op, device)[0]


def explain(op: OpInfo, device: torch.device) -> tuple[str, str]:
    """(backend, note): the choice, and why a requested or preferred one was passed over."""
    req = requested()
    if req is not None:
        candidates = BACKENDS[BACKENDS.index(req):]
    else:
        candidates = DEFAULT_ORDER.get(device.type, ("torch",)) + ("torch", "reference")
    skipped = []
    for b in candidates:
        why = why_unavailable(op, b, device)
        if why is None:
            note = "; ".join(skipped)
            return b, note
        if req is not None or b in op.backends:
            skipped.append(f"{b}: {why}")
    return "reference", "; ".join(skipped)
