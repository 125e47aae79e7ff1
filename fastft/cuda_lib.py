"""csrc/*.cu on a CUDA machine: built by nvcc into a shared library, called through ctypes.

A ``.cu`` file of csrc/ holds device code and ``extern "C"`` launchers only (no torch
headers), so it needs no torch CUDA extension build: ``nvcc --shared`` compiles it for the
current device's arch into the cache folder of fastft.extensions (keyed by the sources,
the headers beside them, the flags and the arch), and ctypes calls its launchers with data
pointers and the current stream. Only where ``torch.cuda.is_available()``; elsewhere (and
where nvcc is missing or the build fails) :func:`load` returns None, records why in
fastft.backends (``cuda:<name>``), and the op falls back.

The wrappers below serve csrc/hadamard.cu (the "cuda" backend of fastft::hadamard,
fastft::fake_quant_act and fastft::fake_quant_weight).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from . import backends, extensions

_lock = threading.Lock()
_libs: dict[tuple[str, str], object] = {}
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NATIVE_P = 8192  # csrc/hadamard.cu transforms P <= 8192 in one block; larger P fold H_2s into H_K


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def build(name: str, arch: str) -> Path:
    """csrc/<name>.cu as a shared library for sm_<arch> (cached)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or \
            "/usr/local/cuda"
        cand = Path(cuda_home) / "bin" / "nvcc"
        if not cand.exists():
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        nvcc = str(cand)
    src = extensions.source_dir() / f"{name}.cu"
    flags = ["-O3", "-std=c++17", "--shared", "-Xcompiler", "-fPIC",
             f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    h = hashlib.sha256(" ".join(flags).encode())
    for f in [src, *sorted(src.parent.glob("*.h"))]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    folder = extensions.cache_dir() / "cuda" / f"{name}-sm{arch}-{h.hexdigest()[:16]}"
    out = folder / f"lib{name}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run([nvcc, *flags, "-o", str(tmp), str(src)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src}: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    os.replace(tmp, out)
    return out


def _declare(lib) -> None:
    c = ctypes
    lib.fastft_hadamard_rows.restype = c.c_int
    lib.fastft_hadamard_rows.argtypes = [
        c.c_void_p, c.c_longlong, c.c_void_p, c.c_longlong, c.c_longlong, c.c_longlong, c.c_int,
        c.c_void_p, c.c_int, c.c_float, c.c_int, c.c_int, c.c_int, c.c_float, c.c_int,
        c.c_void_p]
    lib.fastft_quant_rows.restype = c.c_int
    lib.fastft_quant_rows.argtypes = [
        c.c_void_p, c.c_longlong, c.c_void_p, c.c_longlong, c.c_longlong, c.c_longlong, c.c_int,
        c.c_int, c.c_float, c.c_int, c.c_void_p]


def load(name: str, device: torch.device):
    """The ctypes library of csrc/<name>.cu for ``device``; None where it cannot run."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    arch = _arch(device)
    with _lock:
        key = (name, arch)
        if key in _libs:
            return _libs[key]
        try:
            lib = ctypes.CDLL(str(build(name, arch)))
            _declare(lib)
        except Exception as e:  # no nvcc, a compile error, a library that does not load
            why = f"CUDA build of csrc/{name}.cu failed: {str(e).strip().splitlines()[-1:]}"
            backends.mark_broken(f"cuda:{name}", why)
            warnings.warn(f"fastft: {why}; falling back", stacklevel=2)
            lib = None
        _libs[key] = lib
        return lib


def _check(err: int, what: str) -> None:
    if err:
        raise RuntimeError(f"fastft: {what} failed to launch: cudaError_t {err}")


_sylvester: dict[tuple[int, str], torch.Tensor] = {}


def fold(kfactor: torch.Tensor | None, K: int, P: int,
         device) -> tuple[torch.Tensor | None, int, int]:
    """(H_K', K', P') with P' <= NATIVE_P: H_K kron H_P = (H_K kron H_f) kron H_P' for
    f = P / P' (Sylvester's matrices nest)."""
    if P <= NATIVE_P:
        return kfactor, K, P
    f = P // NATIVE_P
    key = (f, str(device))
    if key not in _sylvester:
        s = torch.ones(1, 1, dtype=torch.float32)
        two = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
        while s.shape[0] < f:
            s = torch.kron(s, two)
        _sylvester[key] = s.to(device)
    hf = _sylvester[key]
    h = hf if kfactor is None else torch.kron(kfactor.to(device, torch.float32), hf)
    return h.contiguous(), K * f, NATIVE_P


def hadamard_rows(lib, x2d: torch.Tensor, kfactor: torch.Tensor | None, scale: float,
                  transpose: bool, quant: tuple[int, bool, float] | None = None) -> torch.Tensor:
    """y = scale (H_K kron H_P) x2d per row, then q(y) per row when ``quant`` = (bits,
    symmetric, clip_ratio); x2d [R, n] on a CUDA device, unit column stride."""
    R, n = x2d.shape
    K = 1 if kfactor is None else kfactor.shape[0]
    h, K, _ = fold(None if kfactor is None else kfactor.to(x2d.device, torch.float32)
                   .contiguous(), K, n // K, x2d.device)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    y = torch.empty((R, n), device=x2d.device, dtype=x2d.dtype)
    bits, sym, clip = quant if quant is not None else (0, False, 1.0)
    stream = torch.cuda.current_stream(x2d.device).cuda_stream
    err = lib.fastft_hadamard_rows(
        x2d.data_ptr(), x2d.stride(0), y.data_ptr(), y.stride(0), R, n, K,
        None if h is None else h.data_ptr(), int(transpose), float(scale), int(quant is not None),
        int(bits), int(sym), float(clip), DTYPE_CODE[x2d.dtype], stream)
    _check(err, "csrc/hadamard.cu fastft_hadamard_rows")
    return y


def quant_rows(lib, x2d: torch.Tensor, bits: int, symmetric: bool,
               clip_ratio: float) -> torch.Tensor:
    """q(x) per row of x2d [R, n] on a CUDA device, unit column stride."""
    R, n = x2d.shape
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    y = torch.empty((R, n), device=x2d.device, dtype=x2d.dtype)
    stream = torch.cuda.current_stream(x2d.device).cuda_stream
    err = lib.fastft_quant_rows(x2d.data_ptr(), x2d.stride(0), y.data_ptr(), y.stride(0), R, n,
                                int(bits), int(symmetric), float(clip_ratio),
                                DTYPE_CODE[x2d.dtype], stream)
    _check(err, "csrc/hadamard.cu fastft_quant_rows")
    return y
