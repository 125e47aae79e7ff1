"""tests/conftest.py: with FASTFT_REQUIRE_PEERS=1 (make test) a missing peer package fails."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

IN_TEST = textwrap.dedent("""
    import sys
    import pytest

    def test_peer_missing():
        sys.modules["peft"] = None  # as if peft were not installed
        pytest.importorskip("peft")

    def test_other_missing():
        pytest.importorskip("surely_not_a_module_fastft")

    def test_peer_present():
        assert pytest.importorskip("pytest") is not None
""")
AT_COLLECTION = textwrap.dedent("""
    import sys
    import pytest

    sys.modules["liger_kernel"] = None
    liger = pytest.importorskip("liger_kernel.chunked_loss")

    def test_never_runs():
        pass
""")


def run(tmp_path):
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_in_test.py").write_text(IN_TEST)
    (tmp_path / "test_at_collection.py").write_text(AT_COLLECTION)
    env = {**os.environ, "FASTFT_REQUIRE_PEERS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    return proc.stdout + proc.stderr


def test_missing_peers_fail_when_required(tmp_path):
    out = run(tmp_path)
    assert "FAILED test_in_test.py::test_peer_missing" in out, out
    assert "ERROR test_at_collection.py" in out, out
    assert "FASTFT_REQUIRE_PEERS=1 and a peer package is missing" in out
    assert "SKIPPED [1] test_in_test.py" in out and "surely_not_a_module_fastft" in out
    assert "PASSED test_in_test.py::test_peer_present" in out
    assert "1 failed, 1 passed, 1 skipped, 1 error" in out, out


def test_peer_skips_stay_skips_without_the_variable(monkeypatch):
    from types import SimpleNamespace

    from . import conftest

    def report():
        return SimpleNamespace(skipped=True, outcome="skipped", longrepr=(
            "t.py", 3, "Skipped: could not import 'trl': No module named 'trl'"))

    monkeypatch.delenv("FASTFT_REQUIRE_PEERS", raising=False)
    r = report()
    conftest._fail_missing_peer(r)
    assert r.outcome == "skipped"
    monkeypatch.setenv("FASTFT_REQUIRE_PEERS", "1")
    conftest._fail_missing_peer(r)
    assert r.outcome == "failed" and "could not import 'trl'" in r.longrepr
