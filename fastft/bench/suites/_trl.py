"""TRL's own loss code (trl >= 1.16) on the bench suites' inputs, without a whole TRL trainer.

- ``head_model``: a stand-in causal LM whose backbone returns given hidden states
  and whose output head is patched by TRL's ``add_fused_lm_head``, so that
  ``model(..., fused_lm_head=True)`` runs TRL's chunked log-prob kernel
  (``trl.kernels.ChunkedLogProbFunction``) exactly as SFTTrainer and GRPOTrainer
  call it.
- ``grpo_loss``: ``GRPOTrainer._compute_loss`` (and the per-token log-prob method it
  calls) bound to a minimal object that holds the attributes they read: one
  process, no gradient accumulation, no vLLM, no entropy mask. A real
  GRPOTrainer would also need a reward function, a generation set-up and a data
  loader; none of those enters its loss.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from types import SimpleNamespace

import torch
from torch import nn


def head_model(hidden_fn, weight: torch.Tensor, *, outputs=("log_probs",), temperature=1.0):
    """A causal LM whose backbone returns ``hidden_fn(input_ids)`` [B, L, H] and whose head
    is ``weight`` [V, H] (shared storage; trained if ``weight`` requires grad), with TRL's
    fused LM head added for ``outputs``."""
    from transformers import PretrainedConfig
    from trl.trainer.utils import add_fused_lm_head

    class Backbone(nn.Module):
        def forward(self, input_ids=None, **_):
            return SimpleNamespace(last_hidden_state=hidden_fn(input_ids))

    class HeadModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = PretrainedConfig()
            self.backbone = Backbone()
            self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                                     device="meta")
            self.lm_head.weight = nn.Parameter(weight.detach(),
                                               requires_grad=weight.requires_grad)

        @property
        def base_model(self):
            return self.backbone

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, *args, **kwargs):
            raise RuntimeError("only the fused head (fused_lm_head=True) is benchmarked")

    model = HeadModel()
    add_fused_lm_head(model, temperature=temperature, outputs=tuple(outputs))
    return model.train()


class _Accelerator:
    """What GRPOTrainer's loss asks of accelerate in a single process."""

    num_processes, is_main_process, sync_gradients = 1, True, True

    def __init__(self, autocast_dtype: torch.dtype | None, device_type: str):
        self.autocast_dtype, self.device_type = autocast_dtype, device_type

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def grpo_loss(model, *, max_completion_length: int, loss_type: str = "dapo", beta: float = 0.0,
              eps_low: float = 0.2, eps_high: float = 0.2, autocast_dtype=None,
              device_type: str = "cpu"):
    """``inputs -> loss`` by TRL's ``GRPOTrainer._compute_loss`` on ``model`` (whose output
    head, or its PEFT base model's, has TRL's fused head: see ``add_fused_lm_head``).
    ``inputs``: prompt_ids, prompt_mask, completion_ids, completion_mask, advantages,
    num_items_in_batch (and old_per_token_logps / ref_per_token_logps)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    class StandIn:
        _compute_loss = GRPOTrainer._compute_loss
        _get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies

    t = StandIn()
    t.model = model
    t.accelerator = _Accelerator(autocast_dtype, device_type)
    t.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    t.top_entropy_quantile, t.off_policy_mask_threshold = 1.0, None
    t.importance_sampling_level, t.beta, t.loss_type = "token", beta, loss_type
    t.epsilon_low, t.epsilon_high = eps_low, eps_high
    t.use_vllm, t.vllm_importance_sampling_correction = False, False
    t.current_gradient_accumulation_steps = 1
    t._entropy_bonus_enabled, t.aux_loss_enabled = False, False
    t.max_completion_length = max_completion_length

    def compute(inputs: dict) -> torch.Tensor:
        t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}  # not kept
        return t._compute_loss(model, inputs)

    return compute
