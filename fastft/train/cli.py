"""``fastft train``: flags for every TrainConfig field, over an optional TOML config file."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from ..errors import FastftError, check
from ..recipe import TrainConfig, read_toml

HELP = {
    "objective": "sft or grpo", "loss": "SFT loss: ce, dft, asft or otr",
    "method": "lora, lora-sb, full, lift, hft, ltsft, roste or green", "lora_r": "adapter rank (default: the method's, LoRA 16, LoRA-SB 96)",
    "adapter_dtype": "float32 (adapters fp32 on a bf16/fp16 model) or base",
    "lift_lora_rank": "LIFT: entries per matrix as for a LoRA of this rank",
    "lift_filter_rank": "LIFT: rank of the approximation whose largest entries train",
    "lift_refresh_every": "LIFT: steps between mask refreshes (0: never)",
    "hft_seed": "HFT: seed of the frozen halves (default: --seed)",
    "ltsft_proportion": "LT-SFT: fraction of the entries re-trained",
    "rho": "GreenTrainer: share of full fine-tuning's FLOPs a step keeps, in (0, 1]",
    "green_interval": "GreenTrainer: epochs between tensor selections",
    "green_base": "GreenTrainer: select among full's tensors (full) or LoRA adapters (lora)",
    "w_bits": "RoSTE: weight bits, 2..8", "a_bits": "RoSTE: activation bits, 2..8",
    "kv_bits": "RoSTE: K/V bits, 2..8",
    "rotations": "RoSTE: adaptive, all, r1 (R1 only) or none",
    "calibration_samples": "RoSTE: examples of the adaptive rotation choice",
    "quant_clip_ratio": "RoSTE: clip ratio of the quantizer ranges",
    "quant_symmetric": "RoSTE: symmetric quantizers",
    "roste_lora": "RoSTE: LoRA adapters on the frozen quantized base (--lora-r ...)",
    "masked_thought": "Masked Thought: probability of masking a completion input token "
    "(ramps up over the first 2/3 of the steps)",
    "mask_token_id": "the token Masked Thought puts in (default: the tokenizer's unk; "
    "neither its pad nor its EOS)",
    "key_tokens": "key-token weighted SFT: a regex marking key tokens of the completion",
    "key_max_weight": "the largest weight of a key token",
    "key_norm": "key-token weights: sample (each completion normalised, then averaged; "
    "TL-Training) or step (one normaliser over the step's tokens)",
    "uds_grouping": "UDS: micro (top of each micro-batch of candidates, queue pushed after "
    "each; the authors') or step (one top-k over the step)",
    "uds_start_step": "UDS: optimizer steps of plain training before selection starts",
    "lora_alpha": "LoRA alpha (scale alpha / r)", "lora_dropout": "dropout on the LoRA input",
    "target_modules": "'all-linear', comma-separated names, or a regex over module paths",
    "rslora": "scale alpha / sqrt(r)", "max_length": "tokens per example",
    "truncation": "cut examples longer than max_length and count them (else: an error)",
    "packing": "pack examples into rows of max_length without padding",
    "completion_only": "learn only the completion tokens (prompt masked)",
    "skip_invalid": "skip bad records (and report how many) instead of stopping",
    "batch_size": "sequences (SFT) or completions (GRPO) per micro-batch and process",
    "grad_accum": "micro-batches per optimizer step (SFT)",
    "max_steps": "optimizer steps (0: use epochs)", "epochs": "passes over the data",
    "lr": "peak learning rate", "weight_decay": "AdamW weight decay",
    "adam_betas": "AdamW betas, e.g. 0.9,0.999", "adam_eps": "AdamW eps",
    "warmup_ratio": "fraction of steps of linear warm-up",
    "schedule": "cosine, linear or constant", "max_grad_norm": "clip (0: off)",
    "bf16": "auto (on CUDA), true or false", "gradient_checkpointing": "recompute activations",
    "fsdp": "under torchrun: FSDP2 for full fine-tuning", "kl_coef": "ASFT KL weight",
    "otr_k": "OTR samples per position", "otr_beta": "OTR penalty of a wrong sample",
    "otr_temperature": "OTR sampling temperature", "prompts_per_step": "GRPO prompts per step",
    "num_generations": "GRPO completions per prompt",
    "max_completion_length": "GRPO tokens per completion",
    "sampling_temperature": "GRPO sampling temperature", "beta": "GRPO KL weight (needs a "
    "reference: the base model)", "eps_low": "GRPO lower clip", "eps_high": "GRPO upper clip",
    "delta": "GRPO upper cap of the importance ratio (unset: none)",
    "loss_type": "grpo, bnpo, dr_grpo or dapo", "importance_level": "token or sequence (GSPO)",
    "scale_rewards": "group, batch or none",
    "generation_cache": "GRPO sampling: auto (static KV cache + compiled decoding on CUDA, "
    "dynamic elsewhere), static or dynamic", "output_dir": "run folder (default runs/<time>)",
    "seed": "random seed", "log_every": "steps between metric lines",
    "save_every": "steps between checkpoints (0: only at the end)",
    "resume_from": "a checkpoint-<step> folder to continue from",
    "overwrite": "replace a previous run in the output folder (its config, metrics, "
    "checkpoints)",
    "progress": "show a progress bar",
}
RENAMED = {"output_dir": "output", "resume_from": "resume"}
TYPES = {"lora_r": int, "delta": float, "hft_seed": int, "mask_token_id": int}  # fields whose default is None
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML file of these options (flags override it)")
    p.add_argument("--model", help="a local transformers causal LM folder (safetensors)")
    p.add_argument("--data", help="training data: JSONL, a JSON array or Parquet "
                   "(prompt/completion or "
                   "messages; GRPO: prompt and reward columns)")
    p.add_argument("--eval-data", help="held-out data in the same format (SFT: eval loss)")
    p.add_argument("--reward", help="GRPO reward function as module:function or file.py:function")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + RENAMED.get(f.name, f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(dest=f.name, default=None, help=f"{HELP.get(f.name, f.name)} (default "
                  f"{default})")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name in TYPES:
            p.add_argument(flag, type=TYPES[f.name], **kw)
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            p.add_argument(flag, type=type(default), **kw)
        else:
            p.add_argument(flag, type=str, **kw)


def _parse_value(name: str, value):
    if name == "adam_betas" and isinstance(value, str):
        try:
            return [float(x) for x in value.split(",")]
        except ValueError:
            raise FastftError(f"--adam-betas {value!r}: give two numbers, e.g. 0.9,0.999") \
                from None
    if name == "target_modules" and isinstance(value, str) and value != "all-linear" \
            and "," in value:
        return [x.strip() for x in value.split(",") if x.strip()]
    return value


def config_from_args(args) -> tuple[TrainConfig, dict]:
    """The TrainConfig (file, then flags) and the run inputs (model, data, eval_data, reward)."""
    values, inputs = {}, {}
    if args.config:
        values = read_toml(args.config)
        here = Path(args.config).parent
        for key in ("model", "data", "eval_data", "reward"):
            if key in values:
                inputs[key] = _relative_to(here, key, values.pop(key))
        for key in ("output_dir", "resume_from"):
            if isinstance(values.get(key), str):
                values[key] = str(here / values[key])
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = _parse_value(f.name, v)
    for key in ("model", "data", "eval_data", "reward"):
        v = getattr(args, key)
        if v is not None:
            inputs[key] = v
    return TrainConfig.from_dict(values, source=args.config), inputs


def _relative_to(folder: Path, key: str, value):
    """A path named in a TOML file, relative to the file's folder (a reward module:function
    stays as it is; its file.py form is a path)."""
    check(isinstance(value, str), f"{key} must be a string (a path); got {value!r}")
    if key == "reward":
        where, sep, name = value.rpartition(":")
        if sep and where.endswith(".py") and not Path(where).is_absolute():
            return f"{folder / where}:{name}"
        return value
    return str(folder / value)


def load_reward(spec: str):
    """``file.py:function`` (a path) or ``module:function`` (imported with the working
    directory on the path, as ``python -c`` would)."""
    check(":" in spec, f"--reward {spec!r}: give module:function or file.py:function")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        check(path.is_file(), f"reward file {path} not found")
        sp = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(sp)
        try:
            sp.loader.exec_module(mod)
        except Exception as e:
            raise FastftError(f"--reward: {path} failed to import: {type(e).__name__}: {e}") \
                from e
    else:
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            mod = importlib.import_module(where)
        except Exception as e:
            raise FastftError(f"--reward: cannot import {where!r} from {cwd} "
                              f"({type(e).__name__}: {e})") from e
        finally:
            if added:
                sys.path.remove(cwd)
    fn = getattr(mod, name, None)
    check(callable(fn), f"--reward: {where} has no function {name!r}")
    return fn


def load_model(path: str):
    """A local causal LM and its tokenizer; clear errors for a missing folder or weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    check(folder.is_dir(), f"model path {folder} not found (a local folder with config.json "
          "and *.safetensors)")
    check((folder / "config.json").is_file(), f"{folder} has no config.json: not a transformers "
          "model folder")
    check(any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")),
          f"{folder} has no model weights (*.safetensors)")
    check(any((folder / f).is_file() for f in TOKENIZER_FILES),
          f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): save it beside "
          f"the weights, tokenizer.save_pretrained({str(folder)!r})")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FastftError(f"cannot load the model in {folder}: {str(e).splitlines()[0]}") from e
    return model, tok


def run(args) -> int:
    from ..demo import run_demo
    from .trainer import Trainer

    cfg, inputs = config_from_args(args)
    if not inputs.get("model") and not inputs.get("data") and not args.config:
        run_demo(cfg.output_dir, seed=cfg.seed)
        return 0
    check(bool(inputs.get("model")), "--model PATH is needed (a local transformers causal LM "
          "folder), or run `fastft train` with no arguments for the embedded demo")
    check(bool(inputs.get("data")), "--data FILE is needed (JSONL, a JSON array or Parquet)")
    # the data files are read (and any error in them shown) before the model loads
    from . import data

    records = data.read_records(inputs["data"], "data", skip_invalid=cfg.skip_invalid)
    eval_records = data.read_records(inputs["eval_data"], "eval_data",
                                     skip_invalid=cfg.skip_invalid) \
        if inputs.get("eval_data") else None
    reward = load_reward(inputs["reward"]) if cfg.objective == "grpo" and inputs.get("reward") \
        else None
    check(cfg.objective != "grpo" or reward is not None,
          "objective grpo needs --reward module:function")
    # the run folder (--overwrite) and the checkpoint to resume are checked before the model loads
    from . import checkpoint

    if cfg.output_dir:
        checkpoint.check_output_dir(cfg.output_dir, overwrite=cfg.overwrite,
                                    resume_from=cfg.resume_from, any_content=True)
    if cfg.resume_from:
        checkpoint.verify_checkpoint(cfg.resume_from)
    model, tok = load_model(inputs["model"])
    Trainer(model, tok, records, cfg, reward_fn=reward, eval_data=eval_records).train()
    return 0
