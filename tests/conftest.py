"""Test set-up.

On a machine without a GPU (the default), Triton runs under its CPU
interpreter: TRITON_INTERPRET must be set before triton is imported, so it is
set here, at conftest import, before any test module imports fastft.kernels.
With FASTFT_TEST_DEVICE=cuda (benches/gpu_check.sh) the same tests run their
tensors on the GPU and the kernels for real.
"""

import os

DEVICE = os.environ.get("FASTFT_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.pop("FASTFT_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def device():
    """Where the tests put their tensors: cpu, or cuda under FASTFT_TEST_DEVICE=cuda."""
    return DEVICE


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run the test once per backend of the fused ops that this machine can run."""
    monkeypatch.setenv("FASTFT_BACKEND", request.param)
    return request.param


def pytest_collection_modifyitems(config, items):
    if DEVICE != "cuda":
        skip = pytest.mark.skip(reason="needs FASTFT_TEST_DEVICE=cuda and a GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
