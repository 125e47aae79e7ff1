"""Optimizer state at 5% density: at most 0.1x dense AdamW's, indices included."""

import torch

from fastft.bench.suites import sparse as suite
from fastft.methods.targets import linear_modules
from fastft.optim import SparseAdamW, random_mask

from ..tiny_models import batch, tiny


def test_real_tiny_model_state_is_under_a_tenth_of_dense_adamw():
    model = tiny("llama")
    weights = [m.weight for m in linear_modules(model).values()]
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    dense = torch.optim.AdamW(weights, lr=1e-3)
    dense.step()
    dense_bytes = sum(t.nbytes for st in dense.state.values() for t in st.values())
    gen = torch.Generator().manual_seed(0)
    sparse = SparseAdamW(weights, [random_mask(w.shape, 0.05, generator=gen) for w in weights])
    sparse.step()
    assert sparse.state_bytes() <= 0.1 * dense_bytes
    entries = sum(int(sparse.indices(i).numel()) for i in range(len(weights)))
    assert sparse.state_bytes() == 12 * entries  # int32 index + fp32 m + fp32 v


def test_llama3_8b_on_the_meta_device():
    table = suite.state_table("llama-3-8b", "fp32")
    assert table["dense_adamw"] == 8 * 6_979_321_856 + 4 * 224  # m, v fp32 + a step per weight
    assert table["sparse_adamw_5pct"] <= 0.1 * table["dense_adamw"]
    assert table["lift"] < 0.1 * table["dense_adamw"]
    assert 0.45 < table["hft_stage0"] / table["dense_adamw"] < 0.55
