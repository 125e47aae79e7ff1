"""The profile's step time: the roofline bound max(compute, memory), the weights read by the
forward and the backward counted, and the no-overlap sum beside it."""

import pytest

import fastft
from fastft.profile.devices import DEVICES

from .test_profile import small_config


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_bound_is_the_slower_of_compute_and_bytes_with_the_weights_read(method, checkpointing):
    p = fastft.profile.profile(small_config(), method, batch_size=2, seq_len=64, device="h100",
                               gradient_checkpointing=checkpointing)
    dev = DEVICES["h100"]
    st = p.static
    reads = (3 if checkpointing else 2) * st["parameters"]  # forward, backward (recompute)
    moved = reads + 2 * st["optimizer"] + 4 * st["gradients"] + 3 * p.activations_saved
    assert p.bytes_moved == moved
    compute, memory = p.flops / dev.flops, moved / dev.bandwidth
    assert p.step_seconds == pytest.approx(max(compute, memory), rel=1e-12)
    assert p.step_seconds_no_overlap == pytest.approx(compute + memory, rel=1e-12)
    assert p.tokens_per_s == pytest.approx(2 * 64 / p.step_seconds, rel=1e-12)
    text = fastft.profile.table([p])
    assert "roofline bound" in text and "no overlap" in text
