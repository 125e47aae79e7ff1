"""Fused sparse AdamW: update the entries of weights named by index lists, in place.

For entry i with flat weight index o = idx[i] (int32 or int64; offsets are int64):

    g    = grad[i] (a compact fp32 gradient) or grad[o] (the dense gradient)
    m_i  = b1 m_i + (1 - b1) g,        v_i = b2 v_i + (1 - b2) g^2
    w[o] = w[o] decay - step_size (m_i / (sqrt(v_i) / sqrt_bc2 + eps))

with decay = 1 - lr wd (decoupled weight decay), step_size = lr / (1 - b1^t) and
sqrt_bc2 = sqrt(1 - b2^t) computed once on the host. m and v are compact fp32;
the math is fp32 whatever the weight's dtype (fp32, bf16, fp16), rounded once
on the store (to nearest even). Two kernels of one family:

- ``sparse_adam_kernel``: one weight, compact or dense gradient; one program per
  BLOCK of its entries;
- ``sparse_adam_multi_kernel``: many weights of one dtype in one launch, their
  entries concatenated (idx, m, v and the compact gradient are flat; segment j
  belongs to weight j); a table of weight addresses and one of blocks
  (segment, start) lets each program find its weight.

csrc/sparse_adam.cpp and fastft/ops/sparse_adam.py compute the same.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

CONFIGS = ((1024, 4),)  # (BLOCK, num_warps): 8 entries per thread
_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# Read at import, as @triton.jit reads it: under the interpreter a kernel runs on numpy.
INTERPRET = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def _bf16_by_bits(x):
    """fp32 -> bf16, round to nearest even, by integer arithmetic on the bits (NaN stays NaN)."""
    bits = x.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    r = tl.where(x != x, bits >> 16, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round_to(x, dst: tl.constexpr):
    """fp32 -> ``dst``, round to nearest even. On the GPU the hardware conversion (Triton's fp
    downcast rounds to nearest even: one F2FP per pair); under the interpreter, whose fp32 ->
    bf16 cast truncates, bf16 by bit arithmetic, so that both give the same bits."""
    if INTERPRET:
        if dst == tl.bfloat16:
            return _bf16_by_bits(x)
        else:
            return x.to(dst)
    else:
        return x.to(dst)


@triton.jit
def _update(w, g, m, v, b1, c1, b2, c2, eps, decay, step_size, sqrt_bc2):
    m = b1 * m + c1 * g
    v = b2 * v + c2 * (g * g)
    w = w * decay - step_size * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps)
    return w, m, v


@triton.jit
def sparse_adam_kernel(
    w_ptr, g_ptr, idx_ptr, m_ptr, v_ptr, n,
    b1, c1, b2, c2, eps, decay, step_size, sqrt_bc2,
    COMPACT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    o = tl.load(idx_ptr + offs, mask=ok, other=0).to(tl.int64)
    if COMPACT:
        g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    else:
        g = tl.load(g_ptr + o, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0)
    w = tl.load(w_ptr + o, mask=ok, other=0.0).to(tl.float32)
    w, m, v = _update(w, g, m, v, b1, c1, b2, c2, eps, decay, step_size, sqrt_bc2)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)
    tl.store(w_ptr + o, _round_to(w, w_ptr.dtype.element_ty), mask=ok)


@triton.jit
def sparse_adam_multi_kernel(
    w_table, g_ptr, idx_ptr, m_ptr, v_ptr, blk_seg, blk_start, seg_end,
    b1, c1, b2, c2, eps, decay, step_size, sqrt_bc2,
    W_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = tl.load(blk_seg + pid)
    offs = tl.load(blk_start + pid) + tl.arange(0, BLOCK)
    ok = offs < tl.load(seg_end + seg)
    w_ptr = tl.load(w_table + seg).to(tl.pointer_type(W_DTYPE))
    o = tl.load(idx_ptr + offs, mask=ok, other=0).to(tl.int64)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0)
    w = tl.load(w_ptr + o, mask=ok, other=0.0).to(tl.float32)
    w, m, v = _update(w, g, m, v, b1, c1, b2, c2, eps, decay, step_size, sqrt_bc2)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)
    tl.store(w_ptr + o, _round_to(w, W_DTYPE), mask=ok)


_tables: OrderedDict = OrderedDict()  # (device, weight addresses, offsets) -> device tables


def _block_tables(weights, offsets, block):
    """Weight addresses and the (segment, start) of every block, on the weights' device;
    cached, so a training loop builds them once (an optimizer's buffers do not move)."""
    key = (str(weights[0].device), tuple(w.data_ptr() for w in weights), tuple(offsets), block)
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    segs, starts = [], []
    for j in range(len(weights)):
        for s in range(offsets[j], offsets[j + 1], block):
            segs.append(j)
            starts.append(s)
    dev = weights[0].device
    hit = (torch.tensor(key[1], dtype=torch.int64, device=dev),
           torch.tensor(segs, dtype=torch.int32, device=dev),
           torch.tensor(starts, dtype=torch.int64, device=dev),
           torch.tensor(offsets[1:], dtype=torch.int64, device=dev))
    _tables[key] = hit
    if len(_tables) > 64:
        _tables.popitem(last=False)
    return hit


def step(weights: list[torch.Tensor], grads: list[torch.Tensor], idx: torch.Tensor,
         exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, offsets: list[int], *, beta1: float,
         beta2: float, eps: float, decay: float, step_size: float, sqrt_bc2: float,
         compact: bool) -> None:
    """One sparse AdamW update of ``weights`` (segment j of the flat idx, m, v, and of a
    compact gradient, belongs to weight j), in place."""
    block, warps = CONFIGS[0]
    scalars = (beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, decay, step_size, sqrt_bc2)
    if compact and len(weights) > 1:
        table, segs, starts, ends = _block_tables(weights, offsets, block)
        if segs.numel():
            sparse_adam_multi_kernel[(segs.numel(),)](
                table, grads[0], idx, exp_avg, exp_avg_sq, segs, starts, ends, *scalars,
                W_DTYPE=_DTYPES[weights[0].dtype], BLOCK=block, num_warps=warps)
        return
    for j, w in enumerate(weights):
        a, b = offsets[j], offsets[j + 1]
        if b > a:
            g = grads[0][a:b] if compact else grads[j]
            sparse_adam_kernel[(triton.cdiv(b - a, block),)](
                w, g, idx[a:b], exp_avg[a:b], exp_avg_sq[a:b], b - a, *scalars,
                COMPACT=compact, BLOCK=block, num_warps=warps)


def aot_specs():
    """bf16 / fp16 / fp32 weights, int32 and int64 indices, compact or dense gradient."""
    specs = []
    scalars = {s: "fp32" for s in ("b1", "c1", "b2", "c2", "eps", "decay", "step_size",
                                   "sqrt_bc2")}
    for block, warps in CONFIGS:
        for wt, it, compact in (("bf16", "i32", True), ("bf16", "i32", False),
                                ("bf16", "i64", True), ("fp16", "i32", True),
                                ("fp32", "i32", True), ("fp32", "i64", False)):
            specs.append(dict(
                name="sparse_adam", kernel=sparse_adam_kernel, matrix=False,
                signature={"w_ptr": f"*{wt}", "g_ptr": "*fp32" if compact else f"*{wt}",
                           "idx_ptr": f"*{it}", "m_ptr": "*fp32", "v_ptr": "*fp32", "n": "i64",
                           **scalars},
                constexprs={"COMPACT": compact, "BLOCK": block},
                # torch allocations are 16-byte aligned; the entry count is arbitrary
                hints={p: 16 for p in ("w_ptr", "g_ptr", "idx_ptr", "m_ptr", "v_ptr")},
                options={"num_warps": warps},
                config=f"BLOCK={block} w={wt} idx={it} grad={'compact' if compact else 'dense'}"))
        for wt, it in (("bf16", "i32"), ("bf16", "i64"), ("fp16", "i32"), ("fp32", "i32")):
            specs.append(dict(
                name="sparse_adam_multi", kernel=sparse_adam_multi_kernel, matrix=False,
                signature={"w_table": "*i64", "g_ptr": "*fp32", "idx_ptr": f"*{it}",
                           "m_ptr": "*fp32", "v_ptr": "*fp32", "blk_seg": "*i32",
                           "blk_start": "*i64", "seg_end": "*i64", **scalars},
                constexprs={"W_DTYPE": getattr(tl, {"bf16": "bfloat16", "fp16": "float16",
                                                    "fp32": "float32"}[wt]), "BLOCK": block},
                hints={p: 16 for p in ("w_table", "g_ptr", "idx_ptr", "m_ptr", "v_ptr",
                                       "blk_seg", "blk_start", "seg_end")},
                options={"num_warps": warps},
                config=f"BLOCK={block} w={wt} idx={it} grad=compact, multi-tensor"))
    return specs
