"""Ahead-of-time compile of Triton kernels for sm_90/sm_80, in a process without the interpreter."""

import json
import textwrap

import pytest

from .helpers import compiled_rows

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
    mm90, mm80, rows90 = compiled_rows(tmp_path, "aot_probe.py", SCRIPT)
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
    rows = compiled_rows(tmp_path, "aot_hadamard.py", HADAMARD_SCRIPT)
    assert len(rows) == 5
    for r in rows:
        # no spill, or no more than aot.KNOWN_SPILLS allows this variant
        assert r["ok"] and r["registers"] > 0 and (r["spill_bytes"] == 0 or r["known_spill"]), r
    assert rows[0]["shared_bytes"] == 32768 * 4  # the layout exchanges of the transform


def test_instructions_per_element_count_a_threads_share_of_one_pass():
    """512 instructions, 4 warps (128 threads) over a 1024-wide tile: each thread runs all 512
    for its 8 elements, 64 per element; budgets as numbers or callables of the constexprs."""
    from fastft import aot

    spec = dict(name="row_stats", constexprs={"BLOCK_V": 1024}, options={"num_warps": 4})
    assert aot.instructions_per_element(512, spec) == 64.0
    assert aot.instructions_per_element(512, dict(spec, name="unknown")) is None
    assert aot.instructions_per_element(0, spec) is None  # a row that did not compile
    row = aot.judge_budget(dict(instructions=512), spec, "sm_90")
    assert row["instr_per_elem"] == 64.0 and row["budget"] == aot.BUDGETS["row_stats"]
    assert row["over"] is False
    row = aot.judge_budget(dict(instructions=4 * 512), spec, "sm_90")  # four times the work
    assert row["over"] is True
    mm = dict(name="dual_matmul", options={"num_warps": 8},
              constexprs={"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64})
    assert aot.instructions_per_element(1024, mm) == 1024 * 256 / (128 * 256 * 64)
    assert aot.budget(mm, "sm_90") < aot.budget(mm, "sm_80")  # wgmma against mma.sync


def test_every_shipped_kernel_has_its_elements_and_a_budget():
    """Each spec name of kernels/*.py is in aot.ELEMENTS and aot.BUDGETS (and nothing else
    is): a new or renamed kernel needs its line in both tables."""
    from fastft import aot

    specs = aot.triton_specs()
    names = {s["name"] for s in specs}
    assert names == set(aot.ELEMENTS) == set(aot.BUDGETS), (
        f"missing: {sorted(names - set(aot.ELEMENTS) | names - set(aot.BUDGETS))}; "
        f"stale: {sorted(set(aot.ELEMENTS) - names | set(aot.BUDGETS) - names)}")
    for s in specs:
        assert aot.ELEMENTS[s["name"]](s["constexprs"]) > 0
        for arch in aot.ARCHS:
            assert aot.budget(s, arch) > 0, (s["name"], s["config"], arch)


def test_check_kernels_prints_the_version_and_fails_on_a_kernel_over_budget(
        monkeypatch, capsys, tmp_path):
    from fastft import aot, backends
    from fastft.cli import main

    base = dict(file="kernels/x.py", config="c", arch="sm_90", registers=32, spill_bytes=0,
                shared_bytes=0, wgmma="-", instructions=100, ldg=1, ldg_vector=1,
                async_copies=0, ok=True, error="")
    rows = [dict(base, kernel="fine", instr_per_elem=10.0, budget=12.0, over=False),
            dict(base, kernel="slow", instr_per_elem=30.0, budget=12.0, over=True),
            dict(base, kernel="k", file="csrc/k.cu", config="nvcc -O3")]
    monkeypatch.setattr(backends, "interpreter_on", lambda: False)
    monkeypatch.setattr(aot, "toolchain", lambda: dict(triton="9.9.9", ptxas="1.2"))
    monkeypatch.setattr(aot, "check", lambda archs: [dict(r) for r in rows])
    out_json = tmp_path / "rows.json"
    assert main(["check-kernels", "--arch", "sm_90", "--json", str(out_json)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("Triton 9.9.9 (ptxas 1.2)")
    assert "OVER: 30 > 12 instr/elem" in out and "slow [c] sm_90: 30 > 12" in out
    assert "instr/elem" in out.splitlines()[2] and "budget" in out.splitlines()[2]
    stored = json.loads(out_json.read_text())
    assert stored["toolchain"]["triton"] == "9.9.9" and len(stored["rows"]) == 3
    monkeypatch.setattr(aot, "check", lambda archs: [dict(r) for r in rows if not r.get("over")])
    assert main(["check-kernels", "--arch", "sm_90"]) == 0
    assert "OVER" not in capsys.readouterr().out


REGRESSION_SCRIPT = textwrap.dedent("""
    import json
    from fastft import aot
    from fastft.kernels import lora_matmul

    spec = next(s for s in lora_matmul.aot_specs() if s["config"].startswith("128x128x64"))
    bare = dict(spec, hints={})  # no alignment hints: plain loads, no cp.async pipeline
    print(json.dumps([aot.compile_spec(s, "sm_90") for s in (spec, bare)]))
""")


@pytest.mark.slow
def test_a_gemm_tile_read_without_its_pipelined_loads_is_over_budget(tmp_path):
    """The LoRA GEMM tile as shipped stays within its budget; the same tile without the
    launcher's alignment hints, read by scalar loads with no asynchronous copies, is OVER."""
    shipped, bare = compiled_rows(tmp_path, "aot_regression.py", REGRESSION_SCRIPT)
    assert shipped["ok"] and shipped["async_copies"] > 0 and not shipped["over"], shipped
    assert bare["async_copies"] == 0 and bare["over"], bare
    assert bare["instr_per_elem"] > 2 * shipped["instr_per_elem"]


SPILL_SCRIPT = textwrap.dedent("""
    import json
    from fastft import aot
    from fastft.kernels import lora_matmul

    tiles = [s for s in lora_matmul.aot_specs() if s["config"].startswith("128x128x64")
             and s["config"].endswith("fwd bf16")]
    hopper = next(s for s in tiles if s["archs"] == ("sm_90",))
    ampere = next(s for s in tiles if s["archs"] == ("sm_80",))
    print(json.dumps([aot.compile_spec(s, "sm_80") for s in (hopper, ampere)]))
""")


@pytest.mark.slow
def test_spills_into_the_stack_frame_are_seen_and_fail(tmp_path):
    """Triton's ptxas options put spills in the stack frame (STACK, not LOCAL): the sm_90
    tile of the LoRA GEMM (4 warps), compiled for sm_80, stores to it and fails the check;
    the tile shipped for sm_80 (8 warps) spills nothing."""
    hopper, ampere = compiled_rows(tmp_path, "aot_spill.py", SPILL_SCRIPT)
    assert hopper["local_stores"] > 0 and hopper["spill_bytes"] > 0, hopper
    assert not hopper["ok"] and "spills" in hopper["error"], hopper
    assert ampere["ok"] and ampere["spill_bytes"] == 0 and ampere["local_stores"] == 0, ampere
