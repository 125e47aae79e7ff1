"""GRPO rollouts: sample completions with the model's own ``generate`` and score them."""

from __future__ import annotations

import inspect
import math

import torch

from ..errors import FastftError, check
from ..losses import group_advantages
from .data import prompt_ids
from .fold import folded_adapters

CACHE_BUCKET = 64  # a static KV cache's length is rounded up to this (fewer recompilations)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, cfg, device) -> dict:
    """``num_generations`` sampled completions per prompt, as one left-padded batch.

    A prompt is text, or a list of chat messages (rendered with the tokenizer's chat
    template, add_generation_prompt=True, as data.read_prompts checked it)."""
    if all(isinstance(p, str) for p in prompts):
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=True)
    else:
        enc = _left_pad([prompt_ids(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    ids = enc["input_ids"].repeat_interleave(cfg.num_generations, 0).to(device)
    mask = enc["attention_mask"].repeat_interleave(cfg.num_generations, 0).to(device)
    was_training = model.training
    model.eval()
    try:
        with folded_adapters(model):  # the adapters' product once, not per decoded token
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=cfg.sampling_temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=cfg.max_completion_length,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, use_cache=True,
                                 **cache_options(cfg, ids.shape[1], ids.device))
    finally:
        model.train(was_training)
    P = ids.shape[1]
    completion = out[:, P:]
    C = completion.shape[1]
    # a completion runs up to and including its first EOS; what follows is padding
    is_eos = completion == tokenizer.eos_token_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], C,
                                                                               dtype=torch.long))
    cmask = (torch.arange(C, device=device)[None] <= first[:, None]).long()
    texts = tokenizer.batch_decode(completion.masked_fill(cmask == 0,
                                                          tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    return {"prompt_ids": ids, "prompt_mask": mask, "completion_ids": completion,
            "completion_mask": cmask, "texts": texts}


def cache_options(cfg, prompt_len: int, device) -> dict:
    """``generate``'s KV cache arguments for ``cfg.generation_cache``: none for a dynamic
    cache (transformers' default); for a static one its implementation and a length
    rounded up to CACHE_BUCKET tokens, so that steps whose prompts differ a little in
    length reuse one cache shape (transformers keeps the longest it has seen), and on CUDA
    transformers compiles the decode step (torch.compile) on its own."""
    choice = getattr(cfg, "generation_cache", "auto")
    if choice == "auto":
        choice = "static" if torch.device(device).type == "cuda" else "dynamic"
    if choice == "dynamic":
        return {}
    from transformers import GenerationConfig

    options = {"cache_implementation": "static", "disable_compile": False}
    if hasattr(GenerationConfig(), "max_cache_len"):  # a field of recent transformers only
        need = prompt_len + cfg.max_completion_length
        options["max_cache_len"] = -(-need // CACHE_BUCKET) * CACHE_BUCKET
    return options


def _left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, n - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def score(reward_fn, rows: list[dict], texts: list[str], cfg, device) -> tuple[torch.Tensor,
                                                                               torch.Tensor]:
    """(rewards [N], advantages [N]) for the completions of ``rows`` (num_generations each)."""
    G = cfg.num_generations
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    columns = {k: [r.get(k) for r in rows for _ in range(G)]
               for k in rows[0] if k != "prompt"}
    params = inspect.signature(reward_fn).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    extra = columns if takes_all else {k: v for k, v in columns.items() if k in params}
    try:
        rewards = reward_fn(prompts, texts, **extra)
    except Exception as e:
        raise FastftError(f"the reward function failed: {type(e).__name__}: {e}") from e
    check(len(rewards) == len(texts), f"the reward function returned {len(rewards)} rewards for "
          f"{len(texts)} completions")
    values = []
    for i, x in enumerate(rewards):
        try:
            values.append(float(x))
        except (TypeError, ValueError):
            raise FastftError(f"the reward function returned {x!r} for completion {i}: rewards "
                              "must be numbers") from None
    bad = sum(not math.isfinite(v) for v in values)
    check(bad == 0, f"reward_fn returned NaN or inf for {bad} of {len(values)} completions: "
          "return a finite number for each (e.g. 0.0 for an answer it cannot parse)")
    r = torch.tensor(values, device=device)
    return r, group_advantages(r, G, cfg.scale_rewards)


def batch_rows(roll: dict, advantages: torch.Tensor, idx: slice) -> dict:
    """A micro-batch of completions for CausalLMLoss: prompt + completion, positions, mask."""
    p_ids, p_mask = roll["prompt_ids"][idx], roll["prompt_mask"][idx]
    c_ids, c_mask = roll["completion_ids"][idx], roll["completion_mask"][idx]
    attention = torch.cat([p_mask, c_mask], 1)
    position = (attention.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": torch.cat([p_ids, c_ids], 1), "attention_mask": attention,
            "position_ids": position, "prompt_len": p_ids.shape[1], "completion_ids": c_ids,
            "completion_mask": c_mask, "advantages": advantages[idx]}
