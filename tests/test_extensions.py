"""The csrc build path: C++ with ninja into the cache, CUDA sources checked with nvcc."""

import shutil
import textwrap
import time

import pytest
import torch

from fastft import aot, extensions

CPP = textwrap.dedent("""
    #include <torch/extension.h>
    #include <ATen/Parallel.h>
    // Row sums of a float matrix, rows spread over threads.
    torch::Tensor row_sums(torch::Tensor x) {
      TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x: 2-d float32");
      auto xc = x.contiguous();
      auto out = torch::empty({xc.size(0)}, xc.options());
      const float* p = xc.data_ptr<float>();
      float* o = out.data_ptr<float>();
      const int64_t n = xc.size(1);
      at::parallel_for(0, xc.size(0), 1, [&](int64_t a, int64_t b) {
        for (int64_t r = a; r < b; ++r) {
          double s = 0;
          for (int64_t j = 0; j < n; ++j) s += p[r * n + j];
          o[r] = (float)s;
        }
      });
      return out;
    }
    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("row_sums", &row_sums); }
""")

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


@pytest.mark.slow
def test_cpp_builds_with_ninja_into_the_cache_and_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "row_sums.cpp"
    src.write_text(CPP)
    mod = extensions.build("test_row_sums", [src])
    x = torch.randn(37, 101)
    torch.testing.assert_close(mod.row_sums(x), x.double().sum(1).float())
    built = list((tmp_path / "cache").rglob("build.ninja"))
    assert len(built) == 1
    t0 = time.perf_counter()
    again = extensions.build("test_row_sums", [src])  # from the cache: no compile
    assert time.perf_counter() - t0 < 10
    torch.testing.assert_close(again.row_sums(x), mod.row_sums(x))


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
