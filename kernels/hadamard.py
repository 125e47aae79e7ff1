"""The fast Walsh-Hadamard transform over the last dim: y = scale (H_K kron H_P) x.

A row of n = K P elements is K segments of P = 2^m; H_P is the Sylvester
Hadamard matrix (entries +-1, unnormalised) and H_K a K x K factor given as an
fp32 matrix (+-1 for Hadamard orders, sqrt(K) times an orthogonal matrix for
the random fallback; K = 1 when n is a power of two). ``transpose`` uses H_K^T
(H_P is symmetric). ``scale`` is usually 1 / sqrt(n).

``hadamard_kernel`` is persistent: a few programs per SM (``programs``), each
looping over tiles of ROWS rows with a stride, its loads one step ahead of its
math (the next tile, or the next segment, is loaded before the current one is
transformed and stored), so that the load latency overlaps the transform; a
tile of 32 fp32 a thread (P = 32768) is loaded as it is used, a second one
would not fit in the registers. A tile is one of:

- a whole-row tile [KP ROWS, P] in registers (``DOT``): row r's segment k in
  tile row k ROWS + r. H_K (zero-padded to KP = 16 or 32) by one ``tl.dot`` on
  the tile seen as [KP, ROWS P], in exact fp32 (input_precision "ieee"), then
  log2(P) butterfly stages per tile row: one read and one write of the row.
  K = 1 is the same tile with KP = 1 and no dot (ROWS > 1 packs short rows).
- segments, for larger K or P (``DOT`` off): output segment ko is
  ``fwht(sum_ki H_K[ko, ki] x[ki])``, K axpys over segments read from memory
  (the row stays in L1/L2 across the K passes, so DRAM sees one read), then
  one transform of P elements in registers.

The transform is log2(P) constant-geometry stages, each (x[2i], x[2i+1]) ->
(x[i], x[i + P/2]) = (a + b, a - b), written as reshape / split / join /
permute: Triton's linear layouts turn most of these into register renames, so
a P = 8192 row does 13 stages with about 3 exchanges through shared memory.
Every P = 2^m up to 32768 runs in one program (at 32768: 32 warps, at most 64
registers, 128 KiB of shared memory, within sm_80's and sm_90's limits); a
larger P is left to the op's torch path.

fp32 math; x and y in fp32, fp16 or bf16 (y rounded to nearest even once).
kernels/fake_quant.py reuses the tiles, segments and ``programs``;
csrc/hadamard.cpp and csrc/hadamard.cu compute the same.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .sparse_adam import _round_to

MAX_P = 32768
TILE = 2048  # elements per program for short rows
DOT_MAX_K = 32  # K factors up to this order are applied by tl.dot on a whole-row tile
DOT_TILE = 16384  # the largest whole-row tile [KP ROWS, P] (fp32 elements)
INTERPRET_PROGRAMS = 3  # the grid off a GPU: each program loops over several tiles
# The largest tile (fp32 elements) loaded one step ahead: at ~16 fp32 a thread the next tile
# fits beside the current one in 64 registers; at 32768 (32 a thread) it would spill.
PREFETCH_MAX = tl.constexpr(16384)


class Config(NamedTuple):
    """How rows of K x P are tiled: ``dot`` (whole-row tiles with tl.dot, K padded to ``kp``)
    or not (segments; ``kp`` 1), ``rows`` per tile, ``warps`` per program."""

    dot: bool
    kp: int
    rows: int
    warps: int


def dot_fits(K: int, P: int) -> bool:
    """Whether rows of K x P take whole-row tiles with H_K by tl.dot: 1 < K <= 32 and the
    padded row (KP x P) within DOT_TILE fp32 (Llama-3-8B's 14336 = 28 x 512: [32, 512])."""
    return 1 < K <= DOT_MAX_K and padded(K) * P <= DOT_TILE


def padded(K: int) -> int:
    """K padded to a power of two of at least 16 (tl.dot's smallest M and K)."""
    return max(16, triton.next_power_of_2(K))


def config(K: int, P: int, dot: bool | None = None) -> Config:
    """The tiling of rows of K x P (``dot`` None: by size, ``dot_fits``): segments ~16 fp32 per
    thread, at most 32 warps; whole-row tiles of up to DOT_TILE fp32 (short rows packed) on 32
    warps."""
    if dot is None:
        dot = dot_fits(K, P)
    if dot:  # 32 warps: fewer per tile leave each thread more of the FMA dot, up to 255 registers
        kp = padded(K)
        return Config(True, kp, max(1, DOT_TILE // (kp * P)), 32)
    rows = max(1, TILE // P)
    return Config(False, 1, rows, min(32, max(1, rows * P // 512)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs(n_tiles: int, warps: int, device: torch.device) -> int:
    """The persistent grid: on a GPU as many programs as fit 32 warps per SM (one per SM at 32
    warps), never more than the tiles; off a GPU (the interpreter) a few, so that programs
    loop over several tiles there too. No host sync (the SM count is cached)."""
    if device.type != "cuda":
        return max(1, min(n_tiles, INTERPRET_PROGRAMS))
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(n_tiles, _sm_count(index) * max(1, 32 // warps)))


@triton.jit
def fwht(x, ROWS: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform (Sylvester order) of each row of x [ROWS, P]."""
    for _ in tl.static_range(LOG2P):
        a, b = tl.split(tl.reshape(x, [ROWS, P // 2, 2]))
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 2, 1]), [ROWS, P])
    return x


# ---- whole-row tiles [KP ROWS, P] ----------------------------------------------------------

@triton.jit
def tile_offsets(row0, n_rows, stride, K, KP: tl.constexpr, ROWS: tl.constexpr,
                 P: tl.constexpr):
    """(offsets, mask) [KP ROWS, P] of the tile of rows row0 .. row0 + ROWS - 1: tile row
    k ROWS + r is segment k of row row0 + r; masked past n_rows and for k >= K."""
    i = tl.arange(0, KP * ROWS)
    row = row0 + i % ROWS
    offs = (row * stride + (i // ROWS) * P)[:, None] + tl.arange(0, P)[None, :]
    return offs, ((i // ROWS < K) & (row < n_rows))[:, None]


@triton.jit
def load_tile(x_ptr, row0, n_rows, stride, K, KP: tl.constexpr, ROWS: tl.constexpr,
              P: tl.constexpr):
    """The tile of rows row0 .. in x's dtype (0 where masked): a prefetched tile waits in it,
    half the registers of fp32 for bf16 and fp16."""
    offs, mask = tile_offsets(row0, n_rows, stride, K, KP, ROWS, P)
    return tl.load(x_ptr + offs, mask=mask, other=0.0)


@triton.jit
def store_tile(y_ptr, y, row0, n_rows, stride, K, KP: tl.constexpr, ROWS: tl.constexpr,
               P: tl.constexpr):
    offs, mask = tile_offsets(row0, n_rows, stride, K, KP, ROWS, P)
    tl.store(y_ptr + offs, _round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def factor_tile(h_ptr, K, TRANSPOSE: tl.constexpr, KP: tl.constexpr):
    """H_K (H_K^T) [KP, KP] in fp32, zero past K: the zero rows give zero output rows, the zero
    columns ignore the tile's padding."""
    i = tl.arange(0, KP)[:, None]
    j = tl.arange(0, KP)[None, :]
    if TRANSPOSE:
        offs = j * K + i
    else:
        offs = i * K + j
    return tl.load(h_ptr + offs, mask=(i < K) & (j < K), other=0.0)


@triton.jit
def transform_tile(x, hk, scale, DOT: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr,
                   P: tl.constexpr, LOG2P: tl.constexpr):
    """scale (H_K kron H_P) of each row of a tile [KP ROWS, P]: H_K over the segments,
    [KP, KP] @ [KP, ROWS P], by one fp32 tl.dot (exact fp32: "ieee", not tf32), then the
    butterflies over each segment (this order leaves ptxas room: no spills at 64 registers)."""
    y = x
    if DOT:
        y = tl.reshape(tl.dot(hk, tl.reshape(x, [KP, ROWS * P]), input_precision="ieee"),
                       [KP * ROWS, P])
    return fwht(y, KP * ROWS, P, LOG2P) * scale


# ---- segments [ROWS, P] --------------------------------------------------------------------

@triton.jit
def segment_offsets(rows, n_rows, stride, seg, P: tl.constexpr):
    """(offsets, mask) [ROWS, P] of segment ``seg`` of the rows ``rows`` (int64 [ROWS])."""
    cols = tl.arange(0, P)
    offs = rows[:, None] * stride + seg * P + cols[None, :]
    return offs, (rows < n_rows)[:, None] & (cols < P)[None, :]


@triton.jit
def load_segment(x_ptr, rows, n_rows, stride, seg, P: tl.constexpr):
    """Segment ``seg`` of the rows in x's dtype (as ``load_tile``)."""
    offs, mask = segment_offsets(rows, n_rows, stride, seg, P)
    return tl.load(x_ptr + offs, mask=mask, other=0.0)


@triton.jit
def store_segment(y_ptr, y, rows, n_rows, stride, seg, P: tl.constexpr):
    offs, mask = segment_offsets(rows, n_rows, stride, seg, P)
    tl.store(y_ptr + offs, _round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mix(xn, x_ptr, h_ptr, rows, n_rows, stride, ko, K, jump, TRANSPOSE: tl.constexpr,
        ROWS: tl.constexpr, P: tl.constexpr):
    """(sum_ki H_K[ko, ki] x[ki] over the K segments of the rows ``rows``, fp32 [ROWS, P],
    the segment held for the next call). Segments up to PREFETCH_MAX are loaded one ahead of
    their axpy: ``xn`` is segment 0 on entry, and the one held at the end is segment 0 of the
    rows ``rows + jump`` (jump 0, or the next tile's rows after the last output segment);
    larger ones are loaded as used (``xn`` unused)."""
    acc = tl.zeros([ROWS, P], tl.float32)
    if ROWS * P <= PREFETCH_MAX:
        for ki in range(K - 1):
            x = xn.to(tl.float32)
            xn = load_segment(x_ptr, rows, n_rows, stride, ki + 1, P)
            acc += _h(h_ptr, ko, ki, K, TRANSPOSE) * x
        x = xn.to(tl.float32)
        xn = load_segment(x_ptr, rows + jump, n_rows, stride, 0, P)
        acc += _h(h_ptr, ko, K - 1, K, TRANSPOSE) * x
    else:
        for ki in range(K):
            acc += _h(h_ptr, ko, ki, K, TRANSPOSE) * load_segment(
                x_ptr, rows, n_rows, stride, ki, P).to(tl.float32)
    return acc, xn


@triton.jit
def _h(h_ptr, ko, ki, K, TRANSPOSE: tl.constexpr):
    """H_K[ko, ki] (H_K^T's with TRANSPOSE)."""
    if TRANSPOSE:
        return tl.load(h_ptr + ki * K + ko)
    else:
        return tl.load(h_ptr + ko * K + ki)


@triton.jit
def first_tile(x_ptr, n_rows, stride, K, KP: tl.constexpr, ROWS: tl.constexpr,
               P: tl.constexpr):
    """What ``fetch_tile`` holds before this program's first tile: that tile, when tiles are
    loaded ahead (up to PREFETCH_MAX fp32), else nothing."""
    if KP * ROWS * P <= PREFETCH_MAX:
        return load_tile(x_ptr, tl.program_id(0).to(tl.int64) * ROWS, n_rows, stride, K, KP,
                         ROWS, P)
    else:
        return 0.0


@triton.jit
def fetch_tile(xn, x_ptr, row0, n_rows, stride, K, KP: tl.constexpr, ROWS: tl.constexpr,
               P: tl.constexpr):
    """(the tile of rows row0 .. in fp32, what to hold for the next call). Up to PREFETCH_MAX
    fp32, ``xn`` is that tile, loaded one step before, and this call loads the program's next
    one (rows row0 + ROWS * programs ..) before the caller transforms the current: the next
    tile's loads overlap this one's math. Larger tiles (32 fp32 a thread) are loaded here: a
    second one would not fit in the registers."""
    if KP * ROWS * P <= PREFETCH_MAX:
        hop = tl.num_programs(0) * ROWS
        return xn.to(tl.float32), load_tile(x_ptr, row0 + hop, n_rows, stride, K, KP, ROWS, P)
    else:
        return load_tile(x_ptr, row0, n_rows, stride, K, KP, ROWS, P).to(tl.float32), xn


# ---- the kernel ----------------------------------------------------------------------------

@triton.jit
def _tiles(x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, K, scale, DOT: tl.constexpr,
           TRANSPOSE: tl.constexpr, KP: tl.constexpr, ROWS: tl.constexpr, P: tl.constexpr,
           LOG2P: tl.constexpr):
    """This program's whole-row tiles, each loaded while the one before is transformed."""
    hk = factor_tile(h_ptr, K, TRANSPOSE, KP) if DOT else 0.0
    xn = first_tile(x_ptr, n_rows, stride_x, K, KP, ROWS, P)
    for t in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        row0 = tl.cast(t, tl.int64) * ROWS
        x, xn = fetch_tile(xn, x_ptr, row0, n_rows, stride_x, K, KP, ROWS, P)
        y = transform_tile(x, hk, scale, DOT, KP, ROWS, P, LOG2P)
        store_tile(y_ptr, y, row0, n_rows, stride_y, K, KP, ROWS, P)


@triton.jit
def first_segment(x_ptr, n_rows, stride, ROWS: tl.constexpr, P: tl.constexpr):
    """What ``mix`` holds before this program's first tile (as ``first_tile``)."""
    if ROWS * P <= PREFETCH_MAX:
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        return load_segment(x_ptr, rows, n_rows, stride, 0, P)
    else:
        return 0.0


@triton.jit
def _segments(x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, K, scale,
              TRANSPOSE: tl.constexpr, ROWS: tl.constexpr, P: tl.constexpr,
              LOG2P: tl.constexpr):
    """This program's tiles by segments, the loads one segment ahead across tiles."""
    hop = tl.num_programs(0) * ROWS
    xn = first_segment(x_ptr, n_rows, stride_x, ROWS, P)
    for t in range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = tl.cast(t, tl.int64) * ROWS + tl.arange(0, ROWS)
        for ko in range(K):
            acc, xn = mix(xn, x_ptr, h_ptr, rows, n_rows, stride_x, ko, K,
                          tl.where(ko == K - 1, hop, 0), TRANSPOSE, ROWS, P)
            store_segment(y_ptr, fwht(acc, ROWS, P, LOG2P) * scale, rows, n_rows, stride_y, ko,
                          P)


@triton.jit
def hadamard_kernel(
    x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, K, scale,
    HAS_K: tl.constexpr, TRANSPOSE: tl.constexpr, DOT: tl.constexpr, KP: tl.constexpr,
    ROWS: tl.constexpr, P: tl.constexpr, LOG2P: tl.constexpr,
):
    if HAS_K:
        if DOT:
            _tiles(x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, K, scale, True, TRANSPOSE,
                   KP, ROWS, P, LOG2P)
        else:
            _segments(x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, K, scale, TRANSPOSE,
                      ROWS, P, LOG2P)
    else:
        _tiles(x_ptr, h_ptr, y_ptr, n_rows, stride_x, stride_y, 1, scale, False, TRANSPOSE,
               1, ROWS, P, LOG2P)


def split(n: int, kfactor: torch.Tensor | None) -> tuple[int, int]:
    """(K, P) of rows of n with this K factor; P must be a power of two <= MAX_P."""
    K = 1 if kfactor is None else kfactor.shape[0]
    P = n // K
    if K * P != n or P & (P - 1) or not 1 <= P <= MAX_P:
        raise ValueError(f"hadamard kernel: n={n} is not K={K} times a power of two <= {MAX_P}")
    if kfactor is not None and tuple(kfactor.shape) != (K, K):
        raise ValueError(
            f"hadamard kernel: the K factor must be square; got {tuple(kfactor.shape)}")
    return K, P


def kfactor_arg(kfactor: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The K factor as a contiguous fp32 tensor on x's device (x itself when there is none)."""
    if kfactor is None:
        return x, False
    return kfactor.to(device=x.device, dtype=torch.float32).contiguous(), True


def launch_args(R: int, K: int, P: int, has_k: bool, device: torch.device,
                dot: bool | None = None) -> tuple[tuple[int], dict]:
    """(grid, the tiling constexprs and num_warps) of a launch over R rows of K x P."""
    cfg = config(K, P, dot) if has_k else config(1, P)
    grid = (programs(triton.cdiv(R, cfg.rows), cfg.warps, device),)
    return grid, dict(DOT=cfg.dot, KP=cfg.kp, ROWS=cfg.rows, P=P, LOG2P=P.bit_length() - 1,
                      num_warps=cfg.warps)


def hadamard(x2d: torch.Tensor, kfactor: torch.Tensor | None, scale: float,
             transpose: bool = False, *, dot: bool | None = None) -> torch.Tensor:
    """y = scale (H_K kron H_P) x2d over the last dim (H_K^T when ``transpose``); x2d [R, n]
    with unit column stride, fp32/fp16/bf16; y has x2d's dtype. ``kfactor``: [K, K] or None.
    ``dot``: whole-row tiles with tl.dot (True), segments (False), by size (None)."""
    R, n = x2d.shape
    K, P = split(n, kfactor)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    y = torch.empty((R, n), device=x2d.device, dtype=x2d.dtype)
    if R == 0 or n == 0:
        return y
    h, has_k = kfactor_arg(kfactor, x2d)
    grid, meta = launch_args(R, K, P, has_k, x2d.device, dot)
    hadamard_kernel[grid](x2d, h, y, R, x2d.stride(0), y.stride(0), K, float(scale),
                          HAS_K=has_k, TRANSPOSE=bool(transpose), **meta)
    return y


SIZES = tuple(1 << m for m in range(6, 16))  # P = 64 ... 32768: the AOT table
DTYPES = ("bf16", "fp16", "fp32")
DOT_SIZES = ((28, 512), (28, 128), (20, 256), (12, 1024), (12, 8))  # (K, P) of whole-row tiles


def spec(kernel, name: str, dt: str, has_k: bool, K: int, P: int, signature: dict,
         constexprs: dict, label: str = "") -> dict:
    """One AOT spec of the hadamard or rotate_quant kernel for rows of K x P in ``dt``."""
    cfg = config(K, P) if has_k else config(1, P)
    return dict(
        name=name, kernel=kernel, matrix=False,
        signature={"x_ptr": f"*{dt}", "h_ptr": "*fp32" if has_k else f"*{dt}",
                   "y_ptr": f"*{dt}", "n_rows": "i32", "stride_x": "i64", "stride_y": "i64",
                   "K": "i32", **signature},
        constexprs={"HAS_K": has_k, "TRANSPOSE": False, **constexprs, "DOT": cfg.dot,
                    "KP": cfg.kp, "ROWS": cfg.rows, "P": P, "LOG2P": P.bit_length() - 1},
        hints={"x_ptr": 16, "h_ptr": 16, "y_ptr": 16, "stride_x": 16, "stride_y": 16},
        options={"num_warps": cfg.warps},
        config=(f"{f'n={K * P} K={K} ' if cfg.dot else ''}P={P} ROWS={cfg.rows} {dt}"
                f"{' K' if has_k else ''}{' dot' if cfg.dot else ''}{label} warps={cfg.warps}"))


def aot_specs():
    """Every P = 64..32768 in bf16/fp16/fp32 by segments with a K factor (K = 43, the random
    factor) and without (bf16); whole-row tiles with tl.dot for K = 12, 20, 28 in bf16
    (n = 14336 = 28 x 512, Llama-3-8B's MLP, among them) and fp32 at 14336."""
    specs = []
    for P in SIZES:
        for dt in DTYPES:
            for has_k in ((False, True) if dt == "bf16" else (True,)):
                specs.append(spec(hadamard_kernel, "hadamard", dt, has_k, 43, P,
                                  {"scale": "fp32"}, {}))
    for (K, P), dt in [(kp, "bf16") for kp in DOT_SIZES] + [((28, 512), "fp32")]:
        specs.append(spec(hadamard_kernel, "hadamard", dt, True, K, P, {"scale": "fp32"}, {}))
    return specs
