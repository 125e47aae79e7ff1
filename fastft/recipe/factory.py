"""The method and the optimizer a TrainConfig asks for (the Trainer's and the profiler's)."""

from __future__ import annotations

import torch

from .. import methods as _methods
from ..errors import check
from .config import TrainConfig


def make_method(cfg: TrainConfig):
    def lora(dropout: float):
        return _methods.LoRA(r=cfg.lora_r or _methods.LoRA.r, alpha=cfg.lora_alpha,
                             dropout=dropout, target_modules=cfg.target_modules,
                             rslora=cfg.rslora, adapter_dtype=cfg.adapter_dtype)

    if cfg.method == "lora":
        return lora(cfg.lora_dropout)
    if cfg.method == "lora-sb":  # its own rank default (96); initialised with the run's lr
        return _methods.LoRASB(r=cfg.lora_r or _methods.LoRASB.r,
                               target_modules=cfg.target_modules, lr=cfg.lr,
                               warmup_ratio=cfg.warmup_ratio, adapter_dtype=cfg.adapter_dtype)
    if cfg.method == "full":
        return _methods.Full()
    if cfg.method == "lift":
        return _methods.LIFT(lora_rank=cfg.lift_lora_rank, filter_rank=cfg.lift_filter_rank,
                             refresh_every=cfg.lift_refresh_every, seed=cfg.seed)
    if cfg.method == "hft":
        return _methods.HFT(seed=cfg.seed if cfg.hft_seed is None else cfg.hft_seed)
    if cfg.method == "green":
        return _methods.GreenTrainer(rho=cfg.rho, interval=cfg.green_interval,
                                     base=lora(cfg.lora_dropout) if cfg.green_base == "lora"
                                     else _methods.Full())
    if cfg.method == "roste":
        adapter = lora(0.0) if cfg.roste_lora else None  # RoSTE folds it: no dropout
        return _methods.RoSTE(w_bits=cfg.w_bits, a_bits=cfg.a_bits, kv_bits=cfg.kv_bits,
                              clip_ratio=cfg.quant_clip_ratio, symmetric=cfg.quant_symmetric,
                              rotations=cfg.rotations,
                              calibration_samples=cfg.calibration_samples, adapter=adapter)
    return _methods.LTSFT(proportion=cfg.ltsft_proportion)


def method_name(method) -> str | None:
    """The TrainConfig.method of a prepared method object (None for a user's own class)."""
    names = {_methods.LoRA: "lora", _methods.LoRASB: "lora-sb", _methods.Full: "full",
             _methods.GreenTrainer: "green",
             _methods.LIFT: "lift", _methods.HFT: "hft", _methods.LTSFT: "ltsft",
             _methods.RoSTE: "roste"}
    return names.get(type(method))


def build_optimizer(method, model, cfg: TrainConfig):
    """The optimizer a run of ``method`` uses: the method's own (SparseAdamW for the sparse
    masks), else AdamW over the trainable parameters (torch's fused one where it runs)."""
    opt = None
    if hasattr(method, "make_optimizer"):
        opt = method.make_optimizer(model, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                    eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if opt is None:
        params = [p for p in model.parameters() if p.requires_grad]
        check(bool(params), "no parameter of the model is trainable")
        fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=fused)
    if hasattr(opt, "attach_hooks"):
        opt.attach_hooks()
    return opt
