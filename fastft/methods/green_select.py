"""GreenTrainer's selection: which tensors train under a backward-FLOPs budget (METHODS.md §5).

Tensors are indexed in input-to-output order. Selecting a set m costs, in the
backward pass,

    sum_k [max_{j<=k} m_j] t_dy_k + m_k t_dw_k

(activation gradients must reach the deepest selected tensor). ``select``
maximises the total importance of the selected tensors under an integer budget
by dynamic programming from the output towards the input: for each choice of the
deepest selected tensor d, the activation-gradient cost of everything from d to
the output is fixed, and the tensors above d fill the rest of the budget as a
0/1 knapsack over their weight-gradient costs.
"""

from __future__ import annotations

import math

from ..errors import check


def quantize(t_dw: list[float], t_dy: list[float], budget: float, units: int = 1000
             ) -> tuple[list[int], list[int], int]:
    """Costs as integers summing to about ``units`` (rounded up, so that a selection within
    the integer budget is within the real one), and the budget rounded down."""
    total = sum(t_dw) + sum(t_dy)
    check(total > 0, "GreenTrainer: the tensors' backward costs are all zero")
    scale = units / total
    up = lambda v: math.ceil(v * scale - 1e-9)  # noqa: E731
    return [up(v) for v in t_dw], [up(v) for v in t_dy], math.floor(budget * scale + 1e-9)


def cost(mask: list[bool], t_dw: list[float], t_dy: list[float]) -> float:
    """The backward cost of a selection (the formula above)."""
    total, reached = 0.0, False
    for m, dw, dy in zip(mask, t_dw, t_dy):
        reached = reached or m
        total += (dy if reached else 0) + (dw if m else 0)
    return total


def select(importance: list[float], t_dw: list[int], t_dy: list[int], budget: int
           ) -> list[bool]:
    """The selection of largest total importance whose cost is at most ``budget`` (integer
    costs). At least one tensor is selected when any fits; none when none fits."""
    n = len(importance)
    check(len(t_dw) == n and len(t_dy) == n, "select: one cost of each kind per tensor")
    W = max(0, int(budget))
    NEG = float("-inf")
    best = [0.0] * (W + 1)  # best[c]: importance of tensors above d with dw cost <= c
    take: list[list[bool]] = [None] * n  # take[k][c]: tensor k in the knapsack at capacity c
    tail_dy = [0] * (n + 1)
    for k in range(n - 1, -1, -1):
        tail_dy[k] = tail_dy[k + 1] + t_dy[k]
    answer, deepest, left = NEG, -1, 0
    for d in range(n - 1, -1, -1):
        cap = W - tail_dy[d] - t_dw[d]  # what the tensors above d may spend on dw
        if cap >= 0 and importance[d] + best[cap] > answer:
            answer, deepest, left = importance[d] + best[cap], d, cap
        row = [False] * (W + 1)  # tensor d joins the knapsack for smaller deepest choices
        w, v = t_dw[d], importance[d]
        if v > 0:
            for c in range(W, w - 1, -1):
                if best[c - w] + v > best[c]:
                    best[c] = best[c - w] + v
                    row[c] = True
        take[d] = row
    mask = [False] * n
    if deepest < 0:
        return mask
    mask[deepest] = True
    c = left
    # the knapsack over tensors deepest+1 .. n-1 was built from n-1 down to deepest+1;
    # unwind it from the last tensor added (deepest+1) back to the first (n-1)
    for k in range(deepest + 1, n):
        if take[k][c]:
            mask[k] = True
            c -= t_dw[k]
    return mask


def backward_budget(rho: float, t_fp: float, t_bp: float) -> float:
    """rho_bp = rho (1 + t_fp / t_bp) - t_fp / t_bp, at least 0.05: the share of the full
    backward FLOPs kept when the step keeps ``rho`` of full fine-tuning's FLOPs."""
    ratio = t_fp / t_bp
    return max(0.05, rho * (1 + ratio) - ratio)
