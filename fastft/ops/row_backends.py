"""The loss head's row kernels, by backend name (see fastft.backends)."""

from __future__ import annotations

from types import ModuleType


def get(backend: str) -> ModuleType:
    """The module holding ``row_stats`` and ``row_grad`` for ``backend``.

    "reference" reaches an op only when it is called directly (the public
    functions run fastft.reference themselves); it gets the torch rows.
    """
    if backend == "triton":
        from ..kernels import loss_rows

        return loss_rows
    from . import loss_rows_torch

    return loss_rows_torch
