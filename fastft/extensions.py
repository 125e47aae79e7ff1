"""Building csrc/: C++ CPU kernels with ninja on first use, CUDA sources checked with nvcc.

- C++ sources (``csrc/<name>.cpp``, pybind11 through torch's extension API) are
  built by ``torch.utils.cpp_extension.load`` with ninja into a cache folder
  keyed by the torch version and a hash of the sources and flags, so a build
  happens once per machine and source change (``FASTFT_CACHE_DIR`` moves it;
  default ``~/.cache/fastft``).
- CUDA sources (``csrc/*.cu``) hold device code and plain C launchers only, no
  torch headers: a CPU-only torch ships no CUDA headers, and this way nvcc can
  compile-check them for sm_80 and sm_90 on any machine that has nvcc.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from .errors import FastftError

CPP_FLAGS = ("-O3", "-fopenmp", "-march=native")
# Flags one source needs beyond CPP_FLAGS. sparse_adam: sqrt without the errno branch, so
# that its update loop vectorises (no kernel of fastft reads errno).
EXTRA_FLAGS = {"sparse_adam": ("-fno-math-errno",)}
_lock = threading.Lock()
_loaded: dict[str, object] = {}


def source_dir() -> Path:
    """csrc/, installed as the package fastft.csrc (editable installs map it to the checkout)."""
    from . import csrc

    return Path(csrc.__file__).resolve().parent


def cache_dir() -> Path:
    import torch

    root = Path(os.environ.get("FASTFT_CACHE_DIR", Path.home() / ".cache" / "fastft"))
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return root / "extensions" / tag.replace("+", "_")


def _key(sources: list[Path], flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for s in sorted(sources):
        h.update(s.name.encode())
        h.update(s.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(_cpu_model().encode())
    return h.hexdigest()[:16]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line
    except OSError:
        pass
    return ""


# A build takes about 30 s; a lock file older than this was left by a build that was killed.
STALE_LOCK_S = 300.0


def clear_stale_lock(folder: Path, patience: float = STALE_LOCK_S) -> None:
    """Wait for the build lock in ``folder`` to go, and remove it once it is older than
    ``patience`` seconds. torch takes that lock for a build and waits on it without end: a
    build cut short (Ctrl-C, a job's time limit) left one behind, and every later run hung."""
    lock = folder / "lock"
    told = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > patience:
            lock.unlink(missing_ok=True)
            warnings.warn(f"fastft: removed the lock {lock} left by a build that did not "
                          "finish; building again", stacklevel=3)
            return
        if not told:
            print(f"fastft: waiting for another build in {folder} (its lock is removed once "
                  f"{patience:.0f} s old)", file=sys.stderr, flush=True)
            told = True
        time.sleep(min(1.0, patience / 4))


def build(name: str, sources: list[Path], *, flags: tuple[str, ...] = CPP_FLAGS,
          verbose: bool = False):
    """Build (or load from the cache) the C++ extension ``name`` from ``sources``."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        venv_bin = Path(sys.executable).parent
        if not (venv_bin / "ninja").exists():
            raise FastftError("building fastft's C++ kernels needs ninja: pip install ninja")
        # the ninja of this environment, when the environment is not activated
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    sources = [Path(s).resolve() for s in sources]
    # the headers beside the sources (csrc/quant_math.h) are part of the key: editing one rebuilds
    headers = sorted({h for s in sources for h in s.parent.glob("*.h")})
    out = cache_dir() / f"{name}-{_key(sources + headers, flags)}"
    out.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(out)
    if not any(out.glob("*.so")):  # the wait is visible: one line, once per build
        shown = ", ".join(s.name for s in sources)
        print(f"fastft: building {shown} (first use, ~30 s; cached in {out})", file=sys.stderr,
              flush=True)
    return cpp_extension.load(
        name=f"fastft_{name}", sources=[str(s) for s in sources], build_directory=str(out),
        extra_cflags=list(flags), extra_ldflags=["-fopenmp"], verbose=verbose)


def cpp_required() -> bool:
    """Whether a failed C++ build must raise instead of falling back to the torch path:
    ``FASTFT_REQUIRE_CPP=1`` (``make test`` sets it, so a broken C++ kernel fails the tests
    instead of hiding behind its torch fallback)."""
    return os.environ.get("FASTFT_REQUIRE_CPP", "").strip().lower() in ("1", "true", "yes", "on")


def load(name: str):
    """The extension built from ``csrc/<name>.cpp``; None if it cannot be built here.

    A failed build is reported once as a warning and recorded, so the ops that
    use it fall back to their torch path and ``fastft info`` says why; where
    :func:`cpp_required` (``FASTFT_REQUIRE_CPP=1``) it raises FastftError instead.
    """
    from . import backends

    with _lock:
        if name in _loaded:
            return _loaded[name]
        src = source_dir() / f"{name}.cpp"
        try:
            mod = build(name, [src], flags=CPP_FLAGS + EXTRA_FLAGS.get(name, ()))
        except Exception as e:  # a compiler error, a missing compiler or ninja
            lines = str(e).strip().splitlines() or [type(e).__name__]
            if cpp_required():
                raise FastftError(
                    f"C++ build of {src} failed and FASTFT_REQUIRE_CPP=1 is set, so there "
                    "is no fallback to the torch path:\n" + "\n".join(lines[-25:])) from e
            why = f"C++ build of csrc/{name}.cpp failed: {lines[-1]}"
            backends.mark_broken(f"cpp:{name}", why)
            warnings.warn(f"fastft: {why}; falling back to the torch path", stacklevel=2)
            mod = None
        _loaded[name] = mod
        return mod


# ---- CUDA sources: compile check with nvcc --------------------------------------------------

SMEM_LIMIT = {"sm_90": 232448, "sm_80": 166912}  # bytes of shared memory per block


def cuda_sources() -> list[Path]:
    return sorted(source_dir().glob("*.cu"))


def nvcc_check(source: Path, arch: str) -> list[dict]:
    """Compile ``source`` for ``arch`` (e.g. sm_90) with nvcc; one row per kernel."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [dict(kernel=source.name, arch=arch, ok=None, error="nvcc not found")]
    num = arch.split("_")[1]
    cmd = [nvcc, "-c", str(source), "-o", os.devnull, "-std=c++17", "-O3",
           f"-gencode=arch=compute_{num},code=sm_{num}", "-Xptxas", "-v"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return [dict(kernel=source.name, arch=arch, ok=False,
                     error=(proc.stderr or proc.stdout).strip()[-2000:])]
    return parse_ptxas(proc.stderr, arch, source.name)


def parse_ptxas(text: str, arch: str, source: str) -> list[dict]:
    """Rows {kernel, registers, spill_bytes, shared_bytes, ok} from ``ptxas -v`` output."""
    rows, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            cur = dict(kernel=m.group(1), source=source, arch=arch, registers=0, spill_bytes=0,
                       shared_bytes=0, ok=True, error="")
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            cur["shared_bytes"] = int(m.group(1))
    for r in rows:
        if r["spill_bytes"]:
            r["ok"], r["error"] = False, f"{r['spill_bytes']} bytes of register spills"
        elif r["shared_bytes"] > SMEM_LIMIT.get(arch, 1 << 30):
            r["ok"], r["error"] = False, "shared memory over the chip's limit"
    return rows
