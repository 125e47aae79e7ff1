"""fastft.prepare: put fastft's fused kernels into a Hugging Face causal LM, in place.

Patching is by module type and name, with no per-model code: the ``nn.Linear``
(and transformers ``Conv1D``, GPT-2's linear layer) children named by
``target_modules`` become LoRA / LoRA-SB layers, and with
``loss_head=True`` a call with ``labels`` computes the loss with the fused
cross-entropy from the final hidden states and the output head's weight (the
[B, S, V] logits never exist); a call without labels returns logits as before.
An output head with a bias (Phi) is passed to the loss with its bias.
``merge`` folds the adapters into W0 and returns a plain model (or, with
``keep=True``, keeps the layers and marks them merged; ``unmerge`` undoes it);
``unpatch`` restores the original modules and forward.
"""

from __future__ import annotations

import contextlib
import re
import types

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FastftError, check
from .methods.lora import (
    Full,
    LoRA,
    LoRALinear,
    LoRASB,
    LoRASBLinear,
    adapter_dtype,
    adapter_layers,
    linear_types,
)


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def linear_names(model: nn.Module) -> list[str]:
    """Paths of every nn.Linear or Conv1D (GPT-2) layer except the output head.

    Other weights are not linear layers here: an MoE's experts stored as 3-D
    parameters (transformers 5's Mixtral, Qwen2-MoE) and a router that is not an
    nn.Linear (Mixtral's MixtralTopKRouter) are not adapted.
    """
    head = output_head(model)
    kinds = linear_types()
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and m is not head]


def resolve_targets(model: nn.Module, target_modules) -> list[str]:
    """The module paths that ``target_modules`` names ("all-linear", names, or a regex)."""
    names = linear_names(model)
    if target_modules == "all-linear":
        chosen = names
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise FastftError(f"target_modules {target_modules!r} is not a valid regex: {e}") from e
        chosen = [n for n in names if pattern.fullmatch(n)]
    else:
        wanted = set(target_modules)
        chosen = [n for n in names if n in wanted or n.rsplit(".", 1)[-1] in wanted]
    if not chosen:
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise FastftError(
            f"target_modules={target_modules!r} names no linear layer of this model; its linear "
            f"layers are: {', '.join(short)} (or use 'all-linear', or a regex over full paths "
            f"such as {names[0] if names else 'model.layers.0.self_attn.q_proj'!r})")
    return chosen


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def prepare(model: nn.Module, method=None, *, loss_head: bool = True) -> nn.Module:
    """Patch ``model`` in place for fine-tuning with ``method``; returns it.

    ``method``: ``fastft.LoRA(...)``, ``fastft.LoRASB(...)``, ``fastft.Full()`` (default
    LoRA()), or any object with ``prepare_model`` (fastft.methods.base.Method).
    LoRA and LoRA-SB freeze every other parameter.
    """
    method = LoRA() if method is None else method
    check(isinstance(method, (LoRA, LoRASB, Full)) or hasattr(method, "prepare_model"),
          "method must be fastft.LoRA, fastft.LoRASB, fastft.Full or a sparse method "
          f"(fastft.LIFT, fastft.HFT, fastft.LTSFT); got {type(method).__name__}")
    check(not hasattr(model, "_fastft"), "this model is already prepared by fastft: call "
          "fastft.unpatch(model) (or fastft.merge) first")
    check(isinstance(model, nn.Module), "prepare needs a torch.nn.Module (a transformers model)")
    targets = list(method.prepare_model(model)) if hasattr(method, "prepare_model") \
        else apply_method(model, method)  # prepare_model: fastft.methods.base.Method
    model._fastft = types.SimpleNamespace(method=method, targets=targets, forward=None)
    if loss_head:
        _patch_forward(model)
    return model


def apply_method(model: nn.Module, method) -> list[str]:
    """Full: every parameter trains; LoRA / LoRA-SB: adapters on the target layers, all
    else frozen. Returns the adapted paths."""
    if isinstance(method, Full):
        for p in model.parameters():
            p.requires_grad_(True)
        return []
    targets = resolve_targets(model, method.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for path in targets:
        base = model.get_submodule(path)
        dt = adapter_dtype(base.weight.dtype, method.adapter_dtype)
        layer = LoRASBLinear(base, method.r, dtype=dt) if isinstance(method, LoRASB) else \
            LoRALinear(base, method.r, method.alpha, method.dropout, method.rslora, dtype=dt)
        _set(model, path, layer.train(base.training))  # the model's train / eval mode
    return targets


def _state(model: nn.Module):
    state = getattr(model, "_fastft", None)
    check(state is not None, "this model was not prepared by fastft")
    return state


def _restore(model: nn.Module) -> nn.Module:
    """Put the base layers and the class's forward back, W0 as it is now."""
    state = _state(model)
    for path, layer in adapter_layers(model).items():
        _set(model, path, layer.base_layer.train(layer.training))
    if state.forward is not None:
        del model.forward  # the instance attribute; the class's forward shows through again
    del model._fastft
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original linear layers and forward back (adapters are dropped).

    Layers merged by ``merge(model, keep=True)`` are unmerged first, so W0 is the
    original again (to within one rounding of its dtype).
    """
    unmerge(model)
    return _restore(model)


@torch.no_grad()
def merge(model: nn.Module, keep: bool = False) -> nn.Module:
    """Fold every adapter into its W0: W0 += s B R A (fp32 math, rounded once to W0's dtype).

    ``keep=False``: unpatch, returning a plain transformers model. ``keep=True``: the
    layers stay in place, marked merged: their forward runs W0 alone, the adapters are
    kept untouched (and are saved by ``save_adapter``), and :func:`unmerge` subtracts the
    same update again. Layers already merged are not folded twice.
    """
    _state(model)
    for layer in adapter_layers(model).values():
        layer.merge()
    return model if keep else _restore(model)


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge(model, keep=True)``: W0 -= s B R A (fp32 math) on each merged layer.

    W0 comes back to within one rounding of W0 + delta in its dtype, and bit-exact
    wherever the merge lost nothing: every element whose W0 + delta kept W0's sign and
    power of two and did not round on a tie (for a small LoRA delta, most of them;
    elsewhere the merge rounded W0's last bits away and no subtraction can restore
    them). A no-op on layers that are not merged.
    """
    _state(model)
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the model as its frozen base (the reference policy of ASFT and GRPO)."""
    layers = list(adapter_layers(model).values())
    check(not any(layer.merged for layer in layers), "the adapters are merged into W0 "
          "(fastft.merge(model, keep=True)): call fastft.unmerge(model) before disabling them")
    old = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, old):
            layer.disabled = was


def logit_transform(config) -> tuple[float | None, float]:
    """(softcap, temperature) that reproduce the model's own logits from h W^T."""
    softcap = getattr(config, "final_logit_softcapping", None) or None
    temperature = 1.0
    if getattr(config, "logits_scaling", None):  # Granite divides
        temperature = float(config.logits_scaling)
    if getattr(config, "logit_scale", None):  # Cohere multiplies
        temperature = 1.0 / float(config.logit_scale)
    return softcap, temperature


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label of each position is the next token, as transformers shifts (-100 at the end)."""
    return F.pad(labels, (0, 1), value=-100)[..., 1:]


def decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    if dec is None or dec is model:
        dec = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    check(isinstance(dec, nn.Module), f"{type(model).__name__} has no decoder to call for "
          "hidden states: use loss_head=False")
    return dec


def _patch_forward(model: nn.Module) -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .losses import cross_entropy

    head = output_head(model)
    check(isinstance(head, nn.Linear) or isinstance(getattr(head, "weight", None), torch.Tensor),
          f"{type(model).__name__} has no output embedding (lm_head): use loss_head=False")
    original = type(model).forward
    decoder(model)  # fails now, not at the first call, if there is none

    # TRL's SFTTrainer wraps this (instance) forward with its own chunked LM head
    # (trl add_fused_lm_head): its fused_lm_head=True calls run model.base_model, our LoRA
    # layers included, and give the log-probs, entropy and top-1 it logs without [B, S, V]
    # logits; this forward serves its other calls. A model prepared after that wrapping
    # would drop it, so such a call fails here instead of being answered without them.
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        check(not kwargs.get("fused_lm_head"), "fused_lm_head=True reached fastft's forward: "
              "TRL's fused LM head was added before fastft.prepare replaced the forward; "
              "prepare the model before creating the TRL trainer")
        if labels is None:
            return original(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        kwargs.pop("logits_to_keep", None)
        # looked up on self, not captured: a deep copy of the model runs its own modules
        out = decoder(self)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out[0]
        softcap, temperature = logit_transform(self.config)
        if shift_labels is None:
            shift_labels = next_token_labels(labels)
        loss = cross_entropy(hidden, output_head(self).weight, shift_labels.to(hidden.device),
                             num_items_in_batch=num_items, softcap=softcap,
                             temperature=temperature, bias=getattr(output_head(self), "bias", None))
        return CausalLMOutputWithPast(loss=loss, logits=None,
                                      past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))

    model.forward = types.MethodType(forward, model)
    model._fastft.forward = forward
