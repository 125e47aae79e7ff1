"""Test set-up.

On a machine without a GPU (the default), Triton runs under its CPU
interpreter: TRITON_INTERPRET must be set before triton is imported, so it is
set here, at conftest import, before any test module imports fastft.kernels.
With FASTFT_TEST_DEVICE=cuda (benches/gpu_check.sh) the same tests run their
tensors on the GPU and the kernels for real.
"""

import os
import re

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


@pytest.fixture(params=["torch", "triton", "cpp"] if DEVICE == "cpu" else ["torch", "triton"])
def backend(request, monkeypatch):
    """Run the test once per backend of the fused ops that this machine can run (cpp: the
    C++ CPU kernels of csrc/; an op without one runs its torch path)."""
    monkeypatch.setenv("FASTFT_BACKEND", request.param)
    return request.param


# The peers extra (peer libraries the parity tests compare with). `make test` installs it and
# sets FASTFT_REQUIRE_PEERS=1: there, a test that would skip because one of them is missing
# fails instead, so a broken install cannot silently drop the parity tests.
PEERS = ("peft", "trl", "liger_kernel")


def _missing_peer(report) -> str | None:
    """The skip reason when ``report`` is a skip by importorskip of a peer package."""
    if os.environ.get("FASTFT_REQUIRE_PEERS") != "1" or not report.skipped:
        return None
    if not isinstance(report.longrepr, tuple) or len(report.longrepr) != 3:
        return None
    reason = str(report.longrepr[2])
    m = re.search(r"could not import '([\w.]+)'", reason)
    return reason if m and m.group(1).split(".")[0] in PEERS else None


def _fail_missing_peer(report) -> None:
    reason = _missing_peer(report)
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = (f"FASTFT_REQUIRE_PEERS=1 and a peer package is missing ({reason}): "
                           "install the peers extra, pip install -e '.[dev,peers]'")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_missing_peer(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_missing_peer(report)
    return report


def pytest_collection_modifyitems(config, items):
    if DEVICE != "cuda":
        skip = pytest.mark.skip(reason="needs FASTFT_TEST_DEVICE=cuda and a GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
