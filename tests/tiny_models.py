"""Tiny causal LMs with random weights, built from transformers configs (no downloads)."""

import torch
import transformers

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False)
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),  # q/k/v have bias
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(head_dim=8)),
}
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary
# more families, for tests/methods/test_architectures.py (ARCHS stays the four of test_lora)
MORE_ARCHS = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=8)),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,  # logit softcap 30
               dict(head_dim=8)),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, IDS),  # fused qkv_proj
    "phi": (transformers.PhiConfig, transformers.PhiForCausalLM, IDS),  # lm_head has a bias
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,  # Conv1D, weight [in, out]
             dict(n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **IDS)),
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, IDS),
    "opt": (transformers.OPTConfig, transformers.OPTForCausalLM,
            dict(ffn_dim=64, word_embed_proj_dim=32, dropout=0.0, **IDS)),
    "falcon": (transformers.FalconConfig, transformers.FalconForCausalLM, IDS),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,  # experts: 3-D
                dict(num_local_experts=4, num_experts_per_tok=2, **IDS)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,  # + shared
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=32, **IDS)),
}


def tiny(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    cfg_cls, model_cls, extra = {**ARCHS, **MORE_ARCHS}[arch]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**COMMON, **extra, **overrides})
    cfg._attn_implementation = "eager"
    return model_cls(cfg).to(dtype).eval()


def batch(B=2, S=12, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    return ids, labels
