"""fastft.profile against the real step: FLOPs, exact weight/gradient/optimizer bytes, and
the peak within 2% of what the CPU allocator measured (the issue asks 10%)."""

import contextlib
import json
import tempfile
from pathlib import Path

import pytest
import torch
import transformers

import fastft
from fastft.profile import measure
from fastft.profile import step as pstep

EXAMPLE_8B = Path(__file__).resolve().parents[2] / "examples" / "llama-3-8b" / "config.json"


def small_config(vocab_size=512, hidden_size=128, intermediate_size=344, tied=False):
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                   intermediate_size=intermediate_size, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=tied)
    cfg._attn_implementation = "sdpa"
    return cfg


METHODS = {"full": lambda: fastft.Full(), "lora": lambda: fastft.LoRA(r=8),
           "lift": lambda: fastft.LIFT(lora_rank=4, filter_rank=8)}
B, S = 4, 128


def real_step(method_name, dtype=torch.float32):
    """Two real CPU steps as the Trainer takes them, measured by torch's own tools."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(small_config()).to(dtype).train()
    ids = torch.randint(0, 512, (B, S))
    return measure.real_step(model, METHODS[method_name](), {"input_ids": ids,
                                                             "labels": ids.clone()},
                            max_length=S)


def traced(method_name, dtype=torch.float32):
    return pstep.trace(small_config(), METHODS[method_name](), batch_size=B, seq_len=S,
                       dtype=dtype, kind="cpu")


@pytest.mark.parametrize("method", list(METHODS))
def test_flops_and_static_bytes_equal_the_real_step(method):
    real, tr = real_step(method), traced(method)
    assert tr.flops_total == real["flops"]
    assert tr.static == {k: real[k] for k in ("parameters", "gradients", "optimizer")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", list(METHODS))
def test_peak_within_two_percent_of_the_cpu_allocator(method, dtype):
    """The real step's batch is unpadded, so transformers gives sdpa no mask (is_causal, and
    enable_gqa for the grouped K/V heads); the trace must take the same path. It once built
    the mask, whose sdpa repeats K and V per layer: 5.7-8.7% over the real peak here."""
    real, tr = real_step(method, dtype), traced(method, dtype)
    assert abs(tr.peak_bytes - real["peak"]) <= 0.02 * real["peak"], (tr.peak_bytes, real)


def test_the_trace_builds_no_attention_mask_and_leaves_transformers_as_it_was():
    from transformers import masking_utils as mu

    before = (mu.find_packed_sequence_indices, mu._ignore_causal_mask_sdpa)
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa(*args, **kw):
        seen.append(kw.get("attn_mask", args[3] if len(args) > 3 else None))
        return real_sdpa(*args, **kw)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        traced("lora")
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
    assert seen and all(m is None for m in seen)
    assert (mu.find_packed_sequence_indices, mu._ignore_causal_mask_sdpa) == before


def test_llama3_8b_lora_matches_a_hand_count():
    H, I, KV, L, V, r = 4096, 14336, 1024, 32, 128256, 16  # noqa: E741
    base = L * (2 * H * H + 2 * H * KV + 3 * H * I + 2 * H) + 2 * V * H + H
    adapters = L * r * ((H + H) + 2 * (H + KV) + (H + H) + 2 * (H + I) + (I + H))
    tr = pstep.trace(pstep.load_config(EXAMPLE_8B), fastft.LoRA(r=16), batch_size=1,
                     seq_len=256, dtype=torch.bfloat16)
    assert tr.params == base + adapters
    assert tr.trainable == adapters
    rotary = 2 * (H // 32 // 2) * 4  # inv_freq and its original copy: fp32 buffers
    assert tr.static["parameters"] == 2 * base + 4 * adapters + rotary  # fp32 adapters
    assert tr.static["gradients"] == 4 * adapters
    # AdamW: exp_avg and exp_avg_sq fp32 per adapter entry, one step counter per tensor
    n_tensors = 2 * 7 * L
    assert tr.static["optimizer"] == 8 * adapters + 4 * n_tensors


def test_profile_table_json_and_png(tmp_path):
    p = fastft.profile.profile(small_config(), "lora", batch_size=2, seq_len=64, device="a100")
    assert p.flops == p.flops_forward + p.flops_backward > 0
    assert p.fits and p.step_seconds > 0
    text = fastft.profile.table([p])
    assert "peak (MiB)" in text and "lora" in text  # a small model: MiB and GFLOP
    fastft.profile.write_json([p], tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())[0]["method"] == "lora"
    assert fastft.profile.plot([p], tmp_path / "p.png").stat().st_size > 1000


def test_fit_finds_the_largest_batch(tmp_path):
    one = fastft.profile.profile(small_config(), "lora", batch_size=1, seq_len=64,
                                 device="cpu")
    two = fastft.profile.profile(small_config(), "lora", batch_size=2, seq_len=64,
                                 device="cpu")
    budget = one.peak_bytes + 3.5 * (two.peak_bytes - one.peak_bytes)
    what, b, p = fastft.profile.fit(small_config(), "lora", memory=budget, seq_len=64,
                                    device="cpu")
    assert what == "batch_size" and p.peak_bytes <= budget
    above = fastft.profile.profile(small_config(), "lora", batch_size=b + 1, seq_len=64,
                                   device="cpu")
    assert above.peak_bytes > budget


def test_grouped_query_attention_counts_as_its_heads_broadcast():
    """Fewer key/value heads than query heads (Llama 3): counted as the kernel computes it,
    with K and V broadcast to the query's heads. torch 2.11's own formulas reject these
    shapes, and a count that raises stops the whole step's FLOPs."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from fastft.profile import tracker

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 16, 32, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 16, 32, generator=g, requires_grad=True) for _ in range(2))
    args = tracker._kv_heads_as_query_heads((q, k, v, 0.0, True), 0)
    assert args[0] is q and args[1] == args[2] == torch.Size((2, 8, 16, 32)) and args[3:] == (0.0, True)
    assert tracker._kv_heads_as_query_heads((q, q, q), 0)[1] is q  # equal heads: unchanged
    with FlopCounterMode(display=False) as fc:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    fwd = sdpa_flop_count((2, 8, 16, 32), (2, 8, 16, 32), (2, 8, 16, 32))
    assert fwd == 2 * (2 * 8 * 16 * 16 * 32) * 2
    assert fc.get_total_flops() == fwd + 2.5 * fwd  # backward: 5 products of the forward's 2


def test_a_freed_output_does_not_lend_its_module_to_the_tensor_that_reuses_its_id():
    """The FLOP recorder remembers which module made each output, by id. An output freed
    during the forward gives its id to a later tensor: that tensor must not be taken for the
    freed one's (its backward FLOPs would be charged to the wrong module, and GreenTrainer's
    selection changed from run to run)."""
    import weakref

    from fastft.profile.tracker import FlopRecorder

    rec = FlopRecorder.__new__(FlopRecorder)
    rec._made_by = {}
    live = torch.empty(3)
    rec._made_by[id(live)] = ("model.layers.1.mlp", weakref.ref(live))
    assert rec._maker(live) == "model.layers.1.mlp"
    t = torch.empty(3)
    rec._made_by[id(t)] = ("model.layers.0.mlp", weakref.ref(t))
    freed = id(t)
    del t
    for _ in range(1000):
        u = torch.empty(3)
        if id(u) == freed:
            break
    else:
        pytest.skip("no tensor reused the freed id")
    assert rec._maker(u) is None


OTHER_CONFIGS = {
    "mistral-sliding-window": lambda: transformers.MistralConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
        tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2),
    # no sdpa in transformers (its attention softcap): eager, as a real run gets it
    "gemma2-eager": lambda: transformers.Gemma2Config(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=64),
}


@pytest.mark.parametrize("name", list(OTHER_CONFIGS))
def test_other_architectures_match_the_real_step(name):
    """A sliding window longer than the batch's positions (Mistral), a tied head (Qwen2), an
    architecture without sdpa (Gemma-2: the trace once asked for sdpa and failed)."""
    cfg = OTHER_CONFIGS[name]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).train()
    ids = torch.randint(4, 1000, (2, 128), generator=torch.Generator().manual_seed(0))
    real = measure.real_step(model, fastft.Full(), {"input_ids": ids, "labels": ids.clone()},
                             max_length=128)
    tr = pstep.trace(cfg, fastft.Full(), batch_size=2, seq_len=128, dtype=torch.float32,
                     kind="cpu")
    assert tr.flops_total == real["flops"]
    assert abs(tr.peak_bytes - real["peak"]) <= 0.02 * real["peak"], (tr.peak_bytes, real)


def tied_config():
    return small_config(vocab_size=4096, hidden_size=64, intermediate_size=172, tied=True)


def test_tied_head_full_peak_equals_the_real_step():
    """The tied weight's two gradients (the fused loss head's, the embedding's) meet in the
    autograd engine, which adds the second into the first in place; under a dispatch mode it
    adds them out of place. At 1 x 16 tokens the peak is that sum: the trace once counted a
    third [4096, 64] fp32 tensor there (7.75 vs 6.70 MB, +15.6%; SmolLM2-135M: +5.0%)."""
    cfg = tied_config()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    real = measure.real_step(model, fastft.Full(), {"input_ids": ids, "labels": ids.clone()},
                             max_length=16)
    tr = pstep.trace(cfg, fastft.Full(), batch_size=1, seq_len=16, dtype=torch.float32,
                     kind="cpu")
    assert tr.static == {k: real[k] for k in ("parameters", "gradients", "optimizer")}
    head = 4096 * 64 * 4
    assert abs(tr.peak_bytes - real["peak"]) <= 0.02 * head, (tr.peak_bytes, real)


def _backward_peak(keep: bool, fake: bool) -> int:
    """The peak bytes allocated by the backward of a weight used twice (an embedding, a
    product), the product's gradient arriving first; ``keep``: a hook holds that gradient,
    so the engine cannot add into it. Fake: as the MemoryTracker counts it; else as the CPU
    allocator does."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from fastft.profile.tracker import MemoryTracker

    held = []
    with FakeTensorMode() if fake else contextlib.nullcontext():
        w = torch.nn.Parameter(torch.zeros(1024, 256))
        rows = torch.nn.functional.embedding(torch.arange(8), w).sum()
        twice = w + 0  # its backward passes the gradient on as it is
        if keep:
            twice.register_hook(held.append)
        loss = rows + (twice * 2).sum()
        if fake:
            mem = MemoryTracker("cpu")
            mem.phase = "backward"
            with mem:
                loss.backward()
            mem.detach()
            return mem.peak_bytes
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        events = [e["args"] for e in json.loads(Path(f"{d}/trace.json").read_text())[
            "traceEvents"] if e.get("name") == "[memory]"]
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


@pytest.mark.parametrize("keep", [False, True], ids=["summed-in-place", "first-held"])
def test_the_engines_gradient_sum_counts_as_on_the_cpu(keep):
    """Two gradients of one weight: added in place (two [1024, 256] tensors at the peak), or,
    while a hook holds the first, into a new tensor (three)."""
    unit = 1024 * 256 * 4
    real, traced_ = _backward_peak(keep, fake=False), _backward_peak(keep, fake=True)
    assert round(real / unit) == (3 if keep else 2)
    assert abs(traced_ - real) <= 0.02 * unit, (traced_, real)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_loss_heads_outputs_count_beside_its_workspace(tied):
    """With more tokens than the hidden size the peak is inside the fused loss's forward:
    its weight-gradient buffer (an output) beside its logits chunk (workspace). The trace
    once released the workspace before counting the outputs: one [4096, 64] fp32 tensor
    under the real step (7.78 vs 8.84 MB at 2 x 64 tokens)."""
    cfg = tied_config()
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    real = measure.real_step(model, fastft.Full(), {"input_ids": ids, "labels": ids.clone()},
                             max_length=64)
    tr = pstep.trace(cfg, fastft.Full(), batch_size=2, seq_len=64, dtype=torch.float32,
                     kind="cpu")
    head = 4096 * 64 * 4
    assert abs(tr.peak_bytes - real["peak"]) <= 0.02 * head, (tr.peak_bytes, real["peak"])
