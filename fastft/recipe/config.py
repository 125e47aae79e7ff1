"""TrainConfig: every option of a training run, with defaults, checks and TOML loading."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FastftError, check

OBJECTIVES = ("sft", "grpo")
SFT_LOSSES = ("ce", "dft", "asft", "otr")
METHODS = ("lora", "lora-sb", "full", "lift", "hft", "ltsft", "roste", "green")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    # what to train
    objective: str = "sft"  # sft | grpo
    loss: str = "ce"  # sft: ce | dft | asft | otr
    method: str = "lora"  # lora | lora-sb | full | lift | hft | ltsft | roste
    lora_r: int | None = None  # None: the method's default (LoRA 16, LoRA-SB 96)
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    rslora: bool = False
    adapter_dtype: str = "float32"  # float32 (adapters fp32 on a bf16/fp16 model) | base
    lift_lora_rank: int = 128  # LIFT: k = min((m + n) x lift_lora_rank, m x n) entries a matrix
    lift_filter_rank: int = 64  # LIFT: rank of the approximation whose largest entries train
    lift_refresh_every: int = 400  # LIFT: optimizer steps between mask refreshes (0: never)
    hft_seed: int | None = None  # HFT: seed of the frozen halves (None: the run's seed)
    ltsft_proportion: float = 0.01  # LT-SFT: fraction of the entries re-trained
    rho: float = 0.5  # GreenTrainer: share of full fine-tuning's FLOPs a step keeps
    green_interval: int = 2  # GreenTrainer: epochs between selections
    green_base: str = "full"  # GreenTrainer: select among "full"'s tensors or "lora" adapters
    w_bits: int = 4  # RoSTE: weight bits (per output channel), 2..8
    a_bits: int = 4  # RoSTE: input activation bits (per token), 2..8
    kv_bits: int = 4  # RoSTE: K and V bits (per token and head), 2..8
    rotations: str = "adaptive"  # RoSTE: adaptive | all | r1 | none
    calibration_samples: int = 128  # RoSTE: training examples of the adaptive choice
    quant_clip_ratio: float = 1.0  # RoSTE: clip ratio c of the quantizers' ranges
    quant_symmetric: bool = False  # RoSTE: symmetric quantizers (else asymmetric)
    roste_lora: bool = False  # RoSTE: train LoRA adapters (lora_r, ...) on the frozen base
    # data
    max_length: int = 1024
    # an example longer than max_length is cut to it, and the run prints how many were
    # (one whose prompt fills max_length is dropped and counted); False: an over-long
    # example is an error naming it (with skip_invalid: skipped and counted)
    truncation: bool = True
    packing: bool = False
    completion_only: bool = True
    skip_invalid: bool = False  # skip (and count) unreadable / bad records, not stop
    masked_thought: float = 0.0  # Masked Thought: p of masking a completion input token
    # its replacement (None: the tokenizer's unk; a tokenizer without one needs it named)
    mask_token_id: int | None = None
    key_tokens: str | None = None  # key-token weighted SFT: a regex over the completion text
    key_max_weight: float = 9.0  # a key token weighs min(N_other / N_key, this)
    # sample: each completion's weighted mean, then the mean over completions (TL-Training);
    # step: one weighted mean over every completion token of the step
    key_norm: str = "sample"
    # optimisation
    batch_size: int = 8  # sequences (sft) or completions (grpo) per micro-batch and process
    grad_accum: int = 1
    max_steps: int = 0  # optimizer steps; 0: ``epochs`` over the data
    epochs: float = 1.0
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    max_grad_norm: float = 1.0  # 0: no clipping
    bf16: str = "auto"  # auto (on CUDA) | true | false
    gradient_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: FSDP2 fully_shard (full fine-tuning) instead of DDP
    # losses
    kl_coef: float = 0.1  # asft
    otr_k: int = 8
    otr_beta: float = 0.1
    otr_temperature: float = 1.0
    # grpo
    prompts_per_step: int = 8
    num_generations: int = 8
    max_completion_length: int = 64
    sampling_temperature: float = 1.0
    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None  # caps the importance ratio from above (two-sided GRPO)
    loss_type: str = "dapo"
    importance_level: str = "token"
    scale_rewards: str = "group"
    # GRPO sampling: auto (static KV cache + compiled decoding on CUDA, dynamic elsewhere)
    # | static (static KV cache; transformers compiles the decode step on CUDA) | dynamic
    generation_cache: str = "auto"
    # data selection (sft): each step scores ceil(global batch / select_ratio) candidates
    select: str | None = None  # None | "uds" (utility-diversity online batch selection)
    select_ratio: float = 0.5  # the fraction of the candidates that trains
    uds_alpha: float = 2.5e-3  # UDS: weight of the diversity in the score
    uds_queue: int = 1024  # UDS: sketches of recently selected samples kept
    # UDS: micro (the top of each micro-batch of candidates, the queue pushed after each,
    # as the authors do) | step (one top-k over the step's candidates, pushed once)
    uds_grouping: str = "micro"
    uds_start_step: int = 0  # UDS: optimizer steps of plain training before selection starts
    # run
    output_dir: str | None = None
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    resume_from: str | None = None
    overwrite: bool = False  # replace a previous run in output_dir (its checkpoints, metrics)
    progress: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> TrainConfig:
        if isinstance(self.bf16, bool):  # TOML's true / false
            self.bf16 = str(self.bf16).lower()
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            ok, value = _conform(v, hints[f.name])
            check(ok, f"{f.name} must be {_describe(hints[f.name])}; got {v!r} "
                  f"({type(v).__name__})")
            setattr(self, f.name, value)
        self._check_values()
        return self

    def _check_values(self) -> None:
        check(self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}; "
              f"got {self.objective!r}")
        check(self.loss in SFT_LOSSES, f"loss must be one of {', '.join(SFT_LOSSES)}; got "
              f"{self.loss!r}")
        check(self.method in METHODS, f"method must be one of {', '.join(METHODS)}; got "
              f"{self.method!r}")
        check(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}; got "
              f"{self.schedule!r}")
        for name in ("batch_size", "grad_accum", "max_length", "num_generations",
                     "prompts_per_step", "max_completion_length", "otr_k", "log_every"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"{name} must be an integer >= 1; got {v!r}")
        check(self.lora_r is None or (isinstance(self.lora_r, int) and self.lora_r >= 1),
              f"lora_r must be an integer >= 1 (or unset for the method's default); got "
              f"{self.lora_r!r}")
        check(self.objective != "grpo" or self.num_generations >= 2,
              "num_generations must be >= 2 for GRPO: advantages compare the completions of "
              f"one prompt with each other; got {self.num_generations}")
        check(self.delta is None or self.delta > 1.0,
              f"delta caps the importance ratio and must be > 1 (or unset); got {self.delta!r}")
        check(self.adapter_dtype in ("float32", "base"),
              f"adapter_dtype must be float32 or base; got {self.adapter_dtype!r}")
        check(self.max_steps >= 0 and self.save_every >= 0, "max_steps and save_every must be >= 0")
        check(self.max_steps > 0 or self.epochs > 0, "set max_steps or epochs > 0")
        check(self.lr > 0, f"lr must be > 0; got {self.lr}")
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        check(str(self.bf16).lower() in ("auto", "true", "false"),
              f"bf16 must be auto, true or false; got {self.bf16!r}")
        check(len(self.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in self.adam_betas),
              f"adam_betas must be two numbers in [0, 1), e.g. 0.9,0.999; got {self.adam_betas}")
        check(self.adam_eps > 0, f"adam_eps must be > 0; got {self.adam_eps}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0; got {self.weight_decay}")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0: no clipping); got "
              f"{self.max_grad_norm}")
        check(self.epochs >= 0, f"epochs must be >= 0; got {self.epochs}")
        check(self.lora_alpha > 0, f"lora_alpha must be > 0; got {self.lora_alpha}")
        check(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1); got "
              f"{self.lora_dropout}")
        for name in ("kl_coef", "otr_beta", "beta", "eps_low", "eps_high"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("otr_temperature", "sampling_temperature"):
            check(getattr(self, name) > 0, f"{name} must be > 0 (sampling needs a temperature; "
                  f"there is no greedy mode); got {getattr(self, name)}")
        for name, allowed in (("loss_type", ("grpo", "bnpo", "dr_grpo", "dapo")),
                              ("importance_level", ("token", "sequence")),
                              ("scale_rewards", ("group", "batch", "none")),
                              ("generation_cache", ("auto", "static", "dynamic"))):
            check(getattr(self, name) in allowed, f"{name} must be one of {', '.join(allowed)}; "
                  f"got {getattr(self, name)!r}")
        check(self.seed >= 0, f"seed must be >= 0; got {self.seed}")
        for name in ("lift_lora_rank", "lift_filter_rank"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1; got {getattr(self, name)}")
        check(self.lift_refresh_every >= 0, "lift_refresh_every must be >= 0 (0: never); got "
              f"{self.lift_refresh_every}")
        check(0 < self.ltsft_proportion <= 1, "ltsft_proportion must be in (0, 1]; got "
              f"{self.ltsft_proportion}")
        check(0 < self.rho <= 1, f"rho must be in (0, 1] (GreenTrainer: the share of full "
              f"fine-tuning's FLOPs a step keeps); got {self.rho}")
        check(self.green_interval >= 1, f"green_interval must be >= 1; got {self.green_interval}")
        check(self.green_base in ("full", "lora"), f"green_base must be 'full' or 'lora'; got "
              f"{self.green_base!r}")
        check(self.method != "green" or self.objective == "sft", "method 'green' (GreenTrainer) "
              "selects its tensors on SFT batches: use objective 'sft'")
        for name in ("w_bits", "a_bits", "kv_bits"):
            check(2 <= getattr(self, name) <= 8, f"{name} must be an integer in 2..8; got "
                  f"{getattr(self, name)}")
        check(self.rotations in ("adaptive", "all", "r1", "none"), "rotations must be one of "
              f"adaptive, all, r1, none; got {self.rotations!r}")
        check(self.calibration_samples >= 1, "calibration_samples must be an integer >= 1; got "
              f"{self.calibration_samples}")
        check(0 < self.quant_clip_ratio <= 1, "quant_clip_ratio must be in (0, 1]; got "
              f"{self.quant_clip_ratio}")
        check(self.select in (None, "uds"), f"select must be uds or unset; got {self.select!r}")
        check(self.select is None or self.objective == "sft",
              "select (data selection) applies to SFT; unset it for GRPO")
        check(0 < self.select_ratio <= 1, f"select_ratio must be in (0, 1]; got "
              f"{self.select_ratio}")
        check(self.uds_alpha >= 0, f"uds_alpha must be >= 0; got {self.uds_alpha}")
        check(self.uds_queue >= 1, f"uds_queue must be an integer >= 1; got {self.uds_queue}")
        check(self.uds_grouping in ("micro", "step"), "uds_grouping must be micro or step; got "
              f"{self.uds_grouping!r}")
        check(self.uds_start_step >= 0, f"uds_start_step must be >= 0; got "
              f"{self.uds_start_step}")
        check(self.key_norm in ("sample", "step"), f"key_norm must be sample or step; got "
              f"{self.key_norm!r}")
        check(0 <= self.masked_thought < 1, "masked_thought (a probability) must be in "
              f"[0, 1); got {self.masked_thought}")
        check(self.mask_token_id is None or self.mask_token_id >= 0,
              f"mask_token_id must be >= 0; got {self.mask_token_id}")
        check(self.key_max_weight >= 1, f"key_max_weight must be >= 1; got "
              f"{self.key_max_weight}")
        if self.key_tokens is not None:
            import re

            try:
                re.compile(self.key_tokens)
            except re.error as e:
                raise FastftError(f"key_tokens {self.key_tokens!r} is not a valid regex: {e}") \
                    from e

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise FastftError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: "
                              f"{', '.join(cls.keys())}")
        try:
            return cls(**values)
        except (TypeError, FastftError) as e:
            raise FastftError(f"{source}: {e}" if source else str(e)) from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          type(None): "unset"}


def _describe(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if args:
        return " or ".join(_describe(a) for a in args)
    return _WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def _conform(value, hint) -> tuple[bool, object]:
    """(whether ``value`` fits the annotation ``hint``, the value as stored: ints become
    floats where a float is wanted, a tuple a list)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_conform(v, args[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if args:  # a union
        for a in args:
            ok, v = _conform(value, a)
            if ok:
                return True, v
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    return isinstance(value, hint), value


def read_toml(path: str | Path) -> dict:
    """The key/value pairs of a TOML config file (clear errors for a missing or bad file)."""
    p = Path(path)
    check(p.is_file(), f"config file {p} not found")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise FastftError(f"{p} is not valid TOML: {e}") from e
