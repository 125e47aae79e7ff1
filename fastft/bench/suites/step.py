"""Bench suite ``step``: one whole training step of a Llama-shaped model, per trainer.

A step is what a training loop does per optimizer step: forward, loss, backward,
gradient clipping at 1.0 (every trainer here clips by default), the optimizer step and
zero_grad. The model is a transformers LlamaForCausalLM built from a config with random
weights (no downloads), SDPA attention, untied head:

- CPU: hidden 512, intermediate 1376, 4 layers, 8 heads (2 KV heads), vocab 32000, fp32,
  batch 4 x 512 tokens (``--quick``: hidden 64, 2 layers, vocab 1024, 2 x 64);
- CUDA: Llama-3-8B widths (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
  vocab 128256), 2 layers, bf16 weights under bf16 autocast, batch 4 x 2048 tokens.

ops and providers (the same model, adapter values and data in every provider):

- ``lora_sft``: LoRA r=16, alpha 32 on every linear layer but the head (B drawn non-zero,
  so that the adapters count in the loss). ``fastft``: fastft.prepare(model,
  fastft.LoRA(...)) and a fastft.Trainer's own step (``Trainer.step`` through CausalLMLoss,
  its clip and finite check, the optimizer and scheduler it makes); ``transformers+peft``:
  peft.get_peft_model, ``model(input_ids, labels=...).loss``, torch AdamW (fused);
  ``transformers+peft+liger`` (CUDA): the same after liger_kernel's
  ``apply_liger_kernel_to_llama``; ``trl_sft``: TRL's SFTTrainer on the same PEFT model
  and rows: its ``training_step`` (its fused LM head loss, entropy and accuracy metrics),
  its clip, optimizer and scheduler, as its loop runs them per step. Set-up and the data
  loader are outside the timing; gradient checkpointing is off (TRL's default is on) so
  that every provider computes the same step.
- ``full_sft``: every weight trained: ``fastft`` (fastft.Full and the Trainer's step),
  ``transformers`` (torch AdamW, fused), ``transformers+liger`` (CUDA).
- ``grpo_update``: a GRPO update on fixed completions (sampling and rewards excluded),
  LoRA as above, loss dapo, beta 0 (both trainers' defaults), one micro-batch.
  ``fastft``: the Trainer's loss module (CausalLMLoss -> fastft.losses.grpo) as
  the Trainer calls it after sampling, then ``Trainer.finish_step``; ``trl``: TRL's
  ``GRPOTrainer._compute_loss`` (its fused head: log-probs and entropy) on the PEFT model
  (see _trl.py), torch AdamW (fused).
- ``grpo_step``: a whole fastft Trainer GRPO step: sampling with ``generate``, rewards,
  the update; ``fastft`` samples with a dynamic KV cache, ``fastft+static_cache`` (CUDA)
  with ``generation_cache="static"`` (a static cache and transformers' compiled decode
  step, the Trainer's default on CUDA).

Rows carry ``tokens`` (what a step trains on: batch x sequence; GRPO: prompt and
completion tokens), ``tokens_per_s`` and ``first_loss``, the loss of the first step: the
providers of a case compute the same quantity, so their first losses agree. Ratios divide
by ``BASELINE``: transformers+peft for LoRA, transformers for full fine-tuning, TRL for the
GRPO update, the dynamic-cache step for the static-cache one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from functools import partial
from pathlib import Path

import torch

from ..harness import Case
from ._common import needs_cuda, peer
from ._llama import (
    ALPHA,
    R,
    apply_liger,
    fastft_prepare,
    fixed_rollout,
    llama,
    peft_lora,
    reward,
    sft_data,
    tokenizer,
)

BASELINE = {"lora_sft": "transformers+peft", "full_sft": "transformers", "grpo_update": "trl",
            "grpo_step": "fastft"}
PROVIDERS = {
    "lora_sft": ("fastft", "transformers+peft", "transformers+peft+liger", "trl_sft"),
    "full_sft": ("fastft", "transformers", "transformers+liger"),
    "grpo_update": ("fastft", "trl"),
    "grpo_step": ("fastft", "fastft+static_cache"),
}
LR, CLIP = 2e-4, 1.0


def _model_shape(device: str, quick: bool) -> tuple[dict, str]:
    if device == "cuda":
        return dict(hidden=4096, intermediate=14336, layers=2, heads=32, kv_heads=8,
                    vocab=128256), "bf16"
    if quick:
        return dict(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=1024), \
            "fp32"
    return dict(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=2, vocab=32000), "fp32"


def _work_shape(op: str, device: str, quick: bool) -> dict:
    """The batch of a step: (CUDA, CPU, CPU --quick) per op."""
    sft = (dict(batch=4, seq=2048), dict(batch=4, seq=512), dict(batch=2, seq=64))
    grpo = dict(prompts=8, generations=4, prompt_len=32, completion_len=32)
    table = {
        "lora_sft": sft, "full_sft": sft,
        "grpo_update": (dict(prompts=8, generations=4, prompt_len=128, completion_len=128),
                        dict(prompts=4, generations=4, prompt_len=32, completion_len=96),
                        dict(prompts=2, generations=2, prompt_len=8, completion_len=24)),
        "grpo_step": (grpo, grpo, dict(prompts=2, generations=2, prompt_len=8,
                                       completion_len=8)),
    }
    return table[op][0 if device == "cuda" else 2 if quick else 1]


# ---- the steps --------------------------------------------------------------------------

def _timed(step, keep=()):
    """The run function of a case: one step; its metrics take the first step's loss and
    token count. ``keep``: objects that live as long as the run (temporary folders)."""
    def run():
        loss, tokens = step()
        if "first_loss" not in run.metrics:
            run.metrics.update(first_loss=round(float(loss), 6) + 0.0,  # never -0.0
                               tokens=int(tokens))
    run.metrics = {}
    run.keep = keep
    return run


def _autocast(device: str):
    """bf16 autocast on CUDA (the fastft Trainer's default there, and HF's bf16=True)."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _trainer(model, tok, data, tmp, *, grpo: bool, lora: bool, **cfg):
    from fastft import TrainConfig, Trainer

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if grpo and "generation_cache" in fields:
        cfg.setdefault("generation_cache", "dynamic")  # default: no compiled decode step
    config = TrainConfig(objective="grpo" if grpo else "sft", method="lora" if lora else "full",
                         lora_r=R, lora_alpha=ALPHA, lr=LR, max_grad_norm=CLIP,
                         warmup_ratio=0.0, schedule="constant", max_steps=10**6,
                         progress=False, output_dir=str(Path(tmp.name) / "run"), **cfg)
    return Trainer(model, tok, data, config, reward_fn=reward if grpo else None)


def _fastft_sft(shape, work, dtype, device, lora):
    model = fastft_prepare(llama(shape, dtype, device), lora)
    _, _, records = sft_data(shape["vocab"], work["batch"], work["seq"])
    tmp = tempfile.TemporaryDirectory(prefix="fastft-bench-")
    t = _trainer(model, tokenizer(shape["vocab"]), records, tmp, grpo=False, lora=lora,
                 batch_size=work["batch"], max_length=work["seq"])

    def step():
        metrics = t.step()
        return metrics["loss"], metrics["tokens"]
    return _timed(step, keep=(tmp,))


def _plain_step(model, batch: dict, tokens: int, device: str):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=True)

    def step():
        with _autocast(device):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), tokens
    return step


def _hf_sft(shape, work, dtype, device, lora, liger):
    model = llama(shape, dtype, device)
    if liger:
        apply_liger(model)
    if lora:
        model = peft_lora(model)
    ids, labels, _ = sft_data(shape["vocab"], work["batch"], work["seq"])
    batch = dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                 labels=labels.to(device))
    return _timed(_plain_step(model, batch, ids.numel(), device))


def _trl_sft(shape, work, dtype, device):
    import datasets
    from trl import SFTConfig, SFTTrainer

    model = peft_lora(llama(shape, dtype, device))
    ids, labels, _ = sft_data(shape["vocab"], work["batch"], work["seq"])
    tmp = tempfile.TemporaryDirectory(prefix="fastft-bench-")
    cuda = device == "cuda"
    args = SFTConfig(output_dir=tmp.name, per_device_train_batch_size=work["batch"],
                     max_length=work["seq"], learning_rate=LR, lr_scheduler_type="constant",
                     max_grad_norm=CLIP, max_steps=10**6, gradient_checkpointing=False,
                     bf16=cuda, use_cpu=not cuda, report_to=[], save_strategy="no",
                     logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                         processing_class=tokenizer(shape["vocab"]))
    # what Trainer._inner_training_loop sets up before its first step
    trainer.create_optimizer()
    wrapped, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.create_scheduler(num_training_steps=args.max_steps, optimizer=trainer.optimizer)
    trainer.model_wrapped = wrapped
    trainer.current_gradient_accumulation_steps = 1
    batches, num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1,
                                                   args.device)

    def step():  # one iteration of Trainer._run_epoch, without its logging and callbacks
        loss = trainer.training_step(wrapped, dict(batches[0]), num_items)
        trainer._clip_grad_norm(wrapped)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        wrapped.zero_grad()
        return loss, ids.numel()
    return _timed(step, keep=(tmp,))


def _fastft_grpo_update(shape, work, dtype, device):
    from fastft.train import rollout

    model = fastft_prepare(llama(shape, dtype, device), lora=True)
    roll, adv, prompts = fixed_rollout(shape["vocab"], **work, device=device)
    N = adv.shape[0]
    tmp = tempfile.TemporaryDirectory(prefix="fastft-bench-")
    t = _trainer(model, tokenizer(shape["vocab"]), prompts, tmp, grpo=True, lora=True,
                 prompts_per_step=work["prompts"], num_generations=work["generations"],
                 batch_size=N, max_completion_length=work["completion_len"])
    batch = rollout.batch_rows(roll, adv, slice(0, N))
    n_items = roll["completion_mask"].sum().float()  # dapo: the step's completion tokens
    tokens = batch["input_ids"].numel()

    def step():  # the update of a Trainer GRPO step after sampling and scoring
        with t._autocast():
            loss, _ = t.engine(batch, num_items=n_items, num_sequences=N)
            loss.backward()
        t.finish_step(loss.detach())
        return loss.detach(), tokens
    return _timed(step, keep=(tmp,))


def _trl_grpo_update(shape, work, dtype, device):
    from trl.trainer.utils import add_fused_lm_head

    from ._trl import grpo_loss

    model = peft_lora(llama(shape, dtype, device))
    # as GRPOTrainer.__init__ does: the fused head on the PEFT model's base model
    add_fused_lm_head(model.get_base_model(), temperature=1.0, outputs=("log_probs", "entropy"))
    roll, adv, _ = fixed_rollout(shape["vocab"], **work, device=device)
    compute = grpo_loss(model, max_completion_length=work["completion_len"],
                        autocast_dtype=torch.bfloat16 if device == "cuda" else None,
                        device_type=device)
    inputs = dict(roll, advantages=adv, num_items_in_batch=roll["completion_mask"].sum().float())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=True)
    tokens = roll["prompt_ids"].numel() + roll["completion_ids"].numel()

    def step():
        loss = compute(dict(inputs))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), tokens
    return _timed(step)


def _fastft_grpo_step(shape, work, dtype, device, cache="dynamic"):
    model = fastft_prepare(llama(shape, dtype, device), lora=True)
    _, _, prompts = fixed_rollout(shape["vocab"], **work, device="cpu")
    tmp = tempfile.TemporaryDirectory(prefix="fastft-bench-")
    t = _trainer(model, tokenizer(shape["vocab"]), prompts, tmp, grpo=True, lora=True,
                 prompts_per_step=work["prompts"], num_generations=work["generations"],
                 batch_size=work["prompts"] * work["generations"],
                 max_completion_length=work["completion_len"], generation_cache=cache)

    def step():
        metrics = t.step()
        return metrics["loss"], metrics["tokens"]
    return _timed(step, keep=(tmp,))


def _build(op: str, provider: str, params: dict, dtype: str, device: str):
    keys = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")
    shape = {k: params[k] for k in keys}
    work = {k: v for k, v in params.items() if k not in keys}
    if op in ("lora_sft", "full_sft"):
        lora = op == "lora_sft"
        if provider == "fastft":
            return _fastft_sft(shape, work, dtype, device, lora)
        if provider == "trl_sft":
            return _trl_sft(shape, work, dtype, device)
        return _hf_sft(shape, work, dtype, device, lora, liger=provider.endswith("+liger"))
    if op == "grpo_update":
        return (_fastft_grpo_update if provider == "fastft" else _trl_grpo_update)(
            shape, work, dtype, device)
    return _fastft_grpo_step(shape, work, dtype, device,
                             "static" if provider.endswith("static_cache") else "dynamic")


def _available(op: str, provider: str, device: str) -> str | None:
    if provider.endswith("static_cache") and needs_cuda(device):
        return f"{needs_cuda(device)} (the static cache is compiled for CUDA)"
    if provider == "fastft" and device == "cpu" and torch.cuda.is_available():
        return "fastft.Trainer trains on the GPU where one is present: use --device cuda"
    need = []
    if "liger" in provider:
        if needs_cuda(device):
            return f"{needs_cuda(device)} (Liger's kernels are Triton, CUDA only)"
        need.append("liger_kernel")
    if provider != "fastft" and op in ("lora_sft", "grpo_update"):
        need.append("peft")
    if provider.startswith("trl"):
        need += ["trl", "datasets"]
    return next((why for why in map(peer, need) if why), None)


def cases(device: str, quick: bool = False) -> list[Case]:
    shape, dtype = _model_shape(device, quick)
    out = []
    for op, providers in PROVIDERS.items():
        params = dict(shape, **_work_shape(op, device, quick))
        for provider in providers:
            out.append(Case(op=op, provider=provider, params=params, dtype=dtype,
                            build=partial(_build, op, provider, params, dtype, device),
                            available=partial(_available, op, provider, device)))
    return out
