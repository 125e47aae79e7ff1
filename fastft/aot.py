"""``fastft check-kernels``: compile every shipped kernel ahead of time for real GPUs.

Each Triton kernel file lists, in ``aot_specs()``, every (kernel, signature,
constexprs, options) it launches. Each is compiled with ``triton.compile`` for
each target arch on this machine (no GPU needed; Triton ships ptxas), and the
cubin's resources are read with Triton's cuobjdump: registers and local memory
(spills), plus the shared memory Triton allocates, and static counts of the SASS (every
instruction, the global loads and how many are vector loads, the asynchronous copies).
Matrix kernels must show ``wgmma`` in their sm_90 PTX. CUDA sources in csrc/ are compiled with nvcc for the same archs.
A row fails on a compile error, any spill, or shared memory over the limit.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from . import extensions

ARCHS = ("sm_90", "sm_80")


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def cuobjdump(cubin: bytes, *flags: str) -> list[str]:
    """cuobjdump's output for each of ``flags`` (e.g. ``-res-usage``, ``-sass``), over one
    temporary copy of the cubin."""
    outs = []
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.cubin"
        p.write_bytes(cubin)
        for flag in flags:
            proc = subprocess.run([_cuobjdump(), flag, str(p)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"cuobjdump {flag}: "
                                   f"{(proc.stderr or proc.stdout).strip()[-300:]}")
            outs.append(proc.stdout)
    return outs


def cubin_resources(res_usage: str) -> dict:
    """{registers, local_bytes} of the first function, from ``cuobjdump -res-usage``."""
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res_usage)
    if not m:
        raise RuntimeError(f"cuobjdump: {res_usage.strip()[-300:]}")
    return dict(registers=int(m.group(1)), stack_bytes=int(m.group(2)),
                local_bytes=int(m.group(4)))


_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_counts(sass: str) -> dict:
    """Static instruction counts of ``cuobjdump -sass``: every instruction, the global loads
    (``ldg``) and how many of them are vector loads of 64 or 128 bits (``ldg_vector``: a
    tile read row by row as scalars shows up here as a low share), and the asynchronous
    copies to shared memory (``async_copies``: cp.async LDGSTS and TMA UTMALDG, the
    pipelined loads of a GEMM's K loop)."""
    ops = _SASS_OP.findall(sass)
    ldg = [o for o in ops if o.startswith("LDG.") or o == "LDG"]
    return dict(instructions=len(ops), ldg=len(ldg),
                ldg_vector=sum(1 for o in ldg if ".64" in o or ".128" in o),
                async_copies=sum(1 for o in ops if o.startswith(("LDGSTS", "UTMALDG"))))


def compile_spec(spec: dict, arch: str) -> dict:
    """Compile one Triton spec for ``arch``; return its report row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    num = int(arch.split("_")[1])
    row = dict(kernel=spec["name"], config=spec["config"], arch=arch, registers=0,
               spill_bytes=0, shared_bytes=0, wgmma="-", instructions=0, ldg=0,
               ldg_vector=0, async_copies=0, ok=True, error="")
    # As Triton's launcher specialises them at run time: integer arguments equal to 1
    # become constants, and pointers/integers divisible by 16 are marked so.
    fn = spec["kernel"]
    signature, constexprs, attrs = dict(spec["signature"]), dict(spec["constexprs"]), {}
    for arg, hint in spec.get("hints", {}).items():
        if hint == 1:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        else:
            attrs[(fn.arg_names.index(arg),)] = [["tt.divisibility", 16]]
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", num, 32),
                                  options=spec["options"])
    except Exception as e:  # compile errors are what this check exists to find
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        row.update(ok=False, error=f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300])
        return row
    row["shared_bytes"] = int(compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    if spec.get("matrix"):
        row["wgmma"] = ("yes" if "wgmma" in ptx else "NO") if num >= 90 else "-"
    try:
        res_usage, sass = cuobjdump(compiled.asm["cubin"], "-res-usage", "-sass")
        res = cubin_resources(res_usage)
    except RuntimeError as e:
        row.update(ok=False, error=str(e))
        return row
    row["registers"] = res["registers"]
    row.update(sass_counts(sass))
    # Local memory per thread: register spills (and arrays the compiler could not keep
    # in registers); either is a kernel that will not run at speed.
    row["spill_bytes"] = res["local_bytes"]
    limit = extensions.SMEM_LIMIT.get(arch, 1 << 30)
    if row["spill_bytes"]:
        row.update(ok=False, error=f"{row['spill_bytes']} bytes of register spills")
    elif row["shared_bytes"] > limit:
        row.update(ok=False, error=f"shared memory {row['shared_bytes']} > {limit}")
    elif row["wgmma"] == "NO":
        row.update(ok=False, error="matrix kernel without wgmma on sm_90")
    return row


def triton_specs() -> list[dict]:
    from .kernels import KERNEL_FILES

    specs = []
    for name in KERNEL_FILES:
        mod = importlib.import_module(f"fastft.kernels.{name}")
        for spec in mod.aot_specs():
            specs.append(dict(spec, file=name))
    return specs


def _triton_rows(file: str, index: int, arch: str) -> list[dict]:
    """Spec ``index`` of kernels/<file>.py compiled for ``arch`` (a worker's task: specs hold
    functions, so a worker finds its spec by file and index)."""
    spec = importlib.import_module(f"fastft.kernels.{file}").aot_specs()[index]
    return [dict(compile_spec(spec, arch), file=f"kernels/{file}.py")]


def _nvcc_rows(source: str, arch: str) -> list[dict]:
    src = Path(source)
    return [dict(r, config="nvcc -O3", wgmma="-", file=f"csrc/{src.name}")
            for r in extensions.nvcc_check(src, arch)]


def check(archs=ARCHS, jobs: int | None = None) -> list[dict]:
    """Every report row: the Triton kernels, then the csrc/*.cu kernels.

    The compiles run in ``jobs`` worker processes (default: the CPU count, at most 16), the
    slow nvcc ones submitted first; the rows keep this order whatever finishes first.
    """
    from .kernels import KERNEL_FILES

    tasks = [(_triton_rows, (name, i, arch)) for name in KERNEL_FILES
             for i in range(len(importlib.import_module(f"fastft.kernels.{name}").aot_specs()))
             for arch in archs]
    nvcc = [(_nvcc_rows, (str(src), arch)) for src in extensions.cuda_sources()
            for arch in archs]
    jobs = jobs or min(16, os.cpu_count() or 1)
    if jobs <= 1:
        results = [fn(*a) for fn, a in tasks + nvcc]
    else:
        ctx = multiprocessing.get_context("spawn")  # no forked Triton/MLIR state
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            late = [pool.submit(fn, *a) for fn, a in nvcc]
            early = [pool.submit(fn, *a) for fn, a in tasks]
            results = [f.result() for f in early + late]
    return [row for rows in results for row in rows]


def run_in_clean_process(archs) -> int:
    """Triton's interpreter replaces the compiler: run the check in a process without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastft.cli", "check-kernels", "--arch", ",".join(archs)]
    return subprocess.call(cmd, env=env)
