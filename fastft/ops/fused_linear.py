"""The chunk loop shared by every fused loss of the loss head.

For a chunk of C rows of the hidden states h [T, H] and the head W [V, H]:

1. z = h_c W^T, the chunk's logits [C, V], in fp32 (a GEMM);
2. the row-stats kernel: logsumexp, gathered entries, optional sums;
3. the loss's own per-row formula (small [C] tensors, plain torch) gives the
   per-row loss and the coefficients c, u, w of dz = (c p + u - sum_j w_j e_j) ds/dz;
4. the row-grad kernel writes dz over the chunk;
5. grad_h[c] = dz W (a GEMM, fp32 accumulation);
6. grad_W += dz^T h over the rows of several chunks at once (:func:`grad_w_rows`, at least
   1024 on a GPU): each such GEMM reads and writes the whole fp32 [V, H] accumulator, so a
   K of one chunk's rows (512 at T = 8192 on Llama-3's head) would spend a pass over it
   per chunk.

Only one chunk of logits exists at a time: the memory ceiling is C x V, not
T x V. The row kernels come from the chosen backend (Triton, C++ or torch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .. import backends
from ..errors import FastftError
from . import gemm

# On the CPU a chunk holds at least this many logits (64 MiB in fp32): the GEMMs of skinny
# chunks run well below the CPU's GEMM rate (at V = 32000, 128 rows took 1.4x the time of 512).
CPU_MIN_LOGITS = 1 << 24


def env_rows(name: str) -> int | None:
    """A row count set by the environment variable ``name`` (a positive integer), or None."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise FastftError(f"{name}={text!r} is not a row count: give a positive integer, or "
                          "unset it for the default")
    return int(text)


def chunk_rows(T: int, V: int, H: int, *, cpu: bool = False) -> int:
    """Rows per chunk: about T*H logits per chunk (the size of the hidden states); on the
    CPU (``cpu``) at least CPU_MIN_LOGITS, unless that is more than T / 8 rows."""
    env = env_rows("FASTFT_LOSS_CHUNK")
    if env:
        return env
    want = max(1, -(-T * H // max(V, 1)))
    rows = 1 << (want - 1).bit_length()
    if cpu:  # but never more than an eighth of the rows: the memory ceiling stays T*V/8 at most
        floor = 1 << (max(1, CPU_MIN_LOGITS // max(V, 1)).bit_length() - 1)
        rows = max(rows, min(floor, max(128, T // 8)))
    return max(1, min(T, max(128, rows)))


# Rows of dz behind each head-gradient GEMM on a GPU. A GEMM of K rows does 2 K V H FLOPs
# and reads and writes the V x H fp32 accumulator (8 V H bytes): K / 4 FLOP per byte. The
# H100's and H200's bf16 balance points are about 200-300 FLOP per byte; 1024 rows reach
# 256, where one chunk (T*H/V rows rounded up to a power of two: 512 at T = 8192 and
# Llama-3's 128256 x 4096) reaches half that. The CPU's chunks are large already.
GPU_GRAD_W_ROWS = 1024


def grad_w_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype grad_W is accumulated (and handed to the backward) in. fp32 by default,
    whatever the head's dtype: exact to fp32 rounding, at V x H x 4 bytes (2 GiB for
    Llama-3's 128256 x 4096 head). ``FASTFT_LOSS_GRAD_W_DTYPE=bf16`` bounds it to half that
    for a bf16 head, as Liger Kernel does: each head-gradient GEMM (1024 rows or more on a
    GPU) rounds the running sum to bf16 once, and the backward scales it in place. fp32 and
    fp16 heads keep the fp32 sum (fp16's range cannot hold it)."""
    name = os.environ.get("FASTFT_LOSS_GRAD_W_DTYPE", "fp32").strip().lower()
    if name not in ("fp32", "bf16"):
        raise FastftError(f"FASTFT_LOSS_GRAD_W_DTYPE={name!r}: use fp32 (exact, the default) or "
                          "bf16 (half the memory for a bf16 head, as Liger Kernel accumulates)")
    if name == "bf16" and weight_dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def grad_w_rows(T: int, step: int, *, cpu: bool = False) -> int:
    """Rows of dz per head-gradient GEMM: a multiple of the chunk rows ``step``, at least
    ``FASTFT_LOSS_GRAD_W_ROWS`` (default 1024 on a GPU, one chunk on the CPU), at most
    what T needs."""
    want = env_rows("FASTFT_LOSS_GRAD_W_ROWS") or (step if cpu else GPU_GRAD_W_ROWS)
    chunks = max(1, -(-max(want, step) // step))
    return min(chunks, max(1, -(-T // step))) * step


class Head:
    """The output head W prepared for the chunk GEMMs of one call."""

    def __init__(self, weight: torch.Tensor):
        weight = weight.contiguous()
        self.mixed = gemm.mixed_ok(weight)
        # On the CPU everything runs in fp32 (a bf16/fp16 head is upcast once per call).
        self.w = weight if weight.is_cuda else weight.float()
        self.grad_dtype = self.w.dtype  # dtype of dz for the backward GEMMs

    def logits(self, h_c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """h_c W^T, into ``out`` (of the head's dtype) when given."""
        if self.mixed:
            return gemm.mm_f32(h_c, self.w.t())
        if out is not None:
            return torch.mm(h_c.to(self.w.dtype), self.w.t(), out=out)
        return h_c.to(self.w.dtype) @ self.w.t()

    def grad_hidden(self, dz: torch.Tensor, out: torch.Tensor,
                    dz_scale: torch.Tensor | None = None) -> None:
        """out = dz W, each row times ``dz_scale`` (in fp32) when given."""
        if dz_scale is not None:
            out.copy_(gemm.mm_f32(dz, self.w).mul_(dz_scale[:, None]))
        elif out.dtype == dz.dtype:
            torch.mm(dz, self.w, out=out)
        elif out.dtype == torch.float32:  # fp32 out of half operands, no half rounding between
            out.copy_(gemm.mm_f32(dz, self.w))
        else:
            out.copy_(dz @ self.w)

    def accumulate_grad_weight(self, acc: torch.Tensor, dz: torch.Tensor, h_c: torch.Tensor,
                               dz_scale: torch.Tensor | None = None):
        """acc += dz^T h_c; a row scale of dz moves onto h_c's rows. A bf16 ``acc`` (the
        bounded-memory option) takes each GEMM's fp32 sum rounded once."""
        if dz_scale is not None:
            h_c = (h_c.float() * dz_scale[:, None]).to(h_c.dtype)
        if acc.dtype != torch.float32:
            acc.addmm_(dz.t().to(acc.dtype), h_c.to(acc.dtype))
            return
        gemm.addmm_f32_(acc, dz.t(), h_c)


def row_scale(labels: torch.Tensor, ignore_index: int, normalizer: torch.Tensor,
              row_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, scale): the unmasked rows, and each row's weight / normaliser (0 where masked)."""
    mask = labels != ignore_index
    scale = mask.float() / normalizer.float()
    return mask, scale if row_weights is None else scale * row_weights.float()


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops hand a gradient to their backward in: fp32 for fp16 inputs. The ops
    form it for an upstream gradient of one; in fp16 its small entries would fall among the
    subnormals (DFT's grad_hidden, at a loss scale of 2**16, came back 27% off) before the
    backward multiplies by the loss scale and rounds once."""
    return torch.float32 if dtype == torch.float16 else dtype


def op_outputs(hidden: torch.Tensor, row_loss, grad_h, grad_w) -> tuple:
    """(row_loss, grad_h, grad_w) as a custom op returns them: a gradient not formed is empty."""
    return (row_loss, hidden.new_empty(0) if grad_h is None else grad_h,
            hidden.new_empty(0) if grad_w is None else grad_w)


def fake_outputs(hidden: torch.Tensor, weight: torch.Tensor, need_grad_hidden: bool,
                 need_grad_weight: bool, ref: bool = False) -> tuple:
    """The shapes of :func:`op_outputs`, for the ops' fake implementations; declares the
    transient workspace of :func:`run` (for fastft.profile)."""
    T, H = hidden.shape
    V = weight.shape[0]
    rows = min(T, chunk_rows(T, V, H))
    cpu_rows = min(T, chunk_rows(T, V, H, cpu=True))
    # the chunk's fp32 logits (and the reference's); the CPU runs larger chunks
    cuda = rows * V * 4 * (2 if ref else 1)
    cpu = cpu_rows * V * 4 * (2 if ref else 1)
    gw_rows = grad_w_rows(T, rows) if need_grad_weight else rows
    if gw_rows > rows:  # dz of several chunks, in the head's dtype, behind each grad_W GEMM
        cuda += gw_rows * V * weight.element_size()
    elif weight.dtype != torch.float32:
        cuda += rows * V * weight.element_size()  # dz in the head's dtype beside the logits
    cpu_gw = grad_w_rows(T, cpu_rows, cpu=True) if need_grad_weight else cpu_rows
    if cpu_gw > cpu_rows:
        cpu += cpu_gw * V * 4
    if weight.dtype != torch.float32:
        cpu += V * H * 4  # the CPU upcasts the head once per call
    # grad_W's accumulator is the output itself (the backward casts it as it scales)
    work = {"cuda": cuda, "cpu": cpu}
    backends.workspace(work)
    return (hidden.new_empty(hidden.shape[0], dtype=torch.float32),
            torch.empty_like(hidden, dtype=grad_dtype(hidden.dtype)) if need_grad_hidden
            else hidden.new_empty(0),
            torch.empty_like(weight, dtype=grad_w_dtype(weight.dtype)) if need_grad_weight
            else hidden.new_empty(0))


HALF_RANGE_DTYPES = (torch.float16,)  # a dz in these has its digits only near 1


@dataclass
class RowCoeffs:
    """A loss's per-row result for one chunk: loss and gradient coefficients."""

    loss: torch.Tensor  # [C] fp32, already scaled by row weight and normaliser
    c: torch.Tensor  # [C] coefficient of p
    u: torch.Tensor  # [C] constant added to every vocabulary entry
    w: torch.Tensor  # [C, J] coefficients of the gathered entries (subtracted)
    lam: torch.Tensor | None = None  # [C] weight of KL(p_ref || p) (with a reference head)

    def normalised(self) -> tuple[RowCoeffs, torch.Tensor]:
        """(coefficients of dz / s, s): s per row bounds the row's |dz| (p and p_ref are at
        most 1, the softcap's slope too), so dz / s lies in [-1, 1] with its large entries
        near 1. fp16's normal range starts at 6e-5: DFT's dz (p_y times CE's), written as
        it is, falls below it and loses its digits; written over s it keeps them, and the
        GEMMs multiply s back in fp32. Masked rows (s = 0) and non-finite rows keep s = 1."""
        bound = self.c.abs() + self.u.abs() + self.w.abs().sum(1)
        if self.lam is not None:
            bound = bound + self.lam.abs()
        s = torch.where(torch.isfinite(bound) & (bound > 0), bound, torch.ones_like(bound))
        inv = 1.0 / s
        lam = None if self.lam is None else self.lam * inv
        return RowCoeffs(loss=self.loss, c=self.c * inv, u=self.u * inv,
                         w=self.w * inv[:, None], lam=lam), s


def run(hidden: torch.Tensor, weight: torch.Tensor, *, rows, idx, coeffs, softcap: float,
        temperature: float, need_grad_hidden: bool, need_grad_weight: bool,
        want_sum: bool = False, want_entropy: bool = False, ref=None,
        row_scale: torch.Tensor | None = None, stats=None):
    """Run the chunk loop. Returns (row_loss [T], grad_hidden or None, grad_weight or None:
    in :func:`grad_w_dtype`, fp32 by default whatever the head's dtype, for the backward to
    scale and cast in one pass).

    ``rows``: the backend's row-kernel module (``row_stats``, ``row_grad``).
    ``idx``: the vocabulary entries to gather per row, an int64 [T, J] tensor (-1
    for none), or a function ``idx(start, end, z)`` returning the chunk's [C, J]
    (to gather entries sampled from the chunk's logits).
    ``coeffs(start, end, stats, idx_c)`` turns the chunk's stats into a :class:`RowCoeffs`.
    ``stats``: None, or a function ``stats(start, end, z)`` returning the chunk's (idx_c,
    stats) in place of ``idx`` and the row-stats kernel (OTR's sampler draws its entries and
    the logsumexp in one read of the logits).
    ``ref``: None, or (ref_hidden [T, H], ref_weight [V, H]) whose softmax p_ref
    enters as lam * KL(p_ref || p) (no gradient reaches the reference).
    ``row_scale``: the op's per-row weights [T] (1 / normaliser and the row weights); with an
    fp16 dz (:meth:`RowCoeffs.normalised`) grad_W is accumulated in units of their largest, so
    that neither of its fp16 operands carries a factor like 1 / 2**18 (HF's num_items_in_batch
    over a gradient-accumulation step) into fp16's subnormals.
    """
    hidden = hidden.contiguous()
    T, H = hidden.shape
    V = weight.shape[0]
    head = Head(weight)
    ref_head = None
    if ref is not None:
        ref_hidden = ref[0].contiguous()
        ref_head = head if ref[1] is weight else Head(ref[1])
    row_loss = torch.empty(T, device=hidden.device, dtype=torch.float32)
    grad_h = torch.empty_like(hidden, dtype=grad_dtype(hidden.dtype)) \
        if need_grad_hidden else None
    acc_dtype = grad_w_dtype(weight.dtype)  # read (and checked) whether or not the head trains
    acc_w = torch.zeros(V, H, device=weight.device, dtype=acc_dtype) if need_grad_weight \
        else None
    need_dz = need_grad_hidden or need_grad_weight
    cpu = hidden.device.type == "cpu"
    step = chunk_rows(T, V, H, cpu=cpu)
    # grad_W's GEMM runs over the dz of ``gw_rows`` rows (several chunks) at once
    gw_rows = grad_w_rows(T, step, cpu=cpu)
    group = need_grad_weight and gw_rows > step
    dz_buf = None
    gw_start, gw_scales = 0, []  # the rows of dz_buf not yet in grad_W, and their dz scales
    unit = None  # grad_W's unit with an fp16 dz (a device scalar: no host sync)
    if need_grad_weight and head.grad_dtype in HALF_RANGE_DTYPES:
        unit = torch.ones((), device=hidden.device)
        if row_scale is not None and row_scale.numel():
            r = row_scale.detach().float().abs().amax()
            unit = torch.where(torch.isfinite(r) & (r > 0), r, unit)
    # On the CPU each head's logits go to one buffer reused chunk after chunk: a fresh chunk
    # would be fresh pages, which the kernel faults in and zeroes (~15% of the chunk's GEMM).
    bufs: dict[str, torch.Tensor] = {}

    def logits(role: str, hd: Head, h: torch.Tensor) -> torch.Tensor:
        if not cpu or hd.mixed:
            return hd.logits(h)
        if role not in bufs:
            bufs[role] = torch.empty(min(step, T), V, dtype=hd.w.dtype)
        return hd.logits(h, out=bufs[role][: h.shape[0]])

    for start in range(0, T, step):
        end = min(T, start + step)
        h_c = hidden[start:end]
        z = logits("policy", head, h_c)
        if stats is not None:
            idx_c, st = stats(start, end, z)
        else:
            idx_c = idx(start, end, z) if callable(idx) else idx[start:end]
            st = rows.row_stats(z, idx_c, softcap=softcap, temperature=temperature,
                                want_sum=want_sum, want_entropy=want_entropy)
        co = coeffs(start, end, st, idx_c)
        dz = None
        if need_dz:
            if z.dtype == head.grad_dtype and not group:
                dz = z  # written in place
            else:
                if dz_buf is None:
                    dz_buf = torch.empty(gw_rows if group else step, V, device=z.device,
                                         dtype=head.grad_dtype)
                # grouped: this chunk's rows after the group's earlier chunks; else the start
                at = start - gw_start if group else 0
                dz = dz_buf[at: at + end - start]
        g, dz_scale = co, None  # the coefficients dz is written with
        if dz is not None and dz.dtype in HALF_RANGE_DTYPES:
            g, dz_scale = co.normalised()
        ref_c = None
        if ref is not None:
            z_ref = logits("ref", ref_head, ref_hidden[start:end])
            lse_ref = rows.row_stats(z_ref, idx_c, softcap=softcap,
                                     temperature=temperature, want_sum=False,
                                     want_entropy=False)[0]
            ref_c = (z_ref, lse_ref, g.lam)
        kl = None
        if dz is not None or ref is not None:
            kl = rows.row_grad(z, st[0], g.c, g.u, idx_c, g.w, dz, softcap=softcap,
                               temperature=temperature, ref=ref_c)
        row_loss[start:end] = co.loss if kl is None else co.loss + co.lam * kl
        if need_grad_hidden:
            head.grad_hidden(dz, grad_h[start:end], dz_scale)
        if need_grad_weight:
            if dz_scale is not None:
                gw_scales.append(dz_scale / unit)
            if end - gw_start == gw_rows or end == T:  # dz_buf full, or the last chunk
                head.accumulate_grad_weight(
                    acc_w, dz_buf[: end - gw_start] if group else dz, hidden[gw_start:end],
                    torch.cat(gw_scales) if gw_scales else None)
                gw_start, gw_scales = end, []
        del z, dz, ref_c
    # grad_W stays the accumulator (fp32 by default, whatever the head's dtype): the backward
    # scales it by the upstream gradient and casts it in one pass (fused_autograd.scaled)
    if need_grad_weight and unit is not None:
        acc_w.mul_(unit)
    return row_loss, grad_h, acc_w
