"""The sparse bench suite's byte model, and metrics a case computes joining its row."""

import time

import torch
from torch import nn

from fastft.bench import Case, harness, markdown
from fastft.bench.suites import sparse
from fastft.optim import SparseAdamW


def test_bytes_a_step_must_move_count_32_byte_sectors():
    w = nn.Parameter(torch.zeros(64))  # fp32: 8 entries per 32-byte sector
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[0, 1, 9, 40]] = True  # sectors 0, 1 and 5
    opt = SparseAdamW([w], [mask])
    compact = sparse.step_bytes(opt, True, 4)
    # per entry: int32 index, fp32 m and v read and written, compact fp32 gradient;
    # the weight's 3 sectors read and written
    assert compact == dict(bytes_moved=4 * (4 + 16 + 4) + 2 * 32 * 3,
                           useful_bytes=4 * (4 + 4 + 16 + 2 * 4), entries=4)
    dense = sparse.step_bytes(opt, False, 4)  # the dense gradient's 3 sectors instead
    assert dense["bytes_moved"] == 4 * (4 + 16) + 2 * 32 * 3 + 32 * 3


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
