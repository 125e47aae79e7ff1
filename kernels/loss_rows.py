"""Row kernels of the fused loss head.

The loss head works on a chunk of logits rows z [C, V] (written by a GEMM of
the hidden states with the output head). Two kernels, one program per row,
each sweeping the vocabulary in tiles of BLOCK_V:

- ``row_stats_kernel``: transforms the logits (softcap, then temperature),
  keeps an online logsumexp, and optionally the row sum of the transformed
  logits (label smoothing) and the entropy of the softmax; gathers the
  transformed logits at J given indices per row.
- ``row_grad_kernel``: writes the gradient of the loss with respect to the raw
  logits, dz = (c p + u - sum_j w_j e_{idx_j} - lam p_ref) * ds/dz, where
  p = softmax(s), c, u, w are per-row coefficients that the loss computed
  from the stats, and p_ref (optional) is the softmax of a reference row
  (ASFT), whose KL(p_ref || p) it returns.

Both read the logits in any float dtype and do all math in fp32. Row offsets
are int64 (C x V can pass 2**31 elements). Indices outside [0, V) are never
dereferenced: the gather masks them and reads 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)  # finite stand-in for -inf: exp(NEG - NEG) stays defined

# (BLOCK_V, num_warps): the configurations this file ships.
CONFIGS = ((1024, 4), (4096, 8))


def pick_config(V: int) -> tuple[int, int]:
    return CONFIGS[0] if V <= 8192 else CONFIGS[1]


@triton.jit
def _transform(z, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
    return z * inv_temp


@triton.jit
def row_stats_kernel(
    z_ptr, stride_z, V,
    idx_ptr, lse_ptr, gath_ptr, sum_ptr, ent_ptr,
    softcap, inv_temp,
    J: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WANT_SUM: tl.constexpr, WANT_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], NEG, tl.float32)
    acc = tl.zeros([BLOCK_V], tl.float32)  # sum of exp(s - m), per lane
    a = tl.zeros([BLOCK_V], tl.float32)
    ssum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        inb = offs < V
        z = tl.load(base + offs, mask=inb, other=0.0).to(tl.float32)
        s = _transform(z, softcap, inv_temp, HAS_SOFTCAP)
        s = tl.where(inb, s, NEG)
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        e = tl.exp(s - m_new)
        acc = acc * alpha + e
        if WANT_ENT:
            a = a * alpha + e * s
        if WANT_SUM:
            ssum += tl.where(inb, s, 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    scale = tl.exp(m - m_row)
    l_row = tl.sum(acc * scale, axis=0)
    lse = m_row + tl.log(l_row)
    tl.store(lse_ptr + row, lse)
    if WANT_ENT:
        tl.store(ent_ptr + row, lse - tl.sum(a * scale, axis=0) / l_row)
    if WANT_SUM:
        tl.store(sum_ptr + row, tl.sum(ssum, axis=0))
    for j in tl.static_range(J):
        idx = tl.load(idx_ptr + row * J + j)
        ok = (idx >= 0) & (idx < V)
        zj = tl.load(base + tl.where(ok, idx, 0), mask=ok, other=0.0).to(tl.float32)
        sj = _transform(zj, softcap, inv_temp, HAS_SOFTCAP)
        tl.store(gath_ptr + row * J + j, tl.where(ok, sj, 0.0))


@triton.jit
def row_grad_kernel(
    z_ptr, stride_z, out_ptr, stride_o, V,
    lse_ptr, c_ptr, u_ptr, idx_ptr, w_ptr,
    zr_ptr, stride_zr, lse_r_ptr, lam_ptr, kl_ptr,
    softcap, inv_temp,
    J: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_REF: tl.constexpr, STORE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dz = (c p + u - sum_j w_j e_idx_j - lam p_ref) ds/dz; with a reference row, also
    KL(p_ref || p) per row. STORE=False computes the KL alone (no gradient wanted)."""
    row = tl.program_id(0).to(tl.int64)
    zbase = z_ptr + row * stride_z
    obase = out_ptr + row * stride_o
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    c = tl.load(c_ptr + row)
    u = tl.load(u_ptr + row)
    if HAS_REF:
        rbase = zr_ptr + row * stride_zr
        lse_r = tl.load(lse_r_ptr + row)
        lam = tl.load(lam_ptr + row)
        kl = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        inb = offs < V
        z = tl.load(zbase + offs, mask=inb, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = 2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0
            s = softcap * t * inv_temp
            chain = (1.0 - t * t) * inv_temp
        else:
            s = z * inv_temp
            chain = inv_temp
        ds = c * tl.exp(s - lse) + u
        if HAS_REF:
            zr = tl.load(rbase + offs, mask=inb, other=0.0).to(tl.float32)
            sr = _transform(zr, softcap, inv_temp, HAS_SOFTCAP)
            log_pr = sr - lse_r
            p_r = tl.exp(log_pr)
            kl += tl.where(inb, p_r * (log_pr - (s - lse)), 0.0)
            ds -= lam * p_r
        if STORE:
            for j in tl.static_range(J):
                idx = tl.load(idx_ptr + row * J + j)
                wj = tl.load(w_ptr + row * J + j)
                ds = tl.where(offs == idx, ds - wj, ds)
            tl.store(obase + offs, (ds * chain).to(out_ptr.dtype.element_ty), mask=inb)
    if HAS_REF:
        tl.store(kl_ptr + row, tl.sum(kl, axis=0))


def row_stats(z: torch.Tensor, idx: torch.Tensor, *, softcap: float, temperature: float,
              want_sum: bool, want_entropy: bool):
    """Launch row_stats_kernel. z [C, V] (unit column stride), idx [C, J] int64.

    Returns (lse [C], gathered [C, J], row_sum [C] or None, entropy [C] or None), fp32.
    """
    C, V = z.shape
    J = idx.shape[1]
    f32 = dict(device=z.device, dtype=torch.float32)
    lse = torch.empty(C, **f32)
    gathered = torch.empty(C, J, **f32)
    row_sum = torch.empty(C, **f32) if want_sum else lse
    entropy = torch.empty(C, **f32) if want_entropy else lse
    if C == 0:
        return lse, gathered, (row_sum if want_sum else None), (entropy if want_entropy else None)
    block, warps = pick_config(V)
    row_stats_kernel[(C,)](
        z, z.stride(0), V, idx.contiguous(), lse, gathered, row_sum, entropy,
        float(softcap or 1.0), 1.0 / temperature,
        J=J, HAS_SOFTCAP=bool(softcap), WANT_SUM=want_sum, WANT_ENT=want_entropy,
        BLOCK_V=block, num_warps=warps,
    )
    return lse, gathered, (row_sum if want_sum else None), (entropy if want_entropy else None)


def row_grad(z: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, u: torch.Tensor,
             idx: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None, *, softcap: float,
             temperature: float, ref=None) -> torch.Tensor | None:
    """Launch row_grad_kernel, writing dz into ``out`` [C, V] (may alias ``z``).

    ``ref``: None, or (z_ref [C, V], lse_ref [C], lam [C]) for the term -lam p_ref;
    then returns KL(p_ref || p) per row [C]. ``out=None`` writes no gradient.
    """
    C, V = z.shape
    kl = torch.empty(C, device=z.device, dtype=torch.float32) if ref is not None else None
    if C == 0:
        return kl
    block, warps = pick_config(V)
    zr, lse_r, lam = ref if ref is not None else (z, lse, c)
    row_grad_kernel[(C,)](
        z, z.stride(0), z if out is None else out, 0 if out is None else out.stride(0), V,
        lse.contiguous(), c.contiguous(), u.contiguous(), idx.contiguous(), w.contiguous(),
        zr, zr.stride(0), lse_r.contiguous(), lam.contiguous(), lse if kl is None else kl,
        float(softcap or 1.0), 1.0 / temperature,
        J=idx.shape[1], HAS_SOFTCAP=bool(softcap), HAS_REF=ref is not None,
        STORE=out is not None, BLOCK_V=block, num_warps=warps,
    )
    return kl


def aot_specs():
    """Every (kernel, signature, constexprs, options) this file ships, for check-kernels."""
    specs = []
    for block, warps in CONFIGS:
        for zt in ("fp32", "bf16"):
            specs.append(dict(
                name="row_stats", kernel=row_stats_kernel, matrix=False,
                signature={"z_ptr": f"*{zt}", "stride_z": "i64", "V": "i32", "idx_ptr": "*i64",
                           "lse_ptr": "*fp32", "gath_ptr": "*fp32", "sum_ptr": "*fp32",
                           "ent_ptr": "*fp32", "softcap": "fp32", "inv_temp": "fp32"},
                constexprs={"J": 1, "HAS_SOFTCAP": True, "WANT_SUM": True, "WANT_ENT": True,
                            "BLOCK_V": block},
                options={"num_warps": warps}, config=f"BLOCK_V={block} z={zt}"))
            for has_ref in (False, True):
                specs.append(dict(
                    name="row_grad", kernel=row_grad_kernel, matrix=False,
                    signature={"z_ptr": "*fp32", "stride_z": "i64", "out_ptr": f"*{zt}",
                               "stride_o": "i64", "V": "i32", "lse_ptr": "*fp32",
                               "c_ptr": "*fp32", "u_ptr": "*fp32", "idx_ptr": "*i64",
                               "w_ptr": "*fp32", "zr_ptr": "*fp32", "stride_zr": "i64",
                               "lse_r_ptr": "*fp32", "lam_ptr": "*fp32", "kl_ptr": "*fp32",
                               "softcap": "fp32", "inv_temp": "fp32"},
                    constexprs={"J": 9 if has_ref else 1, "HAS_SOFTCAP": True,
                                "HAS_REF": has_ref, "STORE": True, "BLOCK_V": block},
                    options={"num_warps": warps},
                    config=f"BLOCK_V={block} out={zt}{' ref' if has_ref else ''}"))
    return specs
