"""The Hadamard and fake-quant kernels (kernels/hadamard.py, kernels/fake_quant.py under the
interpreter; csrc/hadamard.cpp; csrc/hadamard.cu on a GPU) against a dense fp64 H @ x and a
torch formula of the quantizer written here."""

import importlib
import shutil
import textwrap

import pytest
import torch
import triton

from fastft import backends, extensions
from fastft.ops.hadamard_factors import kfactor, plan

from ..helpers import assert_close, compiled_rows

SIZES = [16, 64, 12 * 16, 20 * 8, 28 * 4]  # n = K P: K = 1, 12, 20, 28 (Paley factors)
IMPLS = [pytest.param("triton", marks=pytest.mark.interpreter), "cpp",
         pytest.param("cuda", marks=pytest.mark.cuda)]


class Impl:
    """The three kernels of one backend behind one signature."""

    def __init__(self, name, device):
        self.name = name
        if name == "triton":
            from fastft.kernels import fake_quant, hadamard

            self.hadamard = hadamard.hadamard
            self.act = lambda x, h, s, bits, sym, c, rotate: fake_quant.fake_quant_act(
                x, h, s, bits, sym, c, rotate=rotate)
            self.weight = fake_quant.fake_quant_weight
        elif name == "cpp":
            ext = extensions.load("hadamard")
            assert ext is not None, "csrc/hadamard.cpp did not build"
            self.hadamard = ext.hadamard
            self.act = lambda x, h, s, bits, sym, c, rotate: ext.fake_quant_act(
                x, h, s, bits, sym, c, rotate, False)
            self.weight = ext.fake_quant_weight
        else:
            from fastft import cuda_lib

            lib = cuda_lib.load("hadamard", torch.device(device))
            if lib is None:
                pytest.skip("csrc/hadamard.cu did not build here (nvcc?)")
            self.hadamard = lambda x, h, s, t: cuda_lib.hadamard_rows(lib, x, h, s, t)
            self.act = lambda x, h, s, bits, sym, c, rotate: (
                cuda_lib.hadamard_rows(lib, x, h, s, False, (bits, sym, c)) if rotate
                else cuda_lib.quant_rows(lib, x, bits, sym, c))

            def weight(w, bits, sym, c, g):
                rows = w.contiguous().view(-1, g if 0 < g < w.shape[1] else w.shape[1])
                return cuda_lib.quant_rows(lib, rows, bits, sym, c).view(w.shape)

            self.weight = weight


@pytest.fixture(params=IMPLS)
def impl(request, device):
    if request.param == "cpp" and device != "cpu":
        pytest.skip("the C++ kernels run on the CPU")
    if request.param == "cuda" and device != "cuda":
        pytest.skip("needs a CUDA device")
    return Impl(request.param, device)


def dense(n: int, transpose: bool = False) -> torch.Tensor:
    """H_K kron H_P in fp64, H_P by Sylvester's kron, H_K the shipped factor (transposed)."""
    K, P = plan(n)
    hp = torch.ones(1, 1, dtype=torch.float64)
    while hp.shape[0] < P:
        hp = torch.kron(hp, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    hk = kfactor(K)
    return torch.kron(hk.t().contiguous() if transpose else hk, hp)


def factor(n: int, device):
    K, _ = plan(n)
    return kfactor(K).float().to(device) if K > 1 else None


def quant(x: torch.Tensor, bits: int, symmetric: bool, c: float) -> torch.Tensor:
    """METHODS.md section 4, per row, fp32; divisions by tensors (IEEE on every device)."""
    x = x.float()
    if symmetric:
        den = torch.full_like(x[:, :1], 2 ** (bits - 1) - 1)
        s = torch.clamp(c * x.abs().amax(1, keepdim=True) / den, min=1e-8)
        z, lo, hi = torch.zeros_like(s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        den = torch.full_like(x[:, :1], 2**bits - 1)
        mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        s = torch.clamp(c * (mx - mn) / den, min=1e-8)
        z, lo, hi = torch.round(-c * mn / s), 0, 2**bits - 1
    return (torch.clamp(torch.round(x / s) + z, lo, hi) - z) * s


@pytest.mark.parametrize("n,dtype,rtol", [(n, torch.float32, 1e-5) for n in SIZES]
                         + [(n, torch.float16, 2e-3) for n in (64, 12 * 16)])
def test_transform_equals_dense_and_inverts(impl, device, n, dtype, rtol):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g).to(device, dtype)
    h, s = factor(n, device), n**-0.5
    for transpose in (False, True):
        y = impl.hadamard(x, h, s, transpose)
        want = s * x.double() @ dense(n, transpose).to(device).t()
        assert y.dtype == dtype and y.shape == x.shape
        assert_close(y, want, rtol, f"transpose={transpose}")
        # H^T (H x) = x: the transposed factor undoes the normalised transform
        assert_close(impl.hadamard(y, h, s, not transpose), x.double(), 4 * rtol, "inverse")


def test_bf16_loads_and_stores(impl, device):
    n = 12 * 16
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    y = impl.hadamard(x, factor(n, device), 0.25, False)
    want = 0.25 * x.double() @ dense(n).to(device).t()
    assert y.dtype == torch.bfloat16
    assert_close(y, want, 1e-2)


def test_strided_rows_and_scale(impl, device):
    """A row stride that is not n (a column slice), any scale, a single row."""
    n = 64
    big = torch.randn(4, 3 * n, generator=torch.Generator().manual_seed(2)).to(device)
    x = big[:, n:2 * n]
    assert_close(impl.hadamard(x, None, 3.0, False), 3.0 * x.double() @ dense(n).to(device).t(),
                 1e-5)
    assert_close(impl.hadamard(x[:1], None, 1.0, False), x[:1].double() @ dense(n).to(device).t(),
                 1e-5)


def inputs(R, n, device, seed=0):
    x = torch.randn(R, n, generator=torch.Generator().manual_seed(seed)) * 2
    x[1] = 0.75  # a constant row: zero range, s = 1e-8
    if R > 3:
        x[3] = 0.0
    return x.to(device)


CASES = [(4, False, 1.0), (4, True, 0.9), (8, False, 0.95), (3, True, 1.0)]


@pytest.mark.parametrize("bits,symmetric,clip", CASES)
def test_fake_quant_rows_equal_the_formula(impl, device, bits, symmetric, clip):
    x = inputs(5, 100, device)
    got = impl.act(x, None, 1.0, bits, symmetric, clip, False)
    assert_close(got, quant(x, bits, symmetric, clip), 1e-6)
    if not symmetric and clip == 1.0:  # a constant row comes back (s = 1e-8, z = -x / s)
        assert_close(got[1], torch.full_like(got[1], 0.75), 1e-6)


@pytest.mark.parametrize("n", [64, 12 * 16])
@pytest.mark.parametrize("bits,symmetric,clip", CASES[:2])
def test_rotate_and_quant_is_quant_of_the_transform(impl, device, n, bits, symmetric, clip):
    """The fused kernel: one read, transform, per-row min/max, quantize, one write."""
    x = inputs(4, n, device, seed=n)
    h, s = factor(n, device), n**-0.5
    got = impl.act(x, h, s, bits, symmetric, clip, True)
    y = impl.hadamard(x, h, s, False)  # the same backend's transform, bit for bit
    assert_close(got, quant(y, bits, symmetric, clip), 1e-6)
    # and close to quant of the dense transform (a rounding tie may move one step)
    steps = (got.double() - quant(s * x.double() @ dense(n).to(device).t(), bits, symmetric,
                                  clip).double()).abs()
    assert (steps > 1e-4).float().mean() < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [0, 8, 32])
def test_fake_quant_weight_per_row_and_group(impl, device, dtype, group_size):
    w = inputs(6, 32, device, seed=3).to(dtype)
    got = impl.weight(w, 4, False, 1.0, group_size)
    g = group_size or 32
    want = quant(w.float().reshape(-1, g), 4, False, 1.0).reshape(6, 32).to(dtype)
    assert got.dtype == dtype and got.shape == w.shape
    assert_close(got, want, 1e-6)


@pytest.mark.parametrize("n", [43 * 4, 11008, 32768])
def test_cpp_large_and_random_factor_sizes_match_the_torch_path(n):
    """K = 43 (a seeded random orthogonal factor), 43 x 256, and P = 32768."""
    from fastft.ops.hadamard import transform_f32

    ext = extensions.load("hadamard")
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(n))
    for transpose in (False, True):
        assert_close(ext.hadamard(x, factor(n, "cpu"), n**-0.5, transpose),
                     transform_f32(x, n**-0.5, transpose), 1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["hadamard", "act", "weight"])
@pytest.mark.parametrize("name", ["triton", "cpp"])
def test_ops_dispatch_to_the_kernels(monkeypatch, device, op, name):
    """FASTFT_BACKEND picks the kernel at the op's dispatch point; the torch path agrees."""
    hadamard = importlib.import_module("fastft.ops.hadamard")  # the module, not the function
    fake_quant = importlib.import_module("fastft.ops.fake_quant")
    if device != "cpu":
        pytest.skip("CPU tensors: the interpreter and the C++ kernels")

    info = {"hadamard": hadamard.INFO, "act": fake_quant.ACT_INFO,
            "weight": fake_quant.WEIGHT_INFO}[op]
    x = inputs(4, 12 * 16, "cpu", seed=5)
    run = {"hadamard": lambda: torch.ops.fastft.hadamard(x, 0.3, True),
           "act": lambda: torch.ops.fastft.fake_quant_act(x, 4, False, 1.0, True),
           "weight": lambda: torch.ops.fastft.fake_quant_weight(x, 4, True, 0.9, 16)}[op]
    monkeypatch.setenv("FASTFT_BACKEND", "torch")
    want = run()
    monkeypatch.setenv("FASTFT_BACKEND", name)
    assert backends.choose(info, x.device) == name
    assert_close(run(), want, 1e-5)


@pytest.mark.interpreter
def test_triton_falls_back_to_torch_above_32768(monkeypatch):
    from fastft.ops.hadamard import transform_f32

    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    x = torch.randn(1, 65536, generator=torch.Generator().manual_seed(6))
    assert_close(torch.ops.fastft.hadamard(x, 2**-8, False), transform_f32(x, 2**-8, False),
                 1e-5)


def test_cuda_fold_of_large_p_is_the_same_matrix():
    """csrc/hadamard.cu runs P > 8192 as (H_K kron H_f) kron H_8192 (fastft.cuda_lib.fold)."""
    from fastft import cuda_lib

    hk = kfactor(12).float()
    h, K, P = cuda_lib.fold(hk, 12, 32768, "cpu")
    assert (K, P) == (48, 8192)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    assert torch.equal(h.double(), torch.kron(hk.double(), torch.kron(h2, h2)))
    assert cuda_lib.fold(hk, 12, 4096, "cpu") == (hk, 12, 4096)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles_for_sm90_and_sm80_without_spills():
    src = extensions.source_dir() / "hadamard.cu"
    assert src in extensions.cuda_sources()  # so `fastft check-kernels` reports it
    for arch in ("sm_90", "sm_80"):
        rows = extensions.nvcc_check(src, arch)
        bad = [(r["kernel"], r["error"]) for r in rows if not r["ok"]]
        assert not bad, bad
        names = " ".join(r["kernel"] for r in rows)
        assert len(rows) == 45 and "hadamard_kernel" in names and "quant_rows_kernel" in names
        assert all(r["registers"] > 0 and r["spill_bytes"] == 0 for r in rows)


def boundary_rows(bits: int, symmetric: bool, rows: int, device) -> torch.Tensor:
    """Rows whose values sit at and 1 ulp around RN((k + 0.5) s), each row's own scale s
    (its min 0 or -max and its max set so): where round(x / s) changes its code."""
    g = torch.Generator().manual_seed(bits + 10 * symmetric)
    top = torch.exp(torch.rand(rows, 1, generator=g) * 8 - 4)  # max of each row
    den = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    s = top / torch.full_like(top, den)  # fp32 IEEE, as the kernels compute s (clip 1)
    k = torch.arange(-(2 ** (bits - 1)) if symmetric else 0, den, dtype=torch.float32)
    mid = ((k + 0.5) * s).view(torch.int32)
    near = torch.stack([mid - 1, mid, mid + 1], -1).reshape(rows, -1).view(torch.float32)
    low = -top if symmetric else torch.zeros_like(top)
    return torch.cat([low, near.clamp(low, top), top], 1).to(device)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (3, False)])
def test_codes_at_rounding_boundaries_equal_ieee_division(impl, device, bits, symmetric):
    """The quantizer's y / s (a multiply by the row's 1 / s and one fma correction) gives the
    IEEE quotient's codes exactly, where one ulp off would change them."""
    x = boundary_rows(bits, symmetric, 48, device)
    got = impl.act(x, None, 1.0, bits, symmetric, 1.0, False)
    assert torch.equal(got, quant(x, bits, symmetric, 1.0))


def triton_kernels(monkeypatch, programs: int):
    """kernels/hadamard.py and fake_quant.py with ``programs`` programs off a GPU."""
    from fastft.kernels import fake_quant, hadamard

    monkeypatch.setattr(hadamard, "INTERPRET_PROGRAMS", programs)
    return hadamard, fake_quant


# (n, rows): whole-row tiles (K = 1: 4096, 64; H_K by tl.dot: 14336, 96) and segments
# (12 x 2048, past DOT_TILE), each with more tiles than the interpreter's 3 programs: 7, 4, 5,
# 4 and 4 tiles of 1, 32, 1, 128 and 1 rows
TILINGS = [(4096, 7), (64, 100), (28 * 512, 5), (12 * 8, 400), (12 * 2048, 4)]


@pytest.mark.interpreter
@pytest.mark.parametrize("n,R", TILINGS)
def test_persistent_programs_give_the_same_bits_as_one_per_tile(monkeypatch, n, R):
    """Each program loops over tiles with a stride, loading the next tile (or segment) ahead:
    with 3 programs (fewer than the tiles) the result is bit for bit that of one program per
    tile and of a single program, and it is the transform (rotate + quant: its quantized)."""
    from fastft.ops.hadamard import transform_f32

    K, P = plan(n)
    h = factor(n, "cpu")
    x = torch.randn(R, n, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    had, fq = triton_kernels(monkeypatch, 3)
    assert triton.cdiv(R, had.config(K, P).rows) > 3
    got = [had.hadamard(x, h, n**-0.5, True), fq.fake_quant_act(x, h, n**-0.5, 4, False, 1.0)]
    assert_close(got[0], transform_f32(x, n**-0.5, True), 1e-2)
    assert torch.equal(got[1], quant(had.hadamard(x.float(), h, n**-0.5), 4, False,
                                     1.0).to(torch.bfloat16))
    for programs in (1, 1000):
        had, fq = triton_kernels(monkeypatch, programs)
        assert torch.equal(had.hadamard(x, h, n**-0.5, True), got[0]), programs
        assert torch.equal(fq.fake_quant_act(x, h, n**-0.5, 4, False, 1.0), got[1]), programs


@pytest.mark.interpreter
@pytest.mark.parametrize("n", [12 * 16, 20 * 8, 28 * 4])
def test_dot_tiles_and_segments_agree(n):
    """H_K by tl.dot on a whole-row tile (K padded to 16 or 32 with zeros) and by K axpys over
    segments: the same transform (to fp32 rounding), forward and transposed, and the dense."""
    from fastft.kernels import fake_quant, hadamard

    x = inputs(5, n, "cpu", seed=n)
    h, s = factor(n, "cpu"), n**-0.5
    assert hadamard.config(*plan(n)).dot
    for transpose in (False, True):
        a = hadamard.hadamard(x, h, s, transpose, dot=True)
        b = hadamard.hadamard(x, h, s, transpose, dot=False)
        assert_close(a, b, 1e-6)
        assert_close(a, s * x.double() @ dense(n, transpose).t(), 1e-5)
    for dot in (True, False):
        q = fake_quant.fake_quant_act(x, h, s, 4, True, 0.9, dot=dot)
        assert torch.equal(q, quant(hadamard.hadamard(x, h, s, dot=dot), 4, True, 0.9))


@pytest.mark.interpreter
def test_llama3_mlp_width_takes_one_register_tile():
    """n = 14336 = 28 x 512: one [32, 512] fp32 tile per row, H_28 by one fp32 dot; equal to
    the torch path (fp32 and bf16 in and out) and to its quantized transform."""
    from fastft.kernels import fake_quant, hadamard

    from fastft.ops.hadamard import transform_f32

    n = 28 * 512
    assert hadamard.config(*plan(n)) == hadamard.Config(True, 32, 1, 32)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(7)) * 3
    h, s = factor(n, "cpu"), n**-0.5
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        xd = x.to(dtype)
        y = hadamard.hadamard(xd, h, s)
        assert y.dtype == dtype
        assert_close(y, transform_f32(xd, s, False), rtol)
    y = hadamard.hadamard(x, h, s)
    assert torch.equal(fake_quant.fake_quant_act(x, h, s, 4, False, 1.0), quant(y, 4, False, 1.0))


@pytest.mark.parametrize("rotate", [False, True])
def test_bf16_quantizer_equals_its_fp32_round_trip(impl, device, rotate):
    """bf16 in, fp32 math, bf16 out: the same bits as quantizing the fp32 copy and rounding
    the result to bf16, so a caller needs no fp32 round trip around the quantizer."""
    n = 12 * 16
    x = inputs(6, n, device, seed=11).to(torch.bfloat16)
    h, s = (factor(n, device), n**-0.5) if rotate else (None, 1.0)
    got = impl.act(x, h, s, 4, False, 1.0, rotate)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, impl.act(x.float(), h, s, 4, False, 1.0, rotate).to(torch.bfloat16))
    w = x.reshape(12, -1)
    assert torch.equal(impl.weight(w, 4, True, 0.9, 16),
                       impl.weight(w.float(), 4, True, 0.9, 16).to(torch.bfloat16))


HARDWARE_SCRIPT = textwrap.dedent("""
    import collections, json
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastft import aot
    from fastft.kernels import fake_quant, hadamard, sparse_adam

    def ops(spec):
        fn, attrs = spec["kernel"], {}
        for arg in spec["hints"]:
            attrs[(fn.arg_names.index(arg),)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"],
                        attrs=attrs)
        cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options=spec["options"]).asm["cubin"]
        sass = aot.cuobjdump(cubin, "-sass")[0]
        return collections.Counter(aot._SASS_OP.findall(sass))

    want = {"hadamard": "n=14336 K=28 P=512 ROWS=1 bf16 K dot warps=32",
            "rotate_quant": "n=14336 K=28 P=512 ROWS=1 bf16 K dot warps=32",
            "sparse_adam": "BLOCK=1024 w=bf16 idx=i32 grad=compact"}
    specs = [s for s in hadamard.aot_specs() + fake_quant.aot_specs() + sparse_adam.aot_specs()
             if want.get(s["name"]) == s["config"]]
    k1 = [s for s in fake_quant.aot_specs() if s["name"] == "rotate_quant"
          and s["config"] == "P=4096 ROWS=1 bf16 warps=8"]
    print(json.dumps([[aot.compile_spec(s, "sm_90"), ops(s)] for s in specs + k1]))
""")


@pytest.mark.slow
def test_gpu_code_uses_the_hardware_roundings_and_one_division_per_row(tmp_path):
    """Compiled for sm_90 (no interpreter): n = 14336 as one register tile without spills; the
    bf16 stores by F2FP conversions, the codes by FRND, and the quantizer's divisions (MUFU.RCP
    plus the FCHK range check of div_rn) only per row: s, z and 1 / s, not per element."""
    rows = compiled_rows(tmp_path, "aot_hardware.py", HARDWARE_SCRIPT)
    assert [r["kernel"] for r, _ in rows] == ["hadamard", "rotate_quant", "sparse_adam",
                                              "rotate_quant"]
    count = [{op: sum(v for k, v in ops.items() if k.startswith(op))
              for op in ("F2FP.BF16", "FRND", "FCHK", "MUFU.RCP")} for _, ops in rows]
    for (r, _), c in zip(rows, count):
        assert r["ok"] and (r["spill_bytes"] == 0 or r["known_spill"]), r  # aot.KNOWN_SPILLS
        assert c["F2FP.BF16"] > 0, (r["kernel"], c)
    assert rows[0][0]["registers"] <= 64 and rows[1][0]["registers"] <= 64  # 32 warps
    for c in (count[1], count[3]):  # 16 elements a thread, and z
        assert c["FRND"] >= 16 and c["FCHK"] <= 3 and c["MUFU.RCP"] <= 4, c
