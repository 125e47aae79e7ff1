"""The sparse bench suite's byte model, and metrics a case computes joining its row."""

import time

import torch
from torch import nn

from fastft.bench import Case, harness, markdown
from fastft.bench.suites import sparse
from fastft.optim import SparseAdamW


def test_bytes_a_step_moves_count_64_byte_segments_and_32_byte_sectors():
    w = nn.Parameter(torch.zeros(64))  # fp32: 16 entries per 64-byte segment, 8 per sector
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[0, 1, 9, 40]] = True  # segments 0 and 2; sectors 0, 1 and 5
    opt = SparseAdamW([w], [mask])
    compact = sparse.step_bytes(opt, True, 4)
    # per entry: int32 index, fp32 m and v read and written, compact fp32 gradient;
    # the weight's 2 segments (3 sectors) read and written
    assert compact == dict(bytes_moved=4 * (4 + 16 + 4) + 2 * 64 * 2,
                           sector_bytes=4 * (4 + 16 + 4) + 2 * 32 * 3,
                           useful_bytes=4 * (4 + 4 + 16 + 2 * 4), entries=4)
    dense = sparse.step_bytes(opt, False, 4)  # the dense gradient's segments instead
    assert dense["bytes_moved"] == 4 * (4 + 16) + 2 * 64 * 2 + 64 * 2
    assert dense["sector_bytes"] == 4 * (4 + 16) + 2 * 32 * 3 + 32 * 3


def test_at_5_percent_density_a_bf16_step_touches_most_segments():
    """1 - 0.95^32 of a bf16 weight's 64-byte segments hold a trained entry (32 entries
    each): the real traffic is most of the weight, four times the entries' own bytes."""
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.zeros(1 << 20, dtype=torch.bfloat16))
    mask = torch.rand(w.shape, generator=gen) < 0.05
    opt = SparseAdamW([w], [mask])
    got = sparse.step_bytes(opt, True, 2)
    k = int(mask.sum())
    weight_bytes = got["bytes_moved"] - k * (4 + 16 + 4)
    expected = 2 * w.nbytes * (1 - 0.95 ** 32)
    assert abs(weight_bytes - expected) < 0.02 * expected  # 32768 segments: sd 0.3%
    assert got["bytes_moved"] > 2.5 * got["useful_bytes"]


def test_metrics_of_a_case_join_its_row_with_the_bandwidth():
    def build():
        fn = lambda: time.sleep(0.01)  # noqa: E731
        fn.metrics = {"bytes_moved": 10**6, "state_bytes": 12}
        return fn

    row = harness.measure(Case("x", "fastft", {"n": 1}, "fp32", build), "cpu", min_seconds=0.0)
    assert row["bytes_moved"] == 10**6 and row["state_bytes"] == 12
    assert abs(row["gbps"] - 1e6 / (row["median_ms"] * 1e-3) / 1e9) < 0.01 * row["gbps"]
    table = markdown([row])
    assert "| bytes_moved | gbps | state_bytes |" in table and "| 1000000 |" in table
