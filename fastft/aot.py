"""``fastft check-kernels``: compile every shipped kernel ahead of time for real GPUs.

Each Triton kernel file lists, in ``aot_specs()``, every (kernel, signature,
constexprs, options) it launches. Each is compiled with ``triton.compile`` for
each target arch on this machine (no GPU needed; Triton ships ptxas), and the
cubin's resources are read with Triton's cuobjdump: registers and local memory
(spills), plus the shared memory Triton allocates, and static counts of the SASS (every
instruction, the global loads and how many are vector loads, the asynchronous copies).
Matrix kernels must show ``wgmma`` in their sm_90 PTX. CUDA sources in csrc/ are compiled with nvcc for the same archs.
A row fails on a compile error, any spill, or shared memory over the limit.

Each Triton row also gets its SASS instructions per element (``instructions_per_element``)
and the budget of its kernel (``BUDGETS``); a row over its budget is OVER and fails the
check: a regression such as a tile read through scalar loads shows there before any GPU
runs it.
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
from collections.abc import Callable
from pathlib import Path

from . import extensions

ARCHS = ("sm_90", "sm_80")

# Elements one program handles in one pass of its code, per kernel (the ``name`` of its
# specs), from the spec's constexprs. A loop over a dimension of run-time size (V, K, n)
# counts one iteration's tile: its body is in the SASS once, however often it runs.
ELEMENTS: dict[str, Callable[[dict], int]] = {
    "row_stats": lambda c: c["BLOCK_V"],  # one vocabulary tile of the row's sweep
    "row_grad": lambda c: c["BLOCK_V"],
    "gumbel_race": lambda c: c["BLOCK_V"],  # one tile of a span, all (K + 7) // 8 sweeps
    "gumbel_combine": lambda c: c["K"],  # one row: its K samples (over S_PAD spans each)
    "dual_matmul": lambda c: c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"],  # MACs, one K step
    "dy_b_db": lambda c: c["BLOCK_T"] * c["BLOCK_N"],  # one tile of dY (two rank-r products)
    "sparse_adam": lambda c: c["BLOCK"],  # entries
    "sparse_adam_multi": lambda c: c["BLOCK"],
    # a tile of ROWS rows: KP (K padded) segments of P with a dot, else one output segment
    "hadamard": lambda c: c.get("KP", 1) * c["ROWS"] * c["P"],
    "rotate_quant": lambda c: c.get("KP", 1) * c["ROWS"] * c["P"],
    "quant_rows": lambda c: c["ROWS"] * c["BLOCK"],  # one tile (one step of each sweep)
    "grad_scale": lambda c: c["BLOCK"],
}

# SASS instructions per element each kernel may reach (see instructions_per_element): about
# 15% over the largest of its variants as Triton 3.9 compiles them today (the range of each
# in the comment); a callable where its variants differ by design (samples drawn, a
# reference row, a K factor by tl.dot, packed short rows, the arch's MMA), reading the
# spec's constexprs and ``arch``. Raise a budget here, with the reason in the commit, when a
# kernel does more work per element on purpose.
GEMM_TILES = {  # (arch, BLOCK_M, BLOCK_N): dual_matmul per MAC of one K step
    ("sm_90", 128, 256): 0.22, ("sm_90", 128, 128): 0.27, ("sm_90", 64, 128): 0.39,  # wgmma
    ("sm_80", 128, 256): 0.29, ("sm_80", 128, 128): 0.37, ("sm_80", 64, 128): 0.47,  # mma
}


def _gemm_budget(c: dict) -> float:
    """dual_matmul's budget for its tile (a tile not listed: the loosest of its arch)."""
    key = (c["arch"], c["BLOCK_M"], c["BLOCK_N"])
    return GEMM_TILES.get(key, max((v for k, v in GEMM_TILES.items() if k[0] == c["arch"]),
                                   default=None))


BUDGETS: dict[str, float | Callable[[dict], float]] = {
    "row_stats": 102,  # 74.5-89
    "row_grad": lambda c: 151 if c["HAS_REF"] else 58,  # 119-131 with a reference; 44-50
    "gumbel_race": lambda c: 150 * c["K"],  # per sample drawn: 128-130.5 (K = 8, 12)
    "gumbel_combine": 2400,  # 1792-2080 (one warp; per sample: its spans, a gather)
    "grad_scale": 6.5,  # 4.5-5.5
    "dual_matmul": _gemm_budget,  # 0.184-0.338 on sm_90, 0.237-0.402 on sm_80
    "dy_b_db": lambda c: 15.5 if c["R_PAD"] <= 16 else 17.5,  # 9.6-13.1; 13.9-14.9
    "sparse_adam": 129,  # 102-112
    "sparse_adam_multi": 127,  # 97-110
    # no K 25.5-36; K segments 32-55 (fp32 segments: the loop unrolled by 8); by tl.dot
    # 38-85.5, growing with KP (16, 32)
    "hadamard": lambda c: (44 + 1.75 * c["KP"]) if c.get("DOT") else 62 if c["HAS_K"] else 42,
    # by tl.dot: 91.5-116.5 one row a tile, 106-210 packed rows; segments with K: 81-106.5
    # (100.5-115 packed, ROWS >= 8); no K: 49-67.5 (87.5-127 packed)
    "rotate_quant": lambda c: ((242 if c["ROWS"] > 1 else 134) if c.get("DOT")
                               else (133 if c["ROWS"] >= 8 else 123) if c["HAS_K"]
                               else (146 if c["ROWS"] >= 8 else 78)),
    "quant_rows": lambda c: 49 if c["ONE_TILE"] else 58,  # one tile 32.5-42; sweeps 44-50
}


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
    pipelined loads of a GEMM's K loop), and the stores to local memory (``local_stores``,
    STL: register spills)."""
    ops = _SASS_OP.findall(sass)
    ldg = [o for o in ops if o.startswith("LDG.") or o == "LDG"]
    return dict(instructions=len(ops), ldg=len(ldg),
                local_stores=sum(1 for o in ops if o == "STL" or o.startswith("STL.")),
                ldg_vector=sum(1 for o in ldg if ".64" in o or ".128" in o),
                async_copies=sum(1 for o in ops if o.startswith(("LDGSTS", "UTMALDG"))))


def instructions_per_element(instructions: int, spec: dict) -> float | None:
    """SASS instructions per element of one pass: the static count times the threads of a
    program (each thread runs each instruction once per pass), divided by the elements that
    pass covers (``ELEMENTS``). That is the count per element of one thread's share:
    comparable across block sizes and warp counts. None for a kernel not in ``ELEMENTS``.

    Static counts include the prologue and epilogue, and a loop body counted once stands for
    all its iterations: for a kernel that loops (over V, K or n), the figure is the loop's
    per-element cost plus a fixed share, an upper bound on the steady-state count."""
    per = ELEMENTS.get(spec["name"])
    if per is None or not instructions:
        return None
    try:
        elements = per(spec["constexprs"])
    except KeyError:  # a constexpr renamed in the kernel: its row reads "no budget"
        return None
    return instructions * 32 * spec["options"].get("num_warps", 4) / elements


def budget(spec: dict, arch: str) -> float | None:
    """The instructions-per-element budget of ``spec`` compiled for ``arch`` (``BUDGETS``;
    a callable budget reads the constexprs and ``arch``), or None where none is set."""
    b = BUDGETS.get(spec["name"])
    try:
        return b(dict(spec["constexprs"], arch=arch)) if callable(b) else b
    except KeyError:  # a constexpr renamed in the kernel: its row reads "no budget"
        return None


def judge_budget(row: dict, spec: dict, arch: str) -> dict:
    """Fill ``instr_per_elem``, ``budget`` and ``over`` (over its budget) of a compiled row."""
    ipe = instructions_per_element(row["instructions"], spec)
    limit = budget(spec, arch)
    row.update(instr_per_elem=None if ipe is None else round(ipe, 3), budget=limit,
               over=ipe is not None and limit is not None and ipe > limit)
    return row


def toolchain() -> dict:
    """The versions that decide the SASS: Triton's, and that of the ptxas it ships."""
    import triton

    ptxas = Path(_cuobjdump()).with_name("ptxas")
    try:
        out = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+), V([\d.]+)", out)
        ptxas_v = m.group(2) if m else "unknown"
    except OSError:
        ptxas_v = "missing"
    return dict(triton=triton.__version__, ptxas=ptxas_v)


# Variants that spill into the stack frame today, with the bytes each may spill (a ratchet:
# more than this, or a spill anywhere else, fails the check). The prefetching persistent
# Hadamard and rotate + fake-quant kernels and their whole-row tl.dot tiles (32 warps: at
# most 64 registers a thread) spill 8-104 bytes per thread; each entry is a variant still to
# be brought to none.
KNOWN_SPILLS = {
    ("hadamard", "P=64 ROWS=32 fp16 K warps=4", "sm_80"): 8,
    ("hadamard", "P=128 ROWS=16 bf16 K warps=4", "sm_90"): 8,
    ("hadamard", "P=128 ROWS=16 fp16 K warps=4", "sm_90"): 8,
    ("hadamard", "P=512 ROWS=4 fp16 K warps=4", "sm_80"): 8,
    ("hadamard", "P=16384 ROWS=1 fp16 K warps=32", "sm_80"): 32,
    ("hadamard", "P=32768 ROWS=1 fp32 K warps=32", "sm_90"): 8,
    ("hadamard", "n=12288 K=12 P=1024 ROWS=1 bf16 K dot warps=32", "sm_90"): 8,
    ("hadamard", "n=96 K=12 P=8 ROWS=128 bf16 K dot warps=32", "sm_90"): 8,
    ("hadamard", "n=14336 K=28 P=512 ROWS=1 fp32 K dot warps=32", "sm_90"): 16,
    ("rotate_quant", "P=8192 ROWS=1 bf16 K warps=16", "sm_90"): 8,
    ("rotate_quant", "P=16384 ROWS=1 bf16 K warps=32", "sm_80"): 80,
    ("rotate_quant", "P=32768 ROWS=1 bf16 warps=32", "sm_90"): 88,
    ("rotate_quant", "P=32768 ROWS=1 bf16 warps=32", "sm_80"): 104,
    ("rotate_quant", "P=32768 ROWS=1 bf16 K warps=32", "sm_90"): 8,
    ("rotate_quant", "n=14336 K=28 P=512 ROWS=1 bf16 K dot warps=32", "sm_90"): 32,
    ("rotate_quant", "n=3584 K=28 P=128 ROWS=4 bf16 K dot warps=32", "sm_90"): 64,
    ("rotate_quant", "n=3584 K=28 P=128 ROWS=4 bf16 K dot warps=32", "sm_80"): 48,
    ("rotate_quant", "n=5120 K=20 P=256 ROWS=2 bf16 K dot warps=32", "sm_90"): 48,
    ("rotate_quant", "n=12288 K=12 P=1024 ROWS=1 bf16 K dot warps=32", "sm_90"): 24,
    ("rotate_quant", "n=12288 K=12 P=1024 ROWS=1 bf16 K dot warps=32", "sm_80"): 32,
    ("rotate_quant", "n=96 K=12 P=8 ROWS=128 bf16 K dot warps=32", "sm_90"): 16,
    ("rotate_quant", "n=14336 K=28 P=512 ROWS=1 fp32 K dot warps=32", "sm_90"): 40,
    ("rotate_quant", "n=14336 K=28 P=512 ROWS=1 fp32 K dot warps=32", "sm_80"): 24,
    ("rotate_quant", "n=14336 K=28 P=512 ROWS=1 bf16 K dot sym warps=32", "sm_90"): 32,
}


def compile_spec(spec: dict, arch: str) -> dict:
    """Compile one Triton spec for ``arch``; return its report row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    num = int(arch.split("_")[1])
    row = dict(kernel=spec["name"], config=spec["config"], arch=arch, registers=0,
               spill_bytes=0, shared_bytes=0, wgmma="-", instructions=0, ldg=0,
               ldg_vector=0, async_copies=0, local_stores=0, instr_per_elem=None, budget=None,
               over=False,
               ok=True, error="")
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
    judge_budget(row, spec, arch)
    # Local memory per thread: register spills (and arrays the compiler could not keep
    # in registers); either is a kernel that will not run at speed. With Triton's ptxas
    # options the spills land in the stack frame (STACK, not LOCAL, in -res-usage): a frame
    # that the SASS stores to (STL) counts as spilled.
    row["spill_bytes"] = max(res["local_bytes"],
                             res["stack_bytes"] if row["local_stores"] else 0)
    limit = extensions.SMEM_LIMIT.get(arch, 1 << 30)
    known = KNOWN_SPILLS.get((spec["name"], spec["config"], arch), 0)
    row["known_spill"] = bool(row["spill_bytes"]) and row["spill_bytes"] <= known
    if row["spill_bytes"] and not row["known_spill"]:
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
             for i, spec in enumerate(importlib.import_module(f"fastft.kernels.{name}")
                                      .aot_specs())
             for arch in archs if arch in spec.get("archs", archs)]  # a spec may name its own
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


def run_in_clean_process(archs, json_path: str | None = None) -> int:
    """Triton's interpreter replaces the compiler: run the check in a process without it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastft.cli", "check-kernels"]
    cmd += ["--json", json_path] if json_path else []
    cmd += ["--arch", ",".join(archs)]
    return subprocess.call(cmd, env=env)
