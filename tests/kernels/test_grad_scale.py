"""kernels/grad_scale.py against torch's own multiply."""

import pytest
import torch
from fastft.kernels import grad_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g", [1.0, 3.0, 0.1, 2.0**16, 0.0])
def test_in_place_scale_matches_torch_rounded_once(dtype, g):
    n = 2 * grad_scale.BLOCK + 37  # three programs, the last one partial
    t = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    gt = torch.tensor([g], dtype=torch.float32)
    want = (t.float() * gt).to(dtype)  # fp32 product, one rounding
    out = grad_scale.scale_(t, gt)
    assert out is t
    assert torch.equal(t, want)


def test_one_leaves_every_entry_as_it_was_nan_and_signed_zero_included():
    t = torch.tensor([float("nan"), -0.0, 1e-40, -3.5, float("inf")] * 1000)
    before = t.clone()
    grad_scale.scale_(t, torch.ones(1))
    assert torch.equal(t.view(torch.int32), before.view(torch.int32))  # bit for bit


def test_a_strided_gradient_is_refused():
    with pytest.raises(ValueError, match="contiguous"):
        grad_scale.scale_(torch.zeros(8, 8).t(), torch.ones(1))
