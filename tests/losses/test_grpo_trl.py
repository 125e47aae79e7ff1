"""fastft.losses.grpo against TRL's own GRPOTrainer._compute_loss (trl 1.16), not a transcription.

TRL's unbound ``GRPOTrainer._compute_loss`` and ``_get_per_token_logps_and_entropies``
run on a minimal object carrying the attributes they read (single process, no
gradient accumulation, no vLLM, no entropy mask) and on a stub causal LM whose
backbone returns our hidden states and whose head is patched by TRL's own
``add_fused_lm_head`` (so the log-probabilities, temperature and softcap are TRL's
code too). Prompt length 1: position i of the backbone output predicts completion
token i. One micro-batch, where TRL and fastft agree by definition.

How TRL counts the clip metrics (``_compute_loss``, after the loss):
  is_low_clipped  = (coef_1 < 1 - epsilon_low)  & (advantages < 0)
  is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
  clip_ratio/region_mean = mean of (low | high)
each a ``global_masked_mean``: over completion tokens (mask) at the token level,
but over sequences (one value each, mask ignored) at the sequence level, where
coef_1 is [B, 1]; coef_1 there is already capped by ``delta`` when delta is set.
"""

import contextlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fastft

from ..helpers import assert_close

pytestmark = pytest.mark.peers
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
VARIANTS = {
    "plain": dict(),
    "old": dict(old=True),
    "kl": dict(old=True, beta=0.04),
    "temp-softcap": dict(old=True, beta=0.04, temperature=0.7, softcap=3.0),
    "delta": dict(old=True, delta=1.5),
    "eps": dict(old=True, eps_low=0.1, eps_high=0.28),
}


def trl_grpo(h, w, tok, adv, mask, *, loss_type, level="token", beta=0.0, old=None, ref=None,
             delta=None, eps_low=0.2, eps_high=0.2, temperature=1.0, softcap=None,
             max_completion_length=None, num_items_in_batch=None):
    """(loss, metrics, head weight) from TRL's GRPOTrainer._compute_loss on a stub model."""
    from transformers import PretrainedConfig
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    B, C, H = h.shape

    class Backbone(nn.Module):
        def forward(self, input_ids=None, attention_mask=None, **kw):
            pad = h.new_zeros(B, input_ids.shape[1] - C, H)  # the last position predicts nothing
            return SimpleNamespace(last_hidden_state=torch.cat([h, pad], 1))

    class StubLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = PretrainedConfig(final_logit_softcapping=softcap)
            self.backbone = Backbone()
            self.lm_head = nn.Linear(H, w.shape[0], bias=False)
            self.lm_head.weight = nn.Parameter(w.detach().clone())

        @property
        def base_model(self):
            return self.backbone

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, *args, **kwargs):
            raise AssertionError("TRL must call the fused head")

    class Accelerator:
        num_processes, is_main_process = 1, True

        def gather(self, x):
            return x

        def reduce(self, x, reduction="sum"):
            return x

        def autocast(self):
            return contextlib.nullcontext()

    class Trainer:
        _compute_loss = GRPOTrainer._compute_loss
        _get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies

    model = StubLM()
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    model.train()
    t = Trainer()
    t.model, t.accelerator = model, Accelerator()
    t.args = SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1)
    t.top_entropy_quantile, t.off_policy_mask_threshold = 1.0, None
    t.importance_sampling_level, t.beta, t.loss_type = level, beta, loss_type
    t.epsilon_low, t.epsilon_high = eps_low, eps_high
    t.use_vllm, t.vllm_importance_sampling_correction = False, False
    t.current_gradient_accumulation_steps = 1
    t._entropy_bonus_enabled, t.aux_loss_enabled = False, False
    t.max_completion_length = max_completion_length or C
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    n = mask.sum() if num_items_in_batch is None else num_items_in_batch
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long),
                  prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=tok, completion_mask=mask.long(), advantages=adv,
                  num_items_in_batch=torch.as_tensor(n, dtype=torch.float32))
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = t._compute_loss(model, inputs)
    metrics = {k: v[-1] for k, v in t._metrics["train"].items()}
    return loss, metrics, model.lm_head.weight


def rollout(B=4, S=7, H=16, V=50, seed=0, *, old=False, beta=0.0, seq_shift=False, **_):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    tok = torch.randint(0, V, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.2).float()
    mask[0, -3:] = 0
    mask[2, :4] = 1
    adv = torch.tensor([1.0, -0.7, 0.5, -1.2])[:B]  # both signs: both clip sides can count
    with torch.no_grad():
        lp = torch.log_softmax(h @ w.t(), -1).gather(-1, tok[..., None])[..., 0]
    old_lp = ref_lp = None
    if old:
        old_lp = lp + 0.4 * torch.randn(B, S, generator=g)
        if seq_shift:  # whole sequences off-policy, so that sequence-level ratios clip too
            old_lp = old_lp + torch.tensor([-0.5, 0.4, 0.0, -0.3])[:B, None]
    if beta:
        ref_lp = lp + 0.2 * torch.randn(B, S, generator=g)
    return h, w, tok, adv, mask, old_lp, ref_lp


def run_both(loss_type, level, *, old=False, beta=0.0, delta=None, eps_low=0.2, eps_high=0.2,
             temperature=1.0, softcap=None, seq_shift=False, seed=0):
    h, w, tok, adv, mask, old_lp, ref_lp = rollout(old=old, beta=beta, seq_shift=seq_shift,
                                                   seed=seed)
    extra = {}
    if loss_type == "dr_grpo":
        extra["max_completion_length"] = 10
    if loss_type == "dapo":
        extra["num_items_in_batch"] = 37  # the accumulated batch's count, not this one's
    kw = dict(beta=beta, delta=delta, eps_low=eps_low, eps_high=eps_high,
              temperature=temperature, softcap=softcap, **extra)
    h_t = h.detach().clone().requires_grad_()
    loss_t, metrics_t, w_t = trl_grpo(h_t, w, tok, adv, mask, loss_type=loss_type, level=level,
                                      old=old_lp, ref=ref_lp, **kw)
    gh_t, gw_t = torch.autograd.grad(loss_t, (h_t, w_t))
    loss, metrics = fastft.losses.grpo(h, w, tok, adv, mask=mask, old_logps=old_lp,
                                       ref_logps=ref_lp, loss_type=loss_type,
                                       importance_level=level, entropy=True, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return (loss, gh, gw, metrics), (loss_t, gh_t, gw_t, metrics_t)


def seq_ratio_flags(seed=0, eps=0.2):
    """The sequence-level ratios of run_both(old=True, seq_shift=True), flagged by hand."""
    h, w, tok, adv, mask, old_lp, _ = rollout(old=True, seq_shift=True, seed=seed)
    with torch.no_grad():
        lp = torch.log_softmax(h @ w.t(), -1).gather(-1, tok[..., None])[..., 0]
    ratio = torch.exp(((lp - old_lp) * mask).sum(1) / mask.sum(1))
    return (ratio < 1 - eps) & (adv < 0), (ratio > 1 + eps) & (adv > 0), mask


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradients_match_trl(loss_type, level, variant):
    pytest.importorskip("trl")
    (loss, gh, gw, _), (loss_t, gh_t, gw_t, _) = run_both(loss_type, level, **VARIANTS[variant])
    assert loss.abs() > 1e-3  # a loss that is not trivially zero
    assert_close(loss, loss_t, 1e-5, "loss")
    assert_close(gh, gh_t, 1e-5, "grad_hidden")
    assert_close(gw, gw_t, 1e-5, "grad_weight")


@pytest.mark.interpreter
def test_triton_backend_matches_trl(monkeypatch):
    pytest.importorskip("trl")
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    (loss, gh, gw, _), (loss_t, gh_t, gw_t, _) = run_both("grpo", "token", old=True, beta=0.04,
                                                          temperature=0.7)
    assert_close(loss, loss_t, 1e-5, "loss")
    assert_close(gh, gh_t, 1e-5, "grad_hidden")
    assert_close(gw, gw_t, 1e-5, "grad_weight")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_token_level_metrics_match_trl(loss_type):
    """clip_low / clip_high / kl / entropy as TRL logs them, token level, no delta."""
    pytest.importorskip("trl")
    (_, _, _, m), (_, _, _, mt) = run_both(loss_type, "token", old=True, beta=0.04,
                                           temperature=0.9)
    assert mt["clip_ratio/low_mean"] > 0 and mt["clip_ratio/high_mean"] > 0
    assert_close(m["clip_low"], torch.tensor(mt["clip_ratio/low_mean"]), 1e-6, "clip_low")
    assert_close(m["clip_high"], torch.tensor(mt["clip_ratio/high_mean"]), 1e-6, "clip_high")
    # low and high are disjoint (ratio < 1 - eps with A < 0, ratio > 1 + eps with A > 0)
    assert_close(m["clip_low"] + m["clip_high"], torch.tensor(mt["clip_ratio/region_mean"]),
                 1e-6, "clip region")
    assert_close(m["kl"], torch.tensor(mt["kl"]), 1e-5, "kl")
    assert_close(m["entropy"], torch.tensor(mt["entropy"]), 1e-5, "entropy")


def test_trl_counts_sequence_level_clips_per_sequence():
    """Pins TRL's definition (and the inputs of the test below): one flag per sequence."""
    pytest.importorskip("trl")
    _, (_, _, _, mt) = run_both("dapo", "sequence", old=True, seq_shift=True)
    low, high, mask = seq_ratio_flags()
    assert low.any() and high.any()
    assert mt["clip_ratio/low_mean"] == pytest.approx(low.float().mean().item(), abs=1e-7)
    assert mt["clip_ratio/high_mean"] == pytest.approx(high.float().mean().item(), abs=1e-7)
    # token-weighted means (what fastft reports) differ on these inputs
    n = mask.sum(1)
    assert abs((low * n).sum() / n.sum() - low.float().mean()) > 0.01


def test_sequence_level_clip_metrics_match_trl():
    pytest.importorskip("trl")
    (_, _, _, m), (_, _, _, mt) = run_both("dapo", "sequence", old=True, seq_shift=True)
    assert_close(m["clip_low"], torch.tensor(mt["clip_ratio/low_mean"]), 1e-6, "clip_low")
    assert_close(m["clip_high"], torch.tensor(mt["clip_ratio/high_mean"]), 1e-6, "clip_high")


def test_trl_counts_clip_high_after_the_delta_cap():
    """Pins TRL's definition (and the inputs of the test below): delta <= 1 + eps_high
    leaves no high clips in TRL's metric, though uncapped ratios above 1 + eps_high exist."""
    pytest.importorskip("trl")
    _, (_, _, _, mt) = run_both("dapo", "token", old=True)
    _, (_, _, _, mt_delta) = run_both("dapo", "token", old=True, delta=1.1)
    assert mt["clip_ratio/high_mean"] > 0 and mt_delta["clip_ratio/high_mean"] == 0
    assert mt_delta["clip_ratio/low_mean"] == mt["clip_ratio/low_mean"] > 0


def test_clip_high_with_delta_below_the_clip_matches_trl():
    pytest.importorskip("trl")
    (_, _, _, m), (_, _, _, mt) = run_both("dapo", "token", old=True, delta=1.1)
    assert_close(m["clip_low"], torch.tensor(mt["clip_ratio/low_mean"]), 1e-6, "clip_low")
    assert_close(m["clip_high"], torch.tensor(mt["clip_ratio/high_mean"]), 1e-6, "clip_high")
