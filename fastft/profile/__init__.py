"""``fastft.profile``: memory and FLOPs of one training step, before it runs.

The model is built from its config on fake tensors (no weights, no GPU), prepared
with the fastft method, and one real Trainer step is traced: forward, fused
loss, backward, optimizer step. Memory is followed storage by storage (with the
fused ops' declared workspace), FLOPs with torch's FlopCounterMode and fastft's
formulas; a roofline gives a step time per device (devices.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import check
from . import devices
from .devices import DEVICES, parse_bytes
from .report import Profile, plot, table, write_json
from .step import DTYPES, load_config, make_method, trace  # noqa: F401

__all__ = ["DEVICES", "Profile", "fit", "plot", "profile", "table", "write_json"]


def _name(method) -> str:
    return method if isinstance(method, str) else type(method).__name__


def profile(model_or_config, method="lora", *, batch_size: int = 1, seq_len: int = 4096,
            objective: str = "sft", dtype: str = "bf16", gradient_checkpointing: bool = False,
            optimizer: str = "adamw", device: str = "h100", rho: float = 0.5) -> Profile:
    """Memory and FLOPs of one training step of ``method`` on ``model_or_config`` (a
    transformers model, a config, a model folder or a config.json), without weights.

    ``method``: a name (full, lora, lora-sb, lift, hft, ltsft, green) or a fastft method
    object. ``green``: GreenTrainer at ``rho``, with equal importance for every tensor (a
    run's selection depends on its data; its backward stays within the same budget).
    """
    from ..methods.green import GreenTrainer

    dev = device if isinstance(device, devices.Device) else devices.device(device)
    check(str(dtype).lower() in DTYPES, f"dtype must be one of bf16, fp16, fp32; got {dtype!r}")
    check(optimizer == "adamw", f"optimizer must be 'adamw' (the Trainer's); got {optimizer!r}")
    config = load_config(model_or_config)
    torch_dtype = DTYPES[str(dtype).lower()]
    m = make_method(method, config, rho=rho)
    notes, before = [], None
    common = dict(batch_size=batch_size, seq_len=seq_len, objective=objective,
                  dtype=torch_dtype, kind="cpu" if dev.name == "cpu" else "cuda",
                  gradient_checkpointing=gradient_checkpointing)
    if isinstance(m, GreenTrainer):
        from ..methods.green import selection_for
        from .green_costs import measure_costs

        costs = measure_costs(config, m.base, batch_size=batch_size, seq_len=seq_len,
                              dtype=torch_dtype)
        keep = {n for n, s in zip(costs.names, selection_for(costs, [1.0] * len(costs.names),
                                                               m.rho)) if s}
        m._fixed = keep

        def before(model):
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.requires_grad_(n in keep)
        notes.append(f"rho {m.rho}: {len(keep)} of {len(costs.names)} tensors selected with "
                     "equal importance (a run selects by importance, within the same budget)")
    tr = trace(config, m, before_step=before, **common)
    name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model")
    if not isinstance(model_or_config, (torch.nn.Module,)) and \
            isinstance(model_or_config, (str, Path)):
        name = str(model_or_config)
    from .report import from_trace

    return from_trace(tr, model=name, method=_name(method), dev=dev, dtype=str(dtype),
                      batch_size=batch_size, seq_len=seq_len, objective=objective,
                      gradient_checkpointing=gradient_checkpointing, notes=notes)


def fit(model_or_config, method="lora", *, memory: float | str, seq_len: int = 4096,
        **kwargs) -> tuple[str, int, Profile | None]:
    """The largest batch size whose step fits in ``memory`` (bytes or '80GB') at ``seq_len``;
    if batch 1 does not fit, the largest sequence length (a multiple of 128) at batch 1.
    Returns ("batch_size" | "seq_len", value (0: nothing fits), its profile)."""
    budget = parse_bytes(memory) if isinstance(memory, str) else float(memory)
    run = lambda b, s: profile(model_or_config, method, batch_size=b, seq_len=s,  # noqa: E731
                               **kwargs)
    one = run(1, seq_len)
    if one.peak_bytes <= budget:
        two = run(2, seq_len)
        per = max(1, two.peak_bytes - one.peak_bytes)
        b = max(1, int(1 + (budget - one.peak_bytes) // per))
        best, got = 1, one
        if b >= 2:
            lo, hi = 1, b + 1  # the linear guess, checked; bisect if it overshoots
            while lo + 1 < hi:
                mid = (lo + hi) // 2
                p = run(mid, seq_len)
                if p.peak_bytes <= budget:
                    lo, got = mid, p
                    if mid == b:
                        break
                else:
                    hi = mid
            best = lo
        return "batch_size", best, got
    lo, hi, got = 0, seq_len // 128, None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        p = run(1, mid * 128)
        if p.peak_bytes <= budget:
            lo, got = mid, p
        else:
            hi = mid - 1
    return "seq_len", lo * 128, got
