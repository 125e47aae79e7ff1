"""Ahead-of-time compile of Triton kernels for sm_90/sm_80, in a process without the interpreter."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import triton, triton.language as tl
    from fastft import aot
    from fastft.kernels import loss_rows

    @triton.jit
    def mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
        pm, pn = tl.program_id(0), tl.program_id(1)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :],
                        mask=(rm[:, None] < M) & ((k + rk)[None, :] < K), other=0.0)
            b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :],
                        mask=((k + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc,
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    mm = dict(name="mm", kernel=mm_kernel, matrix=True, config="128x128x64",
              signature={"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "M": "i32",
                         "N": "i32", "K": "i32"},
              constexprs={"BM": 128, "BN": 128, "BK": 64}, options={"num_warps": 8})
    rows = [aot.compile_spec(mm, "sm_90"), aot.compile_spec(mm, "sm_80"),
            aot.compile_spec(loss_rows.aot_specs()[0], "sm_90")]
    print(json.dumps(rows))
""")


@pytest.mark.slow
def test_compiles_for_hopper_and_ampere_and_reads_resources(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "aot_probe.py"  # @triton.jit needs its source in a file
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    mm90, mm80, rows90 = json.loads(out.stdout.strip().splitlines()[-1])
    assert mm90["ok"] and mm90["wgmma"] == "yes" and mm90["shared_bytes"] > 0
    assert mm80["ok"] and mm80["wgmma"] == "-"
    assert rows90["ok"] and rows90["registers"] > 0 and rows90["spill_bytes"] == 0
    # the SASS counts: this GEMM's pointers carry no alignment hints, so its tiles come in
    # through plain loads, none of them vector loads and no async copies; the shipped row
    # kernel (hinted) reads its rows with vector loads
    assert mm90["instructions"] > 100 and mm90["ldg"] > 0 and mm90["ldg_vector"] == 0
    assert mm90["async_copies"] == 0
    assert rows90["ldg"] > 0 and rows90["ldg_vector"] > 0


def test_cli_reruns_itself_without_the_interpreter(monkeypatch):
    """Under TRITON_INTERPRET=1 (the test process) check-kernels still compiles for real."""
    from fastft import aot

    calls = []
    monkeypatch.setattr(aot.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    from fastft.cli import main

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["check-kernels", "--arch", "sm_90"]) == 0
    (cmd, env), = calls
    assert "TRITON_INTERPRET" not in env and cmd[-2:] == ["--arch", "sm_90"]


HADAMARD_SCRIPT = textwrap.dedent("""
    import json
    from fastft import aot
    from fastft.kernels import fake_quant, hadamard

    def pick(specs, **want):
        return next(s for s in specs if all(s["constexprs"].get(k) == v for k, v in want.items()
                                            if k != "dt") and s["signature"]["x_ptr"] == want["dt"])

    h, q = hadamard.aot_specs(), fake_quant.aot_specs()
    specs = [pick(h, P=32768, HAS_K=True, dt="*bf16"), pick(h, P=64, HAS_K=True, dt="*fp32"),
             pick(h, P=8192, HAS_K=False, dt="*bf16"),
             pick([s for s in q if s["name"] == "rotate_quant"], P=32768, HAS_K=True, dt="*bf16"),
             pick([s for s in q if s["name"] == "quant_rows"], BLOCK=8192, dt="*bf16")]
    print(json.dumps([aot.compile_spec(s, "sm_90") for s in specs]))
""")


@pytest.mark.slow
def test_hadamard_and_fake_quant_kernels_compile_for_hopper_without_spills(tmp_path):
    """The RoSTE kernels at their largest tiles (P = 32768 in one program) and smallest."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "aot_hadamard.py"
    script.write_text(HADAMARD_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 5
    for r in rows:
        assert r["ok"] and r["registers"] > 0 and r["spill_bytes"] == 0, r
    assert rows[0]["shared_bytes"] == 32768 * 4  # the layout exchanges of the transform
