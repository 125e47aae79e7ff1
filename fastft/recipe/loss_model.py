"""The module the trainer differentiates: batch -> hidden states -> fused loss.

It calls the causal LM's decoder for the final hidden states and computes the
objective with fastft.losses from the output head's weight, so no [B, S, V]
logits ever exist. Distributed wrappers (DDP, FSDP2) wrap this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..patch import decoder, logit_transform, next_token_labels, output_head


class CausalLMLoss(nn.Module):
    def __init__(self, model: nn.Module, config):
        super().__init__()
        self.model = model
        self.cfg = config
        self.softcap, self.temperature = logit_transform(model.config)

    def hidden(self, batch: dict) -> torch.Tensor:
        keys = ("input_ids", "attention_mask", "position_ids")
        out = decoder(self.model)(**{k: batch[k] for k in keys if k in batch}, use_cache=False)
        return out[0]

    def head_bias(self) -> torch.Tensor | None:
        """The output head's bias (Phi-1/Phi-2 have one; most heads none), given to every loss."""
        return getattr(output_head(self.model), "bias", None)

    def forward(self, batch: dict, *, num_items: torch.Tensor, num_sequences=None, seed: int = 0,
                ref_hidden: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
                ref_bias: torch.Tensor | None = None):
        """(loss, metrics) of one micro-batch; ``num_items`` / ``num_sequences``: the tokens /
        sequences of the whole step (per process), the loss's normalisers."""
        weight = output_head(self.model).weight
        hidden = self.hidden(batch)
        if "completion_ids" in batch:
            return self._grpo(batch, hidden, weight, num_items, num_sequences)
        labels = next_token_labels(batch["labels"])
        cfg, common = self.cfg, dict(num_items_in_batch=num_items, softcap=self.softcap,
                                     bias=self.head_bias())
        if "weights" in batch:  # key-token weighting: the weight of the token each row predicts
            common["weights"] = F.pad(batch["weights"], (0, 1))[..., 1:]
        if cfg.loss == "ce":
            loss = losses.cross_entropy(hidden, weight, labels, temperature=self.temperature,
                                        **common)
        elif cfg.loss == "dft":
            loss = losses.dft(hidden, weight, labels, temperature=self.temperature, **common)
        elif cfg.loss == "asft":
            loss = losses.asft(hidden, weight, labels, ref_hidden=ref_hidden,
                               ref_weight=ref_weight, ref_bias=ref_bias, kl_coef=cfg.kl_coef,
                               temperature=self.temperature, **common)
        else:
            loss = losses.otr(hidden, weight, labels, k=cfg.otr_k, beta=cfg.otr_beta,
                              temperature=self.temperature,
                              sampling_temperature=cfg.otr_temperature, seed=seed, **common)
        return loss, {}

    def _grpo(self, batch, hidden, weight, num_items, num_sequences):
        cfg = self.cfg
        P = batch["prompt_len"]
        C = batch["completion_ids"].shape[1]
        h = hidden[:, P - 1:P - 1 + C]  # the positions that predict the completion tokens
        return losses.grpo(
            h, weight, batch["completion_ids"], batch["advantages"],
            mask=batch["completion_mask"], ref_logps=batch.get("ref_logps"), beta=cfg.beta,
            eps_low=cfg.eps_low, eps_high=cfg.eps_high, loss_type=cfg.loss_type,
            importance_level=cfg.importance_level,
            temperature=self.temperature * cfg.sampling_temperature,
            delta=cfg.delta, num_items_in_batch=num_items, num_sequences_in_batch=num_sequences,
            max_completion_length=cfg.max_completion_length, softcap=self.softcap,
            bias=self.head_bias())

    @torch.no_grad()
    def logprobs(self, batch: dict) -> torch.Tensor:
        """Per-token log-probabilities of the completion tokens (GRPO's reference policy)."""
        hidden = self.hidden(batch)
        P, C = batch["prompt_len"], batch["completion_ids"].shape[1]
        return losses.selective_logprobs(
            hidden[:, P - 1:P - 1 + C], output_head(self.model).weight, batch["completion_ids"],
            temperature=self.temperature * self.cfg.sampling_temperature, softcap=self.softcap,
            bias=self.head_bias())
