"""Test set-up: Triton runs under its CPU interpreter in every test process.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at
conftest import, before any test module imports fastft.kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.pop("FASTFT_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run the test once per CPU-runnable backend of the fused ops."""
    monkeypatch.setenv("FASTFT_BACKEND", request.param)
    return request.param
