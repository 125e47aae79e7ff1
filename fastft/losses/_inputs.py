"""Checks and shaping shared by the fused losses: every user error becomes a FastftError."""

from __future__ import annotations

import os

import torch

from .. import backends
from ..errors import FastftError, check

REDUCTIONS = ("mean", "sum", "none")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def debug() -> bool:
    return os.environ.get("FASTFT_DEBUG") == "1"


def head(hidden: torch.Tensor, weight: torch.Tensor, name: str = "hidden",
         bias: torch.Tensor | None = None):
    """Check hidden [..., H] against weight [V, H]; return (hidden [T, H], weight), dtypes matched.

    Under autocast both are cast to the autocast dtype (as nn.Linear would be);
    otherwise their dtypes must agree. With ``bias`` [V] (an output head with a
    bias, as Phi-1/Phi-2 have) the result is augmented, see :func:`with_bias`.
    """
    check(isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor),
          f"{name} and weight must be tensors")
    check(weight.dim() == 2, f"weight must be the output head [V, H]; got shape "
          f"{tuple(weight.shape)}")
    check(hidden.dim() >= 1 and hidden.shape[-1] == weight.shape[1],
          f"{name} has hidden size {hidden.shape[-1] if hidden.dim() else '?'} (shape "
          f"{tuple(hidden.shape)}) but weight [V, H] = {tuple(weight.shape)} expects H = "
          f"{weight.shape[1]}: pass the final hidden states (before the lm_head), not the logits")
    check(hidden.device == weight.device,
          f"{name} is on {hidden.device} but weight is on {weight.device}: move both to one device")
    dt = backends.autocast_dtype(hidden.device)
    if dt is not None:
        hidden, weight = hidden.to(dt), weight.to(dt)
    check(hidden.dtype in FLOATS and weight.dtype in FLOATS,
          f"{name} and weight must be float32, float16 or bfloat16; got {hidden.dtype} and "
          f"{weight.dtype}")
    check(hidden.dtype == weight.dtype,
          f"{name} is {hidden.dtype} but weight is {weight.dtype}: cast one to the other "
          "(or run under torch.autocast)")
    if bias is not None:
        hidden, weight = with_bias(hidden, weight, bias)
    return hidden.reshape(-1, hidden.shape[-1]), weight


def with_bias(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(hidden | 1) [..., H+1] and (weight | bias) [V, H+1]: h W^T + b = (h|1)(W|b)^T exactly.

    Every fused loss then serves a head with a bias unchanged. Gradients reach
    ``bias`` through ``torch.cat`` (the last column of the augmented weight's
    gradient) and ``hidden`` / ``weight`` through the other columns. The cost: a
    copy of the head, V x (H+1), and of hidden, T x (H+1), per call. ``bias`` None
    returns the inputs as they are. Under autocast the bias is cast like the weight.
    """
    if bias is None:
        return hidden, weight
    V = weight.shape[0]
    check(isinstance(bias, torch.Tensor) and tuple(bias.shape) == (V,),
          f"bias must be the output head's bias, shape ({V},); got "
          f"{tuple(getattr(bias, 'shape', ()))}")
    check(bias.device == weight.device,
          f"bias is on {bias.device} but weight is on {weight.device}")
    if backends.autocast_dtype(weight.device) is not None:
        bias = bias.to(weight.dtype)  # head() has cast weight already; a reference casts later
    check(bias.dtype == weight.dtype, f"bias is {bias.dtype} but weight is {weight.dtype}: "
          "cast one to the other (or run under torch.autocast)")
    ones = hidden.new_ones(*hidden.shape[:-1], 1)
    return torch.cat([hidden, ones], -1), torch.cat([weight, bias[:, None]], 1)


def labels_like(labels: torch.Tensor, hidden: torch.Tensor, V: int, ignore_index: int,
                name: str = "labels", where: torch.Tensor | None = None) -> torch.Tensor:
    """Check token ids against hidden's leading dims and [0, V); return them flat, int64.

    The range check costs no device sync: it always runs for CPU tensors and,
    for CUDA tensors, only under FASTFT_DEBUG=1. Without it, a row whose label
    is out of range gets a NaN loss (the kernels never read outside the row).
    """
    check(isinstance(labels, torch.Tensor), f"{name} must be a tensor of token ids")
    check(not labels.is_floating_point() and not labels.is_complex()
          and labels.dtype != torch.bool,
          f"{name} must hold integer token ids (int64); got {labels.dtype}: pass "
          f"{name}.long()")
    lead = tuple(hidden.shape[:-1])
    check(tuple(labels.shape) == lead,
          f"{name} has shape {tuple(labels.shape)} but hidden's leading dims are {lead}: "
          f"there must be one {name[:-1] if name.endswith('s') else name} per hidden row")
    check(labels.device == hidden.device,
          f"{name} is on {labels.device} but hidden is on {hidden.device}")
    flat = labels.reshape(-1).long()
    if where is not None:
        flat = torch.where(where.reshape(-1), flat, 0)
    if has_data(flat) and (labels.device.type == "cpu" or debug()):
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= V))
        if bool(bad.any()):
            first = int(flat[bad][0])
            raise FastftError(
                f"{name} holds {int(bad.sum())} id(s) outside [0, {V}) (first: {first}) that "
                f"are not ignore_index={ignore_index}: check the tokenizer's vocabulary "
                "against the model's output head")
    return flat


def has_data(t: torch.Tensor) -> bool:
    """False for meta and fake tensors (shape-only tracing), whose values cannot be read."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t)


def row_weights(weights, hidden: torch.Tensor):
    if weights is None:
        return None
    check(isinstance(weights, torch.Tensor) and tuple(weights.shape) == tuple(hidden.shape[:-1]),
          f"weights must have one value per row, shape {tuple(hidden.shape[:-1])}; got "
          f"{tuple(getattr(weights, 'shape', ()))}")
    return weights.reshape(-1).to(device=hidden.device, dtype=torch.float32).contiguous()


def normalizer(reduction: str, mask: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """The divisor of the summed row losses, as a 0-d fp32 tensor (no host sync)."""
    check(reduction in REDUCTIONS,
          f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if num_items_in_batch is not None:
        check(reduction == "mean",
              "num_items_in_batch sets the divisor of reduction='mean' (gradient accumulation); "
              f"it cannot be combined with reduction={reduction!r}")
        n = torch.as_tensor(num_items_in_batch, device=mask.device, dtype=torch.float32)
        check(n.numel() == 1, "num_items_in_batch must be one number")
        return n.reshape(())
    if reduction == "mean":
        return mask.sum().to(torch.float32).clamp(min=1.0)
    return torch.ones((), device=mask.device, dtype=torch.float32)


def options(*, label_smoothing=0.0, z_loss=0.0, softcap=None, temperature=1.0):
    check(0.0 <= float(label_smoothing) < 1.0,
          f"label_smoothing must be in [0, 1); got {label_smoothing}")
    check(float(z_loss) >= 0.0, f"z_loss must be >= 0; got {z_loss}")
    check(softcap is None or float(softcap) > 0.0, f"softcap must be > 0 or None; got {softcap}")
    check(float(temperature) > 0.0, f"temperature must be > 0; got {temperature}")
    return float(label_smoothing), float(z_loss), float(softcap or 0.0), float(temperature)


def wants_grad(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad
