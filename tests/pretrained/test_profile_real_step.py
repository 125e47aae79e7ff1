"""fastft.profile on the real model's config (read from its folder) against a real CPU
step of the real model on real text, measured by fastft.profile.measure as
tests/profile/test_profile.py measures it: FLOPs and the static bytes equal, the peak within
2% of the CPU allocator's."""

import pytest
import torch

import fastft
from fastft.profile import measure
from fastft.profile import step as pstep

METHODS = {"lora": lambda: fastft.LoRA(r=8), "full": lambda: fastft.Full()}


@pytest.mark.pretrained
@pytest.mark.parametrize("method", ["lora", "full"])
def test_predicted_flops_and_peak_equal_a_real_step(smollm2, method):
    ids, _ = smollm2.batch(2, 64, skip=8)
    model = smollm2.fresh().train()
    real = measure.real_step(model, METHODS[method](), {"input_ids": ids,
                                                         "labels": ids.clone()}, max_length=64)
    tr = pstep.trace(pstep.load_config(smollm2.folder), METHODS[method](), batch_size=2,
                     seq_len=64, dtype=torch.float32, kind="cpu")
    assert tr.flops_total == real["flops"]  # 72.57 GFLOP (LoRA), 105.26 GFLOP (full)
    assert tr.static == {k: real[k] for k in ("parameters", "gradients", "optimizer")}
    # LoRA: 747.2 MB predicted, 747.6 MB measured; full: 2265.8 MB both (the tied head's two
    # gradients summed in place by the autograd engine: the trace once counted the sum as a
    # third [49152, 576] fp32 tensor, 2378.7 MB)
    assert abs(tr.peak_bytes - real["peak"]) <= 0.02 * real["peak"], (tr.peak_bytes, real)
    # the weights are 73% of that peak: 2% of the total would pass an activation count 7.5%
    # off (the trace building sdpa's mask, as it once did, is +1.7% of the total here), so
    # the part above the static bytes is held to 2% too (LoRA: 170.1 MB, off by 0.3 MB)
    dynamic = real["peak"] - sum(tr.static.values())
    assert abs(tr.peak_bytes - real["peak"]) <= 0.02 * dynamic, (tr.peak_bytes, real)
