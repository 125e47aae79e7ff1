"""The demo task: multi-digit addition with a short worked answer, verifiable exactly.

``"47+86="`` is answered ``"331 133"``: first the three digits of the sum
from the units up (what column addition with carries produces, one digit at
a time), then the sum itself. Operands are written with two digits
(``"07+86="``) so that columns line up. The reward and the accuracy check
the number after the last space against a + b. Everything is built here: the data (from a seed),
a character-level tokenizer and a small Llama-config model with random
weights; nothing is downloaded.
"""

from __future__ import annotations

import random

import torch

CHARS = list("0123456789+= ")
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


DIGITS = 2


def question(a: int, b: int) -> str:
    return f"{a:0{DIGITS}d}+{b:0{DIGITS}d}="


def worked_answer(a: int, b: int) -> str:
    padded = f"{a + b:0{DIGITS + 1}d}"
    return f"{padded[::-1]} {a + b}"


def problems(n: int, seed: int, exclude: set | None = None) -> list[tuple]:
    rng = random.Random(seed)
    top = 10**DIGITS - 1
    out, seen = [], set(exclude or ())
    while len(out) < n:
        a, b = rng.randint(0, top), rng.randint(0, top)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append((a, b))
    return out


def sft_records(pairs) -> list[dict]:
    return [{"prompt": question(a, b), "completion": worked_answer(a, b)} for a, b in pairs]


def prompt_records(pairs) -> list[dict]:
    return [{"prompt": question(a, b), "answer": a + b} for a, b in pairs]


def final_number(completion: str) -> str:
    parts = completion.strip().split(" ")
    return parts[-1] if parts else ""


def exact_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the number after the last space equals the sum, else 0.0."""
    return [1.0 if final_number(c) == str(a) else 0.0 for c, a in zip(completions, answer)]


def tokenizer():
    """A character-level tokenizer (transformers PreTrainedTokenizerFast), built in memory."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def model(tok, *, hidden: int = 128, layers: int = 4, heads: int = 4, seed: int = 0):
    """A small Llama-config causal LM with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def accuracy(m, tok, pairs, batch: int = 256) -> float:
    """Held-out exact match of greedy answers."""
    was = m.training
    m.eval()
    correct = 0
    device = next(m.parameters()).device
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        enc = tok([question(a, b) for a, b in chunk], return_tensors="pt", padding=True,
                  padding_side="left").to(device)
        out = m.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, use_cache=True)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(final_number(t) == str(a + b) for t, (a, b) in zip(texts, chunk))
    m.train(was)
    return correct / max(1, len(pairs))
