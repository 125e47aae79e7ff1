"""A profile's figures: the ``Profile`` record, its terminal table, JSON and figure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .tracker import CATEGORIES, module_pattern

GiB = 2**30


@dataclass
class Profile:
    """One training step of one model and method, on one device (bytes, FLOPs, seconds)."""

    model: str
    method: str
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    objective: str
    gradient_checkpointing: bool
    parameters: int
    trainable: int
    peak_bytes: int
    peak_phase: str
    memory_at_peak: dict  # category -> bytes, at the peak
    static: dict  # parameters / gradients / optimizer bytes of the step
    activations_saved: int  # bytes saved for backward at the end of the forward
    activations_by_module: dict
    flops_forward: int
    flops_backward: int
    flops_by_module: dict  # module pattern -> {"forward": , "backward": }
    flops_by_op: dict  # op -> {"forward": , "backward": }
    step_seconds: float  # roofline lower bound on the device: max(compute, memory) time
    step_seconds_no_overlap: float  # compute time + memory time
    bytes_moved: float  # the bytes the bound counts (weights read, optimizer, activations)
    tokens_per_s: float
    device_memory: float
    fits: bool
    notes: list = field(default_factory=list)

    @property
    def flops(self) -> int:
        return self.flops_forward + self.flops_backward

    def to_dict(self) -> dict:
        return asdict(self)


def from_trace(tr, *, model: str, method: str, dev, dtype: str, batch_size: int, seq_len: int,
               objective: str, gradient_checkpointing: bool, notes=()) -> Profile:
    by_module: dict[str, dict[str, int]] = {}
    by_op: dict[str, dict[str, int]] = {}
    fwd = bwd = 0
    for (module, op, phase), n in tr.flops.by.items():
        if phase not in ("forward", "backward") or not n:
            continue
        key = module_pattern(module)
        by_module.setdefault(key, {"forward": 0, "backward": 0})[phase] += n
        by_op.setdefault(op, {"forward": 0, "backward": 0})[phase] += n
        if phase == "forward":
            fwd += n
        else:
            bwd += n
    saved = sum(tr.activations_by_module.values())
    # bytes the step moves at least: the forward reads every weight and the backward reads
    # them again for the input gradients (a third time with gradient checkpointing's
    # recompute); the optimizer reads and writes its state and the trained weights and reads
    # the gradients (weights counted at the gradients' size); the saved activations are
    # written, read back, and their gradients written
    st = tr.static
    weight_reads = (3 if gradient_checkpointing else 2) * st["parameters"]
    moved = weight_reads + 2 * st["optimizer"] + 4 * st["gradients"] + 3 * saved
    seconds = dev.step_seconds(fwd + bwd, moved)
    return Profile(
        model=model, method=method, device=dev.name, dtype=dtype, batch_size=batch_size,
        seq_len=seq_len, objective=objective, gradient_checkpointing=gradient_checkpointing,
        parameters=tr.params, trainable=tr.trainable, peak_bytes=tr.peak_bytes,
        peak_phase=tr.peak_phase, memory_at_peak=dict(tr.memory), static=dict(st),
        activations_saved=saved, activations_by_module=dict(tr.activations_by_module),
        flops_forward=fwd, flops_backward=bwd, flops_by_module=by_module, flops_by_op=by_op,
        step_seconds=seconds, step_seconds_no_overlap=dev.no_overlap_seconds(fwd + bwd, moved),
        bytes_moved=float(moved), tokens_per_s=batch_size * seq_len / seconds,
        device_memory=dev.memory, fits=tr.peak_bytes <= dev.memory, notes=list(notes))


def _units(profiles: list[Profile]) -> tuple[str, float, str, float]:
    """GiB and TFLOP for real models; MiB and GFLOP for small ones."""
    big_mem = max(p.peak_bytes for p in profiles) >= GiB
    big_flops = max(p.flops for p in profiles) >= 1e12
    return ("GiB", GiB) if big_mem else ("MiB", 2**20), \
        ("TFLOP", 1e12) if big_flops else ("GFLOP", 1e9)


def table(profiles: list[Profile]) -> str:
    """Rows: figures; columns: one per method."""
    p0 = profiles[0]
    head = (f"fastft profile: {p0.model}, {p0.objective}, batch {p0.batch_size} x "
            f"{p0.seq_len} tokens, {p0.dtype}, on {p0.device}"
            + (", gradient checkpointing" if p0.gradient_checkpointing else ""))
    (mu, ms), (fu, fs) = _units(profiles)
    rows = [("parameters (M)", lambda p: f"{p.parameters / 1e6:,.1f}"),
            ("trainable (M)", lambda p: f"{p.trainable / 1e6:,.1f}")]
    rows += [(f"{c} at peak ({mu})", lambda p, c=c: f"{p.memory_at_peak.get(c, 0) / ms:.2f}")
             for c in CATEGORIES if c != "inputs"]
    rows += [(f"peak ({mu})", lambda p: f"{p.peak_bytes / ms:.2f}"),
             ("peak reached in", lambda p: p.peak_phase),
             (f"fits in {p0.device_memory / 1e9:.0f} GB", lambda p: "yes" if p.fits else "NO"),
             (f"forward {fu}", lambda p: f"{p.flops_forward / fs:.2f}"),
             (f"backward {fu}", lambda p: f"{p.flops_backward / fs:.2f}"),
             (f"step {fu}", lambda p: f"{p.flops / fs:.2f}"),
             ("step time, roofline bound (ms)", lambda p: f"{p.step_seconds * 1e3:,.1f}"),
             ("step time, no overlap (ms)",
              lambda p: f"{p.step_seconds_no_overlap * 1e3:,.1f}"),
             ("tokens/s, roofline bound", lambda p: f"{p.tokens_per_s:,.0f}")]
    cols = ["", *[p.method for p in profiles]]
    body = [[name, *[f(p) for p in profiles]] for name, f in rows]
    widths = [max(len(str(r[i])) for r in [cols, *body]) for i in range(len(cols))]
    line = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)  # noqa: E731
                               for i, (v, w) in enumerate(zip(r, widths)))
    out = [head, line(cols), "  ".join("-" * w for w in widths), *map(line, body)]
    for p in profiles:
        out += [f"{p.method}: {n}" for n in p.notes]
    return "\n".join(out)


def write_json(profiles: list[Profile], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([p.to_dict() for p in profiles], indent=1))
    return path


def module_kind(pattern: str) -> str:
    """A coarse module type for the FLOPs figure."""
    if pattern == "(loss head)":
        return "loss head"
    if "attn" in pattern or "attention" in pattern:
        return "attention"
    if "mlp" in pattern or "ffn" in pattern or "expert" in pattern:
        return "mlp"
    return "other"


def plot(profiles: list[Profile], path: Path) -> Path | None:
    """Memory at the peak by category (one bar per method) and FLOPs by module type."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastft: matplotlib is not installed, so no PNG was written "
              "(pip install matplotlib)")
        return None
    p0 = profiles[0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = [p.method for p in profiles]
    bottom = [0.0] * len(profiles)
    for c in CATEGORIES:
        vals = [p.memory_at_peak.get(c, 0) / GiB for p in profiles]
        if any(vals):
            ax1.bar(names, vals, bottom=bottom, label=c)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.axhline(p0.device_memory / GiB, color="k", ls="--", lw=1,
                label=f"{p0.device} memory")
    ax1.set_ylabel("GiB at the step's peak")
    ax1.set_title("memory by category")
    ax1.legend(fontsize=8)
    kinds = ["attention", "mlp", "loss head", "other"]
    width = 0.8 / len(profiles)
    for i, p in enumerate(profiles):
        tot = {k: 0.0 for k in kinds}
        for pat, v in p.flops_by_module.items():
            tot[module_kind(pat)] += (v["forward"] + v["backward"]) / 1e12
        ax2.bar([j + i * width for j in range(len(kinds))], [tot[k] for k in kinds], width,
                label=p.method)
    ax2.set_xticks([j + width * (len(profiles) - 1) / 2 for j in range(len(kinds))], kinds)
    ax2.set_ylabel("TFLOP per step (forward + backward)")
    ax2.set_title("FLOPs by module type")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{p0.model}: batch {p0.batch_size} x {p0.seq_len}, {p0.dtype}, "
                 f"on {p0.device} (fastft profile)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
