"""The loss head's row kernels, by backend name (see fastft.backends)."""

from __future__ import annotations

from types import SimpleNamespace


def get(backend: str) -> SimpleNamespace:
    """``row_stats``, ``row_grad`` and ``sample`` (Gumbel-max) for ``backend``.

    "cpp": the torch rows with the C++ sampler of csrc/gumbel_sample.cpp (the
    torch sampler if that fails to build). "reference" reaches an op only when
    it is called directly (the public functions run fastft.reference
    themselves); it gets the torch rows.
    """
    if backend == "triton":
        from ..kernels import gumbel_sample, loss_rows

        return SimpleNamespace(row_stats=loss_rows.row_stats, row_grad=loss_rows.row_grad,
                               sample=gumbel_sample.sample)
    from . import gumbel_torch, loss_rows_torch

    sample = gumbel_torch.sample
    if backend == "cpp":
        from .. import extensions

        ext = extensions.load("gumbel_sample")
        if ext is not None:
            def sample(z, k, *, seed, row_offset, softcap, temperature):
                return ext.gumbel_sample(z.float(), k, seed, row_offset, softcap or 0.0,
                                         temperature)

    return SimpleNamespace(row_stats=loss_rows_torch.row_stats, row_grad=loss_rows_torch.row_grad,
                           sample=sample)
