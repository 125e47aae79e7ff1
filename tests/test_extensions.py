"""The csrc build path: C++ with ninja into the cache, CUDA sources checked with nvcc."""

import shutil
import textwrap
import time

import pytest
import torch

from fastft import FastftError, aot, extensions

CU = textwrap.dedent("""
    #include <cstdint>
    #include <cuda_runtime.h>
    __global__ void axpy_kernel(float* y, const float* x, float a, int64_t n) {
      int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
      if (i < n) y[i] += a * x[i];
    }
    extern "C" void axpy(float* y, const float* x, float a, int64_t n, cudaStream_t s) {
      axpy_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(y, x, a, n);
    }
""")


def test_cpp_kernel_builds_with_ninja_into_the_cache_and_loads_from_it():
    """csrc/gumbel_sample.cpp: built once into the cache; a second build is a cache hit."""
    src = extensions.source_dir() / "gumbel_sample.cpp"
    mod = extensions.build("gumbel_sample", [src])
    t0 = time.perf_counter()
    again = extensions.build("gumbel_sample", [src])
    assert time.perf_counter() - t0 < 10  # no compile: ninja finds everything up to date
    folders = [p.parent for p in extensions.cache_dir().rglob("build.ninja")
               if p.parent.name.startswith("gumbel_sample-")]
    assert folders and any(list(f.glob("*.so")) for f in folders)
    z = torch.randn(6, 50)
    torch.testing.assert_close(mod.gumbel_sample(z, 3, 7, 0, 0.0, 1.0),
                               again.gumbel_sample(z, 3, 7, 0, 0.0, 1.0))


def test_failed_build_falls_back_and_is_reported(monkeypatch):
    from fastft import backends
    from fastft.ops import linear_otr

    monkeypatch.setattr(extensions, "_loaded", {})
    monkeypatch.setattr(backends, "_broken", {})
    monkeypatch.delenv("FASTFT_REQUIRE_CPP", raising=False)

    def broken(name, sources, **kw):
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr(extensions, "build", broken)
    with pytest.warns(UserWarning, match="falling back to the torch path"):
        assert extensions.load("gumbel_sample") is None
    b, note = backends.explain(linear_otr.INFO, torch.device("cpu"))
    assert b == "torch" and "g++ not found" in note


def test_failed_build_raises_when_cpp_is_required(tmp_path, monkeypatch):
    """A real compile of a broken csrc/<name>.cpp: a FastftError naming the file, no fallback."""
    from fastft import backends

    (tmp_path / "broken_kernel.cpp").write_text("this is not C++;\n")
    monkeypatch.setattr(extensions, "source_dir", lambda: tmp_path)
    monkeypatch.setattr(extensions, "_loaded", {})
    monkeypatch.setattr(backends, "_broken", {})
    monkeypatch.setenv("FASTFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTFT_REQUIRE_CPP", "1")
    with pytest.raises(FastftError) as info:
        extensions.load("broken_kernel")
    msg = str(info.value)
    assert str(tmp_path / "broken_kernel.cpp") in msg and "no fallback" in msg
    assert "error" in msg  # the compiler's own output comes with it
    assert "broken_kernel" not in extensions._loaded and not backends._broken
    monkeypatch.setenv("FASTFT_REQUIRE_CPP", "0")
    with pytest.warns(UserWarning, match="broken_kernel.cpp failed"):
        assert extensions.load("broken_kernel") is None
    assert "cpp:broken_kernel" in backends._broken


def test_cpp_required_reads_fastft_require_cpp(monkeypatch):
    cases = [(None, False), ("1", True), ("true", True), ("0", False), ("", False)]
    for value, want in cases:
        with monkeypatch.context() as m:
            if value is None:
                m.delenv("FASTFT_REQUIRE_CPP", raising=False)
            else:
                m.setenv("FASTFT_REQUIRE_CPP", value)
            assert extensions.cpp_required() is want, value


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_nvcc_checks_cuda_sources_for_both_archs(tmp_path):
    src = tmp_path / "axpy.cu"
    src.write_text(CU)
    for arch in aot.ARCHS:
        rows = extensions.nvcc_check(src, arch)
        assert [r["kernel"] for r in rows] == ["_Z11axpy_kernelPfPKffl"]
        assert rows[0]["ok"] and rows[0]["registers"] > 0 and rows[0]["spill_bytes"] == 0
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k(float* x) { x[0] = undefined_name; }\n")
    (row,) = extensions.nvcc_check(bad, "sm_90")
    assert row["ok"] is False and "undefined_name" in row["error"]


def test_ptxas_report_flags_spills_and_shared_memory():
    text = "\n".join([
        "ptxas info    : Compiling entry function 'a' for 'sm_80'",
        "    8 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads",
        "ptxas info    : Used 255 registers, 0 bytes smem, 376 bytes cmem[0]",
        "ptxas info    : Compiling entry function 'b' for 'sm_80'",
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
        "ptxas info    : Used 32 registers, 200000 bytes smem, 376 bytes cmem[0]",
    ])
    a, b = extensions.parse_ptxas(text, "sm_80", "x.cu")
    assert (a["registers"], a["spill_bytes"], a["ok"]) == (255, 32, False)
    assert (b["shared_bytes"], b["ok"]) == (200000, False)


def test_a_lock_left_by_a_killed_build_is_removed_instead_of_waited_on_forever(tmp_path):
    """torch's build lock outlives a build cut short (Ctrl-C, a time limit), and torch then
    waits on it without end: fastft removes it once it is older than a build takes."""
    import os
    import time

    from fastft import extensions

    lock = tmp_path / "lock"
    lock.write_text("")
    old = time.time() - 2 * extensions.STALE_LOCK_S
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="did not finish"):
        extensions.clear_stale_lock(tmp_path)
    assert not lock.exists()

    lock.write_text("")  # fresh: another build may hold it; waited on, then removed
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="did not finish"):
        extensions.clear_stale_lock(tmp_path, patience=0.3)
    assert not lock.exists() and 0.25 <= time.monotonic() - t0 < 5.0
    extensions.clear_stale_lock(tmp_path)  # no lock: returns at once


def test_a_lock_that_goes_away_is_not_touched(tmp_path):
    import threading

    from fastft import extensions

    lock = tmp_path / "lock"
    lock.write_text("")
    threading.Timer(0.3, lock.unlink).start()  # the other build finishes
    extensions.clear_stale_lock(tmp_path, patience=30.0)
    assert not lock.exists()
