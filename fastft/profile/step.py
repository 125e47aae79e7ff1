"""Trace one training step of a model and method on fake tensors: no weights, no kernels.

The model is built from its config under torch's FakeTensorMode (on the fake
device of the profile: ``cuda`` for a GPU, ``cpu`` for the CPU), prepared with
the fastft method, and runs the Trainer's own step twice (forward, fused loss,
backward, optimizer step, zero_grad): the second step is the one measured, so
that the optimizer state already exists, as in every step of a run but the first.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import FastftError, check
from .tracker import CATEGORIES, FlopRecorder, MemoryTracker, module_pattern

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def load_config(source):
    """A transformers config from a model, a config object, a folder or a config.json."""
    import transformers

    if isinstance(source, nn.Module):
        check(hasattr(source, "config"), "profile needs a transformers model (with .config), a "
              "config, a model folder or a config.json")
        return source.config
    if isinstance(source, transformers.PretrainedConfig):
        return source
    path = Path(source)
    if path.is_dir():
        check((path / "config.json").is_file(), f"{path} has no config.json: give a model "
              "folder saved by transformers (save_pretrained) or the path of a config.json")
        path = path / "config.json"
    check(path.is_file(), f"{source} not found: give a model folder or a config.json")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FastftError(f"{path} is not valid JSON ({e}): give a transformers "
                          "config.json") from None
    check(isinstance(raw, dict) and "model_type" in raw, f"{path} has no 'model_type': it is "
          "not a transformers config.json")
    try:
        return transformers.AutoConfig.for_model(**raw)
    except (ValueError, KeyError) as e:
        raise FastftError(f"{path}: transformers cannot read this config ({e})") from None


def build(config, dtype: torch.dtype, device: str) -> nn.Module:
    """The causal LM of ``config`` on fake tensors (call inside FakeTensorMode): built on
    the meta device (no initialisation), then every parameter and buffer re-made as a
    fake tensor on ``device`` (tied weights stay tied)."""
    import transformers

    config = _copy(config)
    config.use_cache = False
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            # sdpa, as transformers picks for training where the architecture has it (Gemma-2's
            # attention softcap does not: eager, which keeps its [B, heads, S, S] probabilities)
            try:
                config._attn_implementation = "sdpa"
                model = transformers.AutoModelForCausalLM.from_config(config)
            except ValueError:
                config._attn_implementation = "eager"
                model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(old)
    made: dict[int, torch.Tensor] = {}

    def fake(t, param: bool):
        if id(t) not in made:
            new = torch.empty_like(t, device=device)
            made[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if param else new
        return made[id(t)]

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = fake(p, True)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = fake(b, False)
    return model.train()


def _copy(config):
    return type(config).from_dict(config.to_dict())


def make_method(name_or_method, config, rho: float = 0.5):
    """A fastft method from its name (full, lora, lora-sb, lift, hft, green) or as given."""
    if not isinstance(name_or_method, str):
        return name_or_method
    from ..recipe import TrainConfig
    from ..recipe import make_method as from_config

    name = name_or_method.lower()
    check(name in ("full", "lora", "lora-sb", "lift", "hft", "ltsft", "green"),
          f"unknown method {name_or_method!r}: choose from full, lora, lora-sb, lift, hft, "
          "ltsft, green")
    extra = {"rho": rho} if name == "green" else {}
    return from_config(TrainConfig(method=name, **extra))


def sft_batch(vocab: int, batch_size: int, seq_len: int, device: str) -> dict:
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    return {"input_ids": ids, "labels": ids.clone()}  # unpadded: causal attention, no mask


def grpo_batch(vocab: int, batch_size: int, seq_len: int, device: str) -> dict:
    """Prompts of seq_len / 2 tokens and completions filling the rest."""
    P = max(1, seq_len // 2)
    C = seq_len - P
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_len": P,
            "completion_ids": ids[:, P:].clone(),
            "completion_mask": torch.ones(batch_size, C, device=device),
            "advantages": torch.zeros(batch_size, device=device)}


class StepTrace:
    """The measured step: memory (bytes) and FLOPs, filled by :func:`trace`."""

    def __init__(self):
        self.memory: dict[str, int] = {}
        self.peak_bytes = 0
        self.peak_phase = ""
        self.static: dict[str, int] = {}
        self.activations_by_module: dict[str, int] = {}
        self.weights_by_module: dict[str, dict[str, int]] = {}
        self.flops = None  # the FlopRecorder of the measured step
        self.flops_total = 0
        self.params = 0
        self.trainable = 0


def trace(config, method, *, batch_size: int, seq_len: int, objective: str = "sft",
          dtype: torch.dtype = torch.bfloat16, kind: str = "cuda",
          gradient_checkpointing: bool = False, before_step=None, input_grad: bool = False,
          optimizer_step: bool = True, steps: int = 2) -> StepTrace:
    """Trace the Trainer's step on fake tensors.

    ``before_step(model)`` runs after the model is prepared (GreenTrainer's selection);
    ``input_grad``: the embeddings' output requires grad, so activation gradients reach
    the bottom even with every parameter frozen (GreenTrainer's cost traces);
    ``optimizer_step=False`` leaves the optimizer out. The fake tensors live on the CPU
    (fake CUDA tensors cannot run every op transformers uses on a machine without CUDA);
    ``kind`` ("cuda" or "cpu") picks which device's workspace the fused ops declare.
    """
    from ..patch import prepare
    from ..recipe import CausalLMLoss, TrainConfig, build_optimizer

    check(objective in ("sft", "grpo"), f"objective must be 'sft' or 'grpo'; got {objective!r}")
    check(isinstance(batch_size, int) and batch_size >= 1, "batch_size must be an integer >= 1")
    check(isinstance(seq_len, int) and seq_len >= 2, "seq_len must be an integer >= 2")
    device = "cpu"
    out = StepTrace()
    cfg = TrainConfig(objective=objective, max_length=seq_len,
                      gradient_checkpointing=gradient_checkpointing)
    with FakeTensorMode(allow_non_fake_inputs=True), _quiet(), _unpadded_masks():
        with _NoRandomFill():  # values do not matter
            model = build(config, dtype, device)
            prepare(model, method)
        if gradient_checkpointing:  # as the Trainer does it
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if before_step is not None:
            before_step(model)
        if input_grad:
            model.get_input_embeddings().register_forward_hook(
                lambda mod, args, output: output.requires_grad_()
                if not output.requires_grad else output)
        loss_model = CausalLMLoss(model, cfg)
        optimizer = build_optimizer(method, model, cfg) if optimizer_step else None
        make = grpo_batch if objective == "grpo" else sft_batch
        batch = make(config.vocab_size, batch_size, seq_len, device)
        n = torch.tensor(float(batch_size * seq_len), device=device)
        extra = {"num_sequences": torch.tensor(float(batch_size), device=device)} \
            if objective == "grpo" else {}

        def step(mem=None, flops=None):
            def phase(name):
                for t in (mem, flops):
                    if t is not None:
                        t.phase = name
            phase("forward")
            loss, _ = loss_model(batch, num_items=n, **extra)
            if mem is not None:
                mem.end_forward()
            phase("backward")
            loss.backward()
            if mem is not None:
                for g in _grad_tensors(model, optimizer):
                    mem.track(g, "gradients")
            phase("optimizer")
            if optimizer is not None:
                optimizer.step()
                if mem is not None:
                    for t in _state_tensors(optimizer):
                        mem.track(t, "optimizer")
                optimizer.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)

        for _ in range(steps - 1):  # the first step creates the optimizer state
            step()
        mem = MemoryTracker(kind)
        for p in model.parameters():
            mem.track(p, "parameters")
        for b in model.buffers():
            mem.track(b, "parameters")
        for t in _state_tensors(optimizer):
            mem.track(t, "optimizer")
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                mem.track(v, "inputs")
        hooks = [p.register_post_accumulate_grad_hook(lambda p: mem.track(p.grad, "gradients"))
                 for p in model.parameters() if p.requires_grad]
        flops = FlopRecorder(mem)
        with flops, mem:
            step(mem, flops)
        for h in hooks:
            h.remove()
        mem.detach()
        out.memory = {c: mem.peak.get(c, 0) for c in CATEGORIES}
        out.peak_bytes = mem.peak_bytes
        out.peak_phase = mem.peak.get("phase", "")
        out.activations_by_module = dict(mem.saved_by_module)
        out.flops = flops
        out.flops_total = flops.get_total_flops()
        out.static, out.weights_by_module = _static(model, optimizer)
        out.params = sum(p.numel() for p in model.parameters())
        out.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out.parameter_names = [(name, p.numel(), p.requires_grad, type(_owner(model, name)).__name__)
                               for name, p in model.named_parameters()]
        out.head_name = _head_name(model)
    return out


def _owner(model, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def _head_name(model) -> str | None:
    """The parameter name of the output head's weight (None when tied to the embeddings)."""
    from ..patch import output_head

    head = output_head(model)
    emb = model.get_input_embeddings()
    if head is None or head.weight is emb.weight:
        return None
    for name, p in model.named_parameters():
        if p is head.weight:
            return name
    return None


def _grad_tensors(model, optimizer) -> list[torch.Tensor]:
    if hasattr(optimizer, "grad_tensors"):
        return list(optimizer.grad_tensors())
    return [p.grad for p in model.parameters() if p.grad is not None]


def _state_tensors(optimizer) -> list[torch.Tensor]:
    out = []
    if optimizer is None:
        return out
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.numel() > 0:
                out.append(v)
    return out


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += st.nbytes()
    return total


def _static(model, optimizer) -> tuple[dict, dict]:
    """Parameter, gradient and optimizer-state bytes of the step, in total and by module."""
    by: dict[str, dict[str, int]] = {}
    state_of = optimizer.state if optimizer is not None else {}
    for name, p in model.named_parameters():
        key = module_pattern(type(model).__name__ + "." + name.rsplit(".", 1)[0]) \
            if "." in name else "(model)"
        row = by.setdefault(key, {"parameters": 0, "gradients": 0, "optimizer": 0})
        row["parameters"] += p.numel() * p.element_size()
        st = state_of.get(p, {})
        row["optimizer"] += sum(v.numel() * v.element_size() for v in st.values()
                                if isinstance(v, torch.Tensor) and v.numel() > 0)
        if p.requires_grad and not hasattr(optimizer, "grad_tensors"):
            row["gradients"] += p.numel() * p.element_size()
    static = {"parameters": _nbytes(list(model.parameters()) + list(model.buffers())),
              "optimizer": _nbytes(_state_tensors(optimizer))}
    if hasattr(optimizer, "grad_tensors"):  # the sparse methods' compact gradients
        static["gradients"] = _nbytes(optimizer.grad_tensors())
    else:
        static["gradients"] = sum(p.numel() * p.element_size() for p in model.parameters()
                                  if p.requires_grad)
    return static, by


class _NoRandomFill(TorchDispatchMode):
    """Random in-place initialisers leave the (fake) tensor as it is."""

    FILLS = {torch.ops.aten.uniform_, torch.ops.aten.normal_, torch.ops.aten.random_,
             torch.ops.aten.exponential_, torch.ops.aten.bernoulli_,
             torch.ops.aten.trunc_normal_ if hasattr(torch.ops.aten, "trunc_normal_") else None}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.FILLS:
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _quiet():
    """transformers' warnings about the config are not the profile's business."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


@contextlib.contextmanager
def _unpadded_masks():
    """transformers' mask builder as it runs on the traced batch's real counterpart.

    On real tensors an unpadded, unpacked batch gets no attention mask: sdpa runs with
    is_causal and, for grouped-query attention, enable_gqa. The checks that decide it read
    values (is the padding mask all ones? do the positions restart?), which fake tensors do
    not have, so transformers takes them for a traced graph and builds the [B, 1, S, S] mask;
    sdpa with a mask then repeats K and V per head and saves those copies for backward. The
    traced batch is neither padded nor packed: answer the checks as its real counterpart
    would (on a Llama-shaped model the trace had predicted 2.5 MiB per layer more than the
    real step allocated, at 4 x 256 tokens)."""
    try:
        from transformers import masking_utils as mu
    except ImportError:
        yield
        return
    saved = {}
    if hasattr(mu, "find_packed_sequence_indices"):
        saved["find_packed_sequence_indices"] = mu.find_packed_sequence_indices
        mu.find_packed_sequence_indices = lambda position_ids: None
    if hasattr(mu, "_ignore_causal_mask_sdpa"):
        ignore = saved["_ignore_causal_mask_sdpa"] = mu._ignore_causal_mask_sdpa
        mu._ignore_causal_mask_sdpa = lambda padding_mask, *a, **k: ignore(None, *a, **k)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(mu, name, fn)

