"""LIFT's mask selection against a direct float64 SVD written here (METHODS.md §3).

Per matrix W (m x n): W_r = U_r S_r V_r^T, the rank-``filter_rank`` truncation of
torch.linalg.svd(W); the mask is the k = min((m + n) lora_rank, m n) entries of
largest |W_r| (smallest with ``largest=False``). fastft must pick exactly those
(the exact path) or nearly those (randomized SVD with ``fast_svd``).
"""

import pytest
import torch

import fastft
from fastft.methods.lift import principal_mask

from ..tiny_models import tiny


def direct(w, filter_rank, lora_rank, largest=True):
    """(flat indices of the chosen entries, relative gap at the selection boundary)."""
    m, n = w.shape
    k = min((m + n) * lora_rank, m * n)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    a = ((u[:, :filter_rank] * s[:filter_rank]) @ vh[:filter_rank]).abs().flatten()
    order = torch.sort(a, descending=largest).values
    gap = float("inf") if k == m * n else (order[k - 1] - order[k]).abs().item() / a.max().item()
    return torch.topk(a, k, largest=largest).indices.sort().values, gap


def chosen(mask):
    return mask.flatten().nonzero().squeeze(1)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("shape,lora_rank,filter_rank", [
    ((33, 20), 2, 4), ((16, 48), 1, 7), ((40, 40), 3, 1), ((12, 9), 1, 9), ((10, 6), 4, 3)])
def test_exact_mask_is_the_top_k_of_the_direct_svd(shape, lora_rank, filter_rank, largest):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    want, gap = direct(w, filter_rank, lora_rank, largest)
    assert gap > 1e-6  # no near-tie at the boundary: fp32 and fp64 must agree on the set
    got = principal_mask(w, lora_rank, filter_rank, largest)
    assert got.shape == w.shape and got.dtype == torch.bool
    assert torch.equal(chosen(got), want)


def test_budget_saturates_at_the_whole_matrix():
    w = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    assert (10 + 6) * 4 > 60
    assert principal_mask(w, 4, 3).all() and principal_mask(w, 4, 3, largest=False).all()


def test_largest_and_smallest_are_opposite_ends():
    w = torch.randn(30, 22, generator=torch.Generator().manual_seed(4))
    big, small = principal_mask(w, 1, 3, True), principal_mask(w, 1, 3, False)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    a = ((u[:, :3] * s[:3]) @ vh[:3]).abs()
    assert not (big & small).any()
    assert a[big].min() > a[small].max()


def test_method_and_optimizer_pick_the_direct_svd_entries_of_every_target():
    """Through fastft.LIFT and its SparseAdamW: the trained indices of each tiny-model weight."""
    model = tiny("llama")
    method = fastft.LIFT(lora_rank=1, filter_rank=3)
    fastft.prepare(model, method)
    opt = method.make_optimizer(model, lr=1e-3)
    assert len(opt.params) == 14
    for i, p in enumerate(opt.params):
        want, gap = direct(p.detach(), 3, 1)
        assert gap > 1e-6, i  # no near-tie at the boundary
        assert torch.equal(opt.indices(i).long().sort().values, want), i


def decaying(m, n, seed, decay=0.75):
    """A matrix whose singular values fall geometrically (as trained weights' roughly do)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    s = decay ** torch.arange(min(m, n), dtype=torch.float32)
    return (u * s) @ v.t()


@pytest.mark.parametrize("largest", [True, False])
def test_fast_randomized_svd_overlaps_the_direct_one(largest):
    # On a flat (Gaussian) spectrum the randomized SVD (q = 2 x rank, torch's 2 power
    # iterations) keeps only ~77% (largest) / ~20% (smallest) of the exact entries at these
    # sizes; with geometric decay 0.88 it keeps 100% / ~99%.
    w = decaying(96, 64, seed=5, decay=0.88)
    want, _ = direct(w, 8, 2, largest)
    got = chosen(principal_mask(w, 2, 8, largest, fast_svd=True))
    assert got.numel() == want.numel() == (96 + 64) * 2
    overlap = len(set(got.tolist()) & set(want.tolist())) / want.numel()
    assert overlap >= 0.95, overlap
