"""GreenTrainer's measured costs on tied and biased models against the real step: the
estimated backward FLOPs equal what torch's FlopCounterMode counts in loss.backward() of the
plain transformers model (its own loss, no fastft op), and each tensor carries what METHODS.md
§5 gives it."""

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import fastft
import fastft.profile.tracker  # noqa: F401 (the CPU attention's FLOP formulas)
from fastft.methods import green_select
from fastft.profile.green_costs import measure_costs

B, S, V, D, F = 2, 16, 97, 32, 64
T = B * S


def tiny(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    if kind == "llama-tied":
        cfg, cls = transformers.LlamaConfig(tie_word_embeddings=True, **common), \
            transformers.LlamaForCausalLM
    elif kind == "qwen2-biased":
        cfg, cls = transformers.Qwen2Config(tie_word_embeddings=False, **common), \
            transformers.Qwen2ForCausalLM
    elif kind == "qwen2-tied-biased":  # Qwen2.5 up to 3B
        cfg, cls = transformers.Qwen2Config(tie_word_embeddings=True, **common), \
            transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.GemmaConfig(head_dim=8, tie_word_embeddings=True, **common), \
            transformers.GemmaForCausalLM
    cfg._attn_implementation = "sdpa"
    return cls(cfg).train()


KINDS = ["llama-tied", "qwen2-biased", "qwen2-tied-biased", "gemma-tied"]
IDS = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))


def real_backward(model, trainable=None):
    """FLOPs of loss.backward() of the plain model, with ``trainable`` (None: all) set."""
    for n, p in model.named_parameters():
        p.requires_grad_(trainable is None or n == trainable)
    loss = model(input_ids=IDS, labels=IDS).loss
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter, counter.get_total_flops()


def norm_terms(costs, model):
    """METHODS.md's elementwise norm costs (tokens x width for t_dw and for t_dy), which the
    counter does not see: taken out of the estimate before comparing."""
    params = dict(model.named_parameters())
    return [T * params[n].numel() if "norm" in n else 0 for n in costs.names]


@pytest.fixture(scope="module", params=KINDS)
def case(request):
    model = tiny(request.param)
    costs = measure_costs(model.config, fastft.Full(), batch_size=B, seq_len=S,
                          dtype=torch.float32)
    return request.param, model, costs


def test_full_backward_equals_the_real_step(case):
    _, model, costs = case
    nd = norm_terms(costs, model)
    _, real = real_backward(model)
    assert costs.t_bp - sum(nd) * 2 == real


def test_each_tensor_carries_its_own_share(case):
    kind, model, costs = case
    dw = dict(zip(costs.names, costs.t_dw))
    dy = dict(zip(costs.names, costs.t_dy))
    counts, _ = real_backward(model)
    sdpa_bwd = sum(n for op, n in counts.get_flop_counts()["Global"].items()
                   if "backward" in str(op)) // 2  # per layer, of 2
    assert sdpa_bwd > 0
    biased = any(n.endswith("proj.bias") for n in dw)
    for name, p in model.named_parameters():
        # the attention core runs after v: its backward on v's last tensor
        core = sdpa_bwd if name.endswith("v_proj.bias" if biased else "v_proj.weight") else 0
        if name.endswith("proj.weight"):  # a linear: B N out in, for each
            assert dw[name] == 2 * T * p.numel() and dy[name] == 2 * T * p.numel() + core, name
        elif name.endswith("proj.bias"):  # a bias: none of its linear's input gradient
            assert dw[name] == 0 and dy[name] == core, name
    emb = "model.embed_tokens.weight"
    if model.config.tie_word_embeddings:  # the tied tensor carries the head's dW GEMM
        assert dw[emb] == 2 * T * V * D and "lm_head.weight" not in dw
    else:
        assert dw[emb] == 0 and dw["lm_head.weight"] == dy["lm_head.weight"] == 2 * T * V * D
    assert dy[emb] == 0


def test_no_single_selection_costs_more_than_its_estimate(case):
    """One tensor trainable at a time: the real backward is never above the estimate, and
    equal to it where METHODS.md's formula is exact (the embeddings, norms, the bias before
    the attention core)."""
    _, model, costs = case
    nd = norm_terms(costs, model)
    for k, name in enumerate(costs.names):
        mask = [i == k for i in range(len(costs.names))]
        est = green_select.cost(mask, costs.t_dw, costs.t_dy) - green_select.cost(mask, nd, nd)
        _, real = real_backward(model, name)
        assert real <= est, name
        if "embed" in name or "norm" in name or name.endswith("v_proj.bias"):
            assert real == est, name
