"""The autograd formula shared by the fused loss ops.

A fused loss op returns (row_loss [T], grad_hidden, grad_weight, *extras) and
forms the two gradients in its forward for an upstream gradient of one on the
summed rows. Its backward then only scales them (fp32 in place; once: a second
backward through one forward is an error). With both ``need_grad`` flags
off while the inputs require gradients (reduction "none", whose upstream
gradient differs per row), the backward instead calls the op again with the
upstream gradient folded into the row weights.
"""

from __future__ import annotations

import torch

from .. import backends
from ..errors import check


def scaled(t: torch.Tensor, g: torch.Tensor, dtype: torch.dtype, *,
           triton: bool = False) -> torch.Tensor:
    """``t * g`` (``g`` a one-element fp32 tensor) as ``dtype``, the product formed in fp32 and
    rounded once, in one pass (read ``t``, write the result: no temporary). In half
    precision ``g`` itself would be rounded first: GradScaler's starting scale 2**16 is inf
    in fp16 (every gradient inf or NaN), and 0.1 is 0.10010 in bf16. The head's gradient
    comes from the forward in fp32 for every head dtype, so its conversion to a half head's
    dtype is this same pass. A ``t`` already in ``dtype`` (fp32, or a bf16 head's gradient
    accumulated in bf16) becomes the result: scaled in place (no second [V, H] tensor), and
    not at all when ``g`` is 1: on the CPU g is read on the host (no device to wait for);
    with ``triton`` (the op's backend) kernels/grad_scale.py reads it on the device and skips
    the pass there. A fake or traced tensor has no value to read: it takes ``mul_``."""
    if t.dtype == dtype:  # in place, the product in fp32 (g is fp32) rounded once
        if type(g) is torch.Tensor and type(t) is torch.Tensor:
            if g.device.type == "cpu" and not triton:
                return t if float(g) == 1.0 else t.mul_(g)
            if triton and t.is_contiguous():
                from ..kernels import grad_scale

                return grad_scale.scale_(t, g)
        return t.mul_(g)
    out = torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)
    return torch.mul(t, g, out=out)  # computed in fp32 (g is fp32), rounded once into out


def register(op, info, *, row_weights: int, need_hidden: int, need_weight: int) -> None:
    """Register the autograd of ``op`` (its backends in ``info``); the other arguments give
    input positions."""

    def setup_context(ctx, inputs, output):
        ctx.in_forward = bool(inputs[need_hidden] or inputs[need_weight])
        ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)  # hidden's and the head's
        ctx.set_materialize_grads(False)
        if ctx.in_forward:
            ctx.save_for_backward(output[1], output[2])
            return
        tensors = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        ctx.tensor_pos = tensors
        ctx.others = {i: x for i, x in enumerate(inputs) if i not in tensors}
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(*(inputs[i] for i in tensors))

    def backward(ctx, g_rows, *_):
        n = len(ctx.needs_input_grad)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_rows is None:
            return (None,) * n
        if ctx.in_forward:
            # the gradients were formed in the forward and are scaled in place here: a second
            # backward through the same forward would scale them twice
            check(not getattr(ctx, "consumed", False), "a fused fastft loss was backpropagated "
                  "twice (backward(retain_graph=True), then backward again): its gradients "
                  "are formed in the forward and used up by the first backward; run the "
                  "forward again for each backward, or sum the losses and call backward once")
            ctx.consumed = True
            gh, gw = ctx.saved_tensors
            # The caller summed the rows: the upstream gradient is one number for all.
            g = g_rows.reshape(-1)[:1].to(torch.float32)
            if g.numel() == 0:
                g = torch.zeros(1, device=g_rows.device)
            tri = backends.choose(info, g.device) == "triton"
            grad_h = scaled(gh, g, ctx.dtypes[0], triton=tri) if need_h and gh.numel() else None
            grad_w = scaled(gw, g, ctx.dtypes[1], triton=tri) if need_w and gw.numel() else None
            return (grad_h, grad_w) + (None,) * (n - 2)
        args = [None] * ctx.n_inputs
        for i, t in zip(ctx.tensor_pos, ctx.saved_tensors):
            args[i] = t
        for i, x in ctx.others.items():
            args[i] = x
        rw = args[row_weights]
        g = g_rows.reshape(-1).to(torch.float32)
        args[row_weights] = (g if rw is None else g * rw.float()).contiguous()
        args[need_hidden], args[need_weight] = bool(need_h), bool(need_w)
        out = op(*args)
        return (out[1].to(ctx.dtypes[0]) if need_h else None,
                out[2].to(ctx.dtypes[1]) if need_w else None) + (None,) * (n - 2)

    op.register_autograd(backward, setup_context=setup_context)
