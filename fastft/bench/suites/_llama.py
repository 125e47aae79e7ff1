"""The step suite's model, tokenizer and data: a Llama-shaped transformers model with random
weights, a word-level tokenizer over its whole vocabulary (word ``w<i>`` is token i, so
that records and token ids map one to one), SFT rows and fixed GRPO rollouts, and the
same LoRA adapter values for fastft and PEFT."""

from __future__ import annotations

import gc
import zlib

import torch

from ._common import DTYPES

R, ALPHA = 16, 32  # LoRA rank and alpha
PAD, BOS, EOS, UNK, FIRST_WORD = 0, 1, 2, 3, 4  # token ids; words are w4, w5, ...

_LLAMA_MODULE: dict = {}  # transformers' Llama module as imported, before any Liger patch


def clean_llama():
    """Undo module-level patches a previous case made (Liger replaces the Llama module's
    rotary embedding, RMSNorm and MLP classes): on CUDA the cases share one process."""
    from transformers.models.llama import modeling_llama as m

    names = ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")
    if not _LLAMA_MODULE:
        _LLAMA_MODULE.update({n: getattr(m, n) for n in names})
        _LLAMA_MODULE["forward"] = m.LlamaForCausalLM.forward
    for n in names:
        setattr(m, n, _LLAMA_MODULE[n])
    m.LlamaForCausalLM.forward = _LLAMA_MODULE["forward"]
    gc.collect()  # the previous case's model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def llama(shape: dict, dtype: str, device: str):
    """LlamaForCausalLM of ``shape`` with random weights (seed 0), built on ``device``, in
    train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    clean_llama()
    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                      intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096,
                      tie_word_embeddings=False, use_cache=False, pad_token_id=PAD,
                      bos_token_id=BOS, eos_token_id=EOS)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(DTYPES[dtype]).train()


def tokenizer(vocab: int):
    """A word-level tokenizer over the whole vocabulary: word ``w<i>`` is token i."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}
    words.update({f"w{i}": i for i in range(FIRST_WORD, vocab)})
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def text(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def sft_data(vocab: int, batch: int, seq: int):
    """(input_ids, labels) [batch, seq]: random words ending in EOS, the first eighth a
    prompt (-100 in the labels); and the same rows as prompt / completion records."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(FIRST_WORD, vocab, (batch, seq), generator=g)
    ids[:, -1] = EOS
    P = seq // 8
    labels = ids.clone()
    labels[:, :P] = -100
    records = [{"prompt": text(r[:P]), "completion": text(r[P:-1])} for r in ids]
    return ids, labels, records


def fixed_rollout(vocab: int, prompts: int, generations: int, prompt_len: int,
                  completion_len: int, device: str):
    """Fixed completions: ``generations`` per prompt, lengths from half to all of
    ``completion_len`` (EOS last unless cut), padding after; group advantages of random
    rewards. As rollout.generate returns them, and the advantages."""
    from fastft.losses import group_advantages

    g = torch.Generator().manual_seed(0)
    N, C = prompts * generations, completion_len
    prompt = torch.randint(FIRST_WORD, vocab, (prompts, prompt_len), generator=g)
    completion = torch.randint(FIRST_WORD, vocab, (N, C), generator=g)
    length = torch.randint(C // 2, C + 1, (N,), generator=g)
    ends = length < C
    completion[ends.nonzero()[:, 0], length[ends] - 1] = EOS
    mask = (torch.arange(C)[None] < length[:, None]).long()
    roll = dict(prompt_ids=prompt.repeat_interleave(generations, 0),
                prompt_mask=torch.ones(N, prompt_len, dtype=torch.long),
                completion_ids=completion.masked_fill(mask == 0, PAD), completion_mask=mask)
    adv = group_advantages(torch.rand(N, generator=g), generations, "group")
    return {k: v.to(device) for k, v in roll.items()}, adv.to(device), \
        [{"prompt": text(p)} for p in prompt]


def reward(prompts, completions, **_):
    """A reward that varies between completions: their letters' count modulo 7."""
    return [float(sum(len(w) for w in c.split()) % 7) for c in completions]


# ---- LoRA: the same adapter values in fastft and PEFT -----------------------------------

def fill_adapters(pairs: dict) -> None:
    """{module path: (A [r, in], B [out, r])}: values drawn from the path alone."""
    with torch.no_grad():
        for path, (a, b) in pairs.items():
            g = torch.Generator().manual_seed(zlib.crc32(path.encode()))
            a.copy_(torch.randn(a.shape, generator=g) * a.shape[1] ** -0.5)
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)


def fastft_prepare(model, lora: bool):
    """fastft.prepare with LoRA (r, alpha; the adapters filled) or Full."""
    import fastft
    from fastft.methods.lora import adapter_layers

    fastft.prepare(model, fastft.LoRA(r=R, alpha=ALPHA) if lora else fastft.Full())
    if lora:
        fill_adapters({p: (m.lora_A, m.lora_B) for p, m in adapter_layers(model).items()})
    return model


def peft_lora(model):
    """peft.get_peft_model with the same LoRA on every linear layer but the head."""
    import peft

    pm = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                    target_modules="all-linear"))
    fill_adapters({p: (m.lora_A["default"].weight, m.lora_B["default"].weight)
                   for p, m in pm.base_model.model.named_modules()
                   if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)})
    return pm


def apply_liger(model):
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(model=model)
    return model
