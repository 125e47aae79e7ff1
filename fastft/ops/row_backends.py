"""The loss head's row kernels, by backend name (see fastft.backends)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def get(backend: str) -> SimpleNamespace:
    """``row_stats``, ``row_grad``, ``sample`` (K tokens per row of softmax) and
    ``sample_stats`` (the samples and the row stats of the loss at them) for ``backend``.

    "cpp": the C++ rows of csrc/loss_rows.cpp and the sampler of csrc/gumbel_sample.cpp
    (each replaced by its torch version if it fails to build). "reference" reaches an op
    only when it is called directly (the public functions run fastft.reference
    themselves); it gets the torch rows.
    """
    if backend == "triton":
        from ..kernels import gumbel_sample, loss_rows

        return SimpleNamespace(row_stats=loss_rows.row_stats, row_grad=loss_rows.row_grad,
                               sample=gumbel_sample.sample,
                               sample_stats=gumbel_sample.sample_stats)
    from . import gumbel_torch, loss_rows_torch

    rows = SimpleNamespace(row_stats=loss_rows_torch.row_stats,
                           row_grad=loss_rows_torch.row_grad, sample=gumbel_torch.sample)
    if backend == "cpp":
        from .. import extensions

        ext = extensions.load("loss_rows")
        if ext is not None:
            rows.row_stats, rows.row_grad = _cpp_rows(ext)
        sampler = extensions.load("gumbel_sample")
        if sampler is not None:
            def sample(z, k, *, seed, row_offset, softcap, temperature):
                return sampler.gumbel_sample(_f32(z), k, seed, row_offset, softcap or 0.0,
                                             temperature)

            rows.sample = sample
    rows.sample_stats = _sample_then_stats(rows)
    return rows


def _sample_then_stats(rows: SimpleNamespace):
    """``sample_stats`` as two passes: draw the samples, then the row stats at them (the
    Triton backend does both in one read of the logits)."""

    def sample_stats(z, k, target, *, seed, row_offset, softcap, temperature,
                     sample_temperature):
        samples = rows.sample(z, k, seed=seed, row_offset=row_offset, softcap=softcap,
                              temperature=sample_temperature)
        idx = samples if target is None else torch.cat([samples, target[:, None]], dim=1)
        return samples, idx, rows.row_stats(z, idx, softcap=softcap, temperature=temperature,
                                            want_sum=False, want_entropy=False)

    return sample_stats


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the C++ kernels read it: float32 with unit column stride (a view if it is)."""
    if t.dtype != torch.float32:
        t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def _cpp_rows(ext):
    def row_stats(z, idx, *, softcap, temperature, want_sum, want_entropy):
        lse, gathered, row_sum, entropy = ext.row_stats(
            _f32(z), idx.long().contiguous(), float(softcap or 0.0), float(temperature),
            bool(want_sum), bool(want_entropy))
        return lse, gathered, row_sum if want_sum else None, entropy if want_entropy else None

    def row_grad(z, lse, c, u, idx, w, out, *, softcap, temperature, ref=None):
        zf = _f32(z)
        direct = out is None or (out.dtype == torch.float32 and out.stride(-1) == 1)
        dz = out if direct else torch.empty(zf.shape, dtype=torch.float32, device=zf.device)
        zr = lse_r = lam = None
        if ref is not None:
            zr, lse_r, lam = _f32(ref[0]), ref[1].float().contiguous(), ref[2].float().contiguous()
        kl = ext.row_grad(zf, lse.float().contiguous(), c.float().contiguous(),
                          u.float().contiguous(), idx.long().contiguous(),
                          w.float().contiguous(), dz, float(softcap or 0.0), float(temperature),
                          zr, lse_r, lam)
        if not direct:
            out.copy_(dz)
        return kl if ref is not None else None

    return row_stats, row_grad
