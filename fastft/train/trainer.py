"""fastft.Trainer: the training loop, readable top to bottom.

    batches -> hidden states -> fused loss -> backward (x grad_accum) -> clip -> optimizer step

SFT (ce, dft, asft, otr) and GRPO (rollouts with the model's own generate,
group advantages, the fused GRPO loss) on a model patched by fastft.prepare.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path

import torch

from .. import losses, quantize
from ..errors import FastftError, check
from ..methods.lora import adapter_layers
from ..patch import disable_adapters, next_token_labels, output_head, prepare
from ..recipe import CausalLMLoss, TrainConfig, build_optimizer, make_method, method_name
from . import checkpoint, data, distributed, rollout
from .runlog import RunLog, peak_memory_mb, progress, summary_table


def lr_lambda(cfg: TrainConfig, total: int):
    warm = int(cfg.warmup_ratio * total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total - warm)
        return max(0.0, 1.0 - frac) if cfg.schedule == "linear" else \
            0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return f


def mask_token(cfg, tokenizer) -> int:
    """Masked Thought's replacement token: ``mask_token_id`` when named (neither the pad
    nor the EOS token: the model must not learn to read a masked token as padding or as
    the end), else the tokenizer's unk when it is neither, else an error that says how
    to name one. Llama-3 and Qwen tokenizers pad with their EOS and have no unk."""
    special: dict[int, str] = {}
    for name, t in (("pad", tokenizer.pad_token_id), ("EOS", tokenizer.eos_token_id)):
        if t is not None:
            special[t] = f"{special[t]}/{name}" if t in special else name
    tid = cfg.mask_token_id
    if tid is not None:
        check(tid not in special, f"mask_token_id={tid} is the tokenizer's "
              f"{special.get(tid)} token: Masked Thought needs a token that is neither pad nor "
              "EOS (its unk, or an unused one: --mask-token-id ID)")
        check(tid < len(tokenizer), f"mask_token_id={tid} is outside the tokenizer's "
              f"{len(tokenizer)} tokens")
        return tid
    unk = tokenizer.unk_token_id
    why = "no unk" if unk is None else f"unk={unk} is its {special.get(unk)}"
    check(unk is not None and unk not in special, "Masked Thought needs a mask token: this "
          f"tokenizer has no unk token that is neither its pad nor its EOS ({why}): name one "
          "with --mask-token-id ID (TrainConfig.mask_token_id), e.g. a reserved or unused "
          "special token")
    return unk


class Trainer:
    def __init__(self, model, tokenizer, train_data, config: TrainConfig, *, reward_fn=None,
                 eval_data=None):
        self.cfg = cfg = config.validate()
        check(cfg.objective != "grpo" or callable(reward_fn),
              "objective 'grpo' needs reward_fn(prompts, completions, **columns) -> rewards")
        self.dist = distributed.setup()
        self.device = self.dist.device
        torch.manual_seed(cfg.seed)  # before any random initialisation: adapters, LoRA-SB
        self.tokenizer = tokenizer
        check(tokenizer.pad_token_id is not None or tokenizer.eos_token_id is not None,
              "the tokenizer has neither a pad nor an eos token: set one, e.g. "
              "tokenizer.pad_token = '<pad>' (and resize the embeddings if it is new)")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.mask_token_id = mask_token(cfg, tokenizer) if cfg.masked_thought > 0 else None
        self.reward_fn = reward_fn
        self.model = model.to(self.device)
        if not hasattr(model, "_fastft"):
            prepare(model, make_method(cfg))
        self.method = model._fastft.method
        prepared = method_name(self.method)
        check(prepared in (None, cfg.method), f"the model was prepared with "
              f"{type(self.method).__name__} ({prepared}) but TrainConfig.method is "
              f"{cfg.method!r}: set method={prepared!r}, or pass an unprepared model")
        if cfg.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
        # bf16 autocast: by default on CUDA; bf16=true asks for it on the CPU too
        bf16 = str(cfg.bf16).lower()
        self.autocast = bf16 == "true" or (bf16 == "auto" and self.device.type == "cuda")
        self.loss_model = CausalLMLoss(model, cfg)
        self.ref_model = self._reference_model()
        self.rows = self._load(train_data, "data")
        self._perm = (None, None)  # (epoch, its permutation of the rows)
        self.eval_rows = self._load(eval_data, "eval_data") if eval_data is not None else None
        self.global_batch = (cfg.prompts_per_step if cfg.objective == "grpo"
                             else cfg.batch_size * cfg.grad_accum) * self.dist.world
        # rows a step reads: with UDS, the candidates it scores to keep global_batch of them
        # (after uds_start_step plain steps; train/select.py)
        if cfg.select:
            from .select import run_steps

            self.total_steps = cfg.max_steps or run_steps(cfg, self.dist.world, len(self.rows))
        else:
            self.total_steps = cfg.max_steps or max(1, math.ceil(
                cfg.epochs * len(self.rows) / self.global_batch))
        self.fsdp = self._fsdp()
        # the sparse methods average their gradients themselves (see distributed.py)
        self.own_sync = self.dist.on and hasattr(self.method, "prepare_model")
        self.engine = self.loss_model if self.own_sync else \
            distributed.wrap(self.loss_model, self.dist, fsdp=self.fsdp)
        self.out = Path(cfg.output_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.objective}")
        checkpoint.check_output_dir(self.out, overwrite=cfg.overwrite, resume_from=cfg.resume_from)
        self.dist.barrier()  # every process has looked before the first writes into it
        if cfg.resume_from and hasattr(self.method, "load_state_dict"):
            # first: the method's state decides which optimizer it makes (LT-SFT's phase)
            self.method.load_state_dict(checkpoint.load_method_state(cfg.resume_from))
        self.optimizer = self._optimizer()
        self.scheduler = self._schedule()
        self.state = {"step": 0, "position": 0, "phase": 0, "epoch": -1}
        if cfg.resume_from:
            self.state = checkpoint.load_checkpoint(
                cfg.resume_from, model=self.model, optimizer=self.optimizer,
                scheduler=self.scheduler, sharded_root=self.engine if self.fsdp else None)["state"]

    # ---- set-up -------------------------------------------------------------------------

    def _fsdp(self) -> bool:
        check(not self.cfg.fsdp or self.cfg.method == "full",
              "fsdp=true shards full fine-tuning; adapters and sparse methods train under DDP")
        return self.dist.on and self.cfg.fsdp

    def _load(self, source, name):
        recs = data.read_records(source, name, skip_invalid=self.cfg.skip_invalid)
        if self.cfg.objective == "grpo":
            rows, stats = data.read_prompts(recs, self.cfg.skip_invalid, self.tokenizer)
        else:
            rows, stats = data.tokenize_sft(
                recs, self.tokenizer, max_length=self.cfg.max_length,
                truncation=self.cfg.truncation, completion_only=self.cfg.completion_only,
                skip_invalid=self.cfg.skip_invalid, key_tokens=self.cfg.key_tokens,
                key_max_weight=self.cfg.key_max_weight, key_norm=self.cfg.key_norm)
        if self.dist.main:  # skipped (skip_invalid), truncated, dropped: one line each
            for line in stats.lines(name, self.cfg.max_length):
                print(line)
        return rows

    def _reference_model(self):
        """The frozen reference policy: the base model (adapters off), or a frozen copy."""
        cfg = self.cfg
        need = cfg.loss == "asft" if cfg.objective == "sft" else cfg.beta > 0
        if not need or adapter_layers(self.model):
            return None
        ref = copy.deepcopy(self.model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return CausalLMLoss(ref, cfg)

    def _optimizer(self):
        return build_optimizer(self.method, self.model, self.cfg)

    # ---- the loop -----------------------------------------------------------------------

    def train(self) -> dict:
        cfg, d = self.cfg, self.dist
        if d.main:
            checkpoint.start_run(self.out, cfg.to_dict(), overwrite=cfg.overwrite,
                                 resume_from=cfg.resume_from)
        phases = self.method.phases() if hasattr(self.method, "phases") else ["train"]
        self.log = log = RunLog(
            self.out, self.total_steps, enabled=d.main, progress=cfg.progress,
            title=f"{cfg.objective}/{cfg.loss if cfg.objective == 'sft' else cfg.loss_type}")
        if cfg.resume_from:  # the rows past the checkpoint are logged again
            log.keep_until(self.state["phase"], self.state["step"], phases)
        # training mode, as transformers' Trainer sets it: from_pretrained returns a model in
        # eval mode, whose dropout (LoRA's included) would otherwise stay off
        self.model.train()
        self._initialize_method()
        t0, tokens, last = time.perf_counter(), 0, {}
        try:
            for p in range(self.state["phase"], len(phases)):
                if self.state["step"] == 0 and hasattr(self.method, "on_phase_begin"):
                    new = self.method.on_phase_begin(self.model, self.optimizer, phases[p])
                    if new is not None:
                        self._replace_optimizer(new)
                while self.state["step"] < self.total_steps:
                    metrics = self.step()
                    step, norm = self.state["step"], metrics.pop("grad_norm")
                    tokens += metrics.pop("tokens")
                    if step % cfg.log_every == 0 or step == self.total_steps:
                        last = self._record(step, metrics, norm, tokens, t0, phases[p])
                        log.step(step, last)
                    if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
                        self.save()
                if p + 1 < len(phases):  # the next phase runs the whole schedule again
                    self.state.update(step=0, phase=p + 1)
                    self.scheduler = self._schedule()
        finally:
            log.close()
        ckpt = self.save()
        quantized = None
        if d.main and quantize.exportable(self.model):  # RoSTE: the deployable model
            quantized = quantize.export(self.model, self.out / "quantized",
                                        tokenizer=self.tokenizer)
        summary = {"steps": self.state["step"], "final_loss": last.get("loss"),
                   "tokens_per_s": last.get("tokens_per_s"),
                   "wall_seconds": round(time.perf_counter() - t0, 1),
                   "peak_memory_mb": round(peak_memory_mb(self.device), 1),
                   "checkpoint": str(ckpt)}
        if quantized is not None:
            summary["quantized"] = str(quantized)
        if cfg.objective == "grpo":
            summary["reward_mean"] = last.get("reward_mean")
        if self.eval_rows is not None and cfg.objective == "sft":
            summary["eval_loss"] = self.evaluate()
        if d.main:
            print(summary_table(f"fastft {cfg.objective} ({cfg.method}) in {self.out}", summary))
        return summary

    def step(self, batch=None) -> dict:
        """One optimizer step, as ``train`` runs it: the forward and backward of the step's
        micro-batches, then :meth:`finish_step`. ``batch``: None (the next of the training
        data), or for SFT a collated batch or a list of them (the micro-batches of one step),
        for GRPO a list of prompt rows. Returns the step's metrics: ``loss``, ``grad_norm``,
        ``tokens`` and the objective's own (GRPO's rewards, KL, clip shares and times)."""
        if batch is not None:
            self._check_batch(batch)
        if self.cfg.objective == "grpo":
            metrics, n_tok = self._grpo_step(batch)
        else:
            metrics, n_tok = self._sft_step(batch)
        norm = self.finish_step(metrics["loss"])
        return dict(metrics, grad_norm=norm, tokens=n_tok)

    def _check_batch(self, batch) -> None:
        """A batch given to :meth:`step` has the shape its objective reads."""
        items = [batch] if isinstance(batch, dict) else batch
        if self.cfg.objective == "grpo":
            check(isinstance(batch, (list, tuple)) and bool(batch)
                  and all(isinstance(r, dict) and "prompt" in r for r in batch),
                  "Trainer.step(batch) for GRPO takes a list of prompt rows (dicts with a "
                  "'prompt'), as the training data holds them")
            return
        check(isinstance(items, (list, tuple)) and bool(items)
              and all(isinstance(b, dict) and isinstance(b.get("input_ids"), torch.Tensor)
                      and isinstance(b.get("labels"), torch.Tensor) for b in items),
              "Trainer.step(batch) for SFT takes a collated batch (a dict with 'input_ids' and "
              "'labels' tensors) or a list of them (the step's micro-batches)")

    def finish_step(self, loss: torch.Tensor) -> torch.Tensor:
        """The end of a step once its gradients are in ``.grad``: their sync across processes
        (where the Trainer syncs them itself), the clip, the check that ``loss`` and the norm
        are finite, the optimizer's and the schedule's step, the method's step hook. Returns
        the gradient norm."""
        step = self.state["step"] + 1
        if self.own_sync:
            distributed.average_(self._grad_tensors(), self.dist)
        norm = self._clip()
        self._check_finite(step, loss, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] = step
        if hasattr(self.method, "on_step_end"):
            self.method.on_step_end(self.model, self.optimizer, step)
        return norm

    def _sft_step(self, micro=None):
        """One optimizer step's worth of micro-batches: forward, loss, backward."""
        cfg, d = self.cfg, self.dist
        if micro is None:
            micro = self._next_sft_batches()
        elif isinstance(micro, dict):
            micro = [micro]
        n_items = d.all_sum(sum(data.item_weight(b) for b in micro).to(self.device)) / d.world
        if hasattr(self.method, "reselect"):  # GreenTrainer: which tensors train this epoch
            self.method.reselect(self.model, self.optimizer, self.state["epoch"],
                                 lambda: self._backward(micro, n_items),
                                 lambda: self._green_costs(self._global_shape(micro[0])),
                                 reduce=lambda t: d.all_sum(t) / d.world)
        total = torch.zeros((), device=self.device)
        for m, batch in enumerate(micro):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            batch = self._masked_thought(batch, m)
            ref = {}
            if cfg.loss == "asft":  # the frozen reference: hidden states and head
                ref = {"ref_hidden": self._reference("hidden", batch), **self._reference_head()}
            seed = (cfg.seed * 1_000_003 + self.state["step"] * 1009 + m * 31 + d.rank) % 2**62
            with distributed.no_sync(self.engine, m == len(micro) - 1), self._autocast():
                loss, _ = self.engine(batch, num_items=n_items, seed=seed, **ref)
                loss.backward()
            total += loss.detach()
        n_tok = sum(int(b["input_ids"].numel()) for b in micro) * d.world
        return {"loss": d.all_sum(total) / d.world}, n_tok

    def _backward(self, micro: list[dict], n_items) -> None:
        """Forward and backward of ``micro`` into .grad, averaged over processes (no metrics,
        no Masked Thought): GreenTrainer's importance probe."""
        for batch in micro:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self._autocast():
                loss, _ = self.loss_model(batch, num_items=n_items)
                loss.backward()
        if self.dist.on:
            distributed.average_(self._grad_tensors(), self.dist)

    def _global_shape(self, batch: dict) -> tuple[int, int]:
        """(rows, columns) of ``batch`` over every process: rows summed, the longest padded
        length, so that every rank (and a single process on the same global batch) measures
        the same costs and selects the same tensors."""
        d = self.dist
        rows, cols = batch["input_ids"].shape
        rows = d.all_sum(torch.tensor(rows, device=self.device))
        cols = d.all_max(torch.tensor(cols, device=self.device))
        return int(rows), int(cols)

    def _green_costs(self, shape):
        """GreenTrainer's per-tensor backward FLOPs for batches of ``shape``, measured by
        fastft.profile on fake-traced steps of this model's config."""
        from ..profile.green_costs import measure_costs

        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        return measure_costs(self.model.config, self.method.base, batch_size=int(shape[0]),
                             seq_len=int(shape[1]), dtype=dtype)

    def _masked_thought(self, batch: dict, micro: int) -> dict:
        """Masked Thought: completion input tokens replaced by the mask token (:func:`mask_token`)
        with probability p, ramping linearly to ``masked_thought`` over the first 2/3 of the
        steps; the labels and the prompt are untouched (the prompt/completion split of each
        record, also when ``completion_only=False`` labels the prompt, as the paper masks
        only the response); drawn from (seed, step, micro-batch, rank)."""
        cfg = self.cfg
        if cfg.masked_thought <= 0:
            return batch
        ramp = max(1.0, 2.0 / 3.0 * self.total_steps)
        p = cfg.masked_thought * min(1.0, self.state["step"] / ramp)
        gen = torch.Generator().manual_seed(
            (cfg.seed * 7_919 + self.state["step"] * 104_729 + micro * 131 + self.dist.rank)
            % 2**62)
        ids = batch["input_ids"]
        hit = torch.rand(ids.shape, generator=gen).to(ids.device) < p
        # the completion's tokens, from the prompt/completion split (data.collate), whether
        # the prompt is learnt (completion_only=False) or not; rows built by hand without
        # the split: the labelled tokens
        hit &= batch["completion_tokens"] if "completion_tokens" in batch \
            else batch["labels"] != -100
        return dict(batch, input_ids=torch.where(hit, self.mask_token_id, ids))

    def _grpo_step(self, rows=None):
        """Sample completions, score them, and one update on the group-relative advantages."""
        cfg, d = self.cfg, self.dist
        rows = self._next_prompts() if rows is None else list(rows)
        if getattr(self, "log", None) is not None:
            self.log.note(f"sampling {len(rows) * cfg.num_generations} completions")
        clock = self._clock()
        roll = rollout.generate(self.model, self.tokenizer, [r["prompt"] for r in rows], cfg,
                                self.device)
        t_generate = clock()
        try:
            rewards, adv = rollout.score(self.reward_fn, rows, roll["texts"], cfg, self.device)
        except FastftError as e:  # before any backward: the step is named, nothing is applied
            raise FastftError(f"step {self.state['step'] + 1}: {e}") from e
        N = rewards.shape[0]
        n_local = roll["completion_mask"].sum().float()
        n_completion = d.all_sum(n_local)  # all processes
        # the whole step's normalisers (TRL's): dapo counts the tokens of every process,
        # bnpo this process's; grpo and dr_grpo count this process's sequences
        n_items = n_completion / d.world if cfg.loss_type == "dapo" else n_local
        chunks = [slice(i, min(N, i + cfg.batch_size)) for i in range(0, N, cfg.batch_size)]
        batches = [rollout.batch_rows(roll, adv, idx) for idx in chunks]
        clock()  # scoring is none of the three parts
        if cfg.beta > 0:  # the reference policy's log-probs, before any backward
            for batch in batches:
                batch["ref_logps"] = self._reference("logprobs", batch)
        t_logprobs = clock()
        total = torch.zeros((), device=self.device)
        stats = torch.zeros(2, 4, device=self.device)  # weighted sums, weights
        per_seq = cfg.importance_level == "sequence"  # then the clips are means over sequences
        for m, batch in enumerate(batches):
            with distributed.no_sync(self.engine, m == len(chunks) - 1), self._autocast():
                loss, met = self.engine(batch, num_items=n_items, num_sequences=N)
                loss.backward()
            total += loss.detach()
            n_tok = batch["completion_mask"].sum().float()
            n_seq = torch.tensor(float(batch["completion_ids"].shape[0]), device=self.device)
            w = torch.stack([n_tok, *([n_seq if per_seq else n_tok] * 2), n_tok])
            stats += torch.stack([torch.stack([met["kl"], met["clip_low"], met["clip_high"],
                                               met["ratio"]]) * w, w])
        t_update = clock()
        stats = d.all_sum(stats)
        stats = stats[0] / stats[1].clamp(min=1)
        all_r = d.all_sum(torch.stack([rewards.sum(), (rewards ** 2).sum(),
                                       torch.tensor(float(N), device=self.device)]))
        mean = all_r[0] / all_r[2]
        metrics = {"loss": d.all_sum(total) / d.world, "reward_mean": mean,
                   "reward_std": (all_r[1] / all_r[2] - mean**2).clamp(min=0).sqrt(),
                   "kl": stats[0], "clip_low": stats[1], "clip_high": stats[2],
                   "ratio": stats[3], "completion_length": n_completion / all_r[2],
                   "time_generate_s": t_generate, "time_logprobs_s": t_logprobs,
                   "time_update_s": t_update}
        n_tok = int(roll["prompt_ids"].numel() + roll["completion_ids"].numel()) * d.world
        return metrics, n_tok

    # ---- pieces of a step ---------------------------------------------------------------

    def _clock(self):
        """A stopwatch: each call returns the seconds since the previous one (or since it
        was made). On CUDA it waits for the queued work first, so a part's time is its own;
        it is called at part boundaries only."""
        cuda = self.device.type == "cuda"
        last = [0.0]

        def lap() -> float:
            if cuda:
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            elapsed, last[0] = now - last[0], now
            return elapsed

        lap()
        return lap

    def _take(self, n: int) -> list[int]:
        """The next ``n`` indices of the stream of per-epoch permutations (exactly resumable)."""
        N, out = len(self.rows), []
        while len(out) < n:
            pos = self.state["position"]
            epoch, at = divmod(pos, N)
            if epoch != self.state["epoch"]:
                self.state["epoch"] = epoch
                if hasattr(self.method, "on_epoch_begin"):
                    self.method.on_epoch_begin(self.model, self.optimizer, epoch)
            perm = self._permutation(epoch)
            k = min(n - len(out), N - at)
            out += perm[at:at + k].tolist()
            self.state["position"] = pos + k
        return out

    def _permutation(self, epoch: int) -> torch.Tensor:
        """The order of the rows in ``epoch``, from the seed (drawn once per epoch)."""
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            self._perm = (epoch, torch.randperm(len(self.rows), generator=gen))
        return self._perm[1]

    def _next_sft_batches(self) -> list[dict]:
        cfg, d = self.cfg, self.dist
        if cfg.select == "uds":  # the best select_ratio of more candidates (train/select.py)
            from .select import uds_rows

            idx = uds_rows(self)
        else:
            idx = self._take(self.global_batch)
        mine = idx[d.rank::d.world]
        pad = self.tokenizer.pad_token_id
        micro = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        if cfg.packing:
            varlen = "flash_attention" in str(getattr(self.model.config, "_attn_implementation",
                                                      ""))
            return [data.collate_packed([self.rows[j] for j in mb], pad, cfg.max_length, varlen)
                    for mb in micro]
        return [data.collate([self.rows[j] for j in mb], pad) for mb in micro]

    def _next_prompts(self) -> list[dict]:
        idx = self._take(self.global_batch)
        return [self.rows[j] for j in idx[self.dist.rank::self.dist.world]]

    @torch.no_grad()
    def _reference(self, what: str, batch):
        """``hidden`` or ``logprobs`` of the reference policy: a frozen copy, or adapters off."""
        if self.ref_model is not None:
            return getattr(self.ref_model, what)(batch)
        with disable_adapters(self.model), self._autocast():
            return getattr(self.loss_model, what)(batch)

    def _reference_head(self) -> dict:
        """The reference's output head (``ref_weight``, ``ref_bias``): the frozen copy's, or
        none given (the model's own head, frozen under adapters)."""
        if self.ref_model is None:
            return {}
        head = output_head(self.ref_model.model)
        return {"ref_weight": head.weight, "ref_bias": getattr(head, "bias", None)}

    def _autocast(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_finite(self, step: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """Stop before the optimizer step when the loss or the gradient norm is not finite
        (one host sync per step), so no NaN reaches the weights or a checkpoint."""
        vals = torch.stack([loss.detach().float().reshape(()),
                            norm.detach().float().reshape(()).to(loss.device)])
        if bool(torch.isfinite(vals).all()):
            return
        i = 0 if not bool(torch.isfinite(vals[0])) else 1
        raise FastftError(
            f"step {step}: the {('loss', 'gradient norm')[i]} is {float(vals[i])}; "
            "stopped before the optimizer step (the newest checkpoint is the last good one): "
            "lower lr, check the data of this step, or keep max_grad_norm > 0")

    def _grad_tensors(self) -> list[torch.Tensor]:
        opt = self.optimizer
        if hasattr(opt, "grad_tensors"):  # SparseAdamW: compact buffers and dense grads
            return opt.grad_tensors()
        return [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]

    def _clip(self) -> torch.Tensor:
        cfg, opt = self.cfg, self.optimizer
        if hasattr(opt, "grad_norm_sq"):  # sparse optimizer: gradients live in compact buffers
            norm = opt.grad_norm_sq().sqrt()
            if cfg.max_grad_norm > 0:
                opt.scale_grads_((cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
            return norm
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(
            params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))

    def _record(self, step, metrics, norm, tokens, t0, phase) -> dict:
        rec = {"step": step, "lr": self.scheduler.get_last_lr()[0],
               "grad_norm": float(norm), "epoch": self.state["epoch"],
               "tokens_per_s": round(tokens / max(time.perf_counter() - t0, 1e-9), 1),
               "peak_memory_mb": round(peak_memory_mb(self.device), 1)}
        rec.update({k: float(v.detach()) if torch.is_tensor(v) else float(v)
                    for k, v in metrics.items()})
        if phase != "train":
            rec["phase"] = phase
        return rec

    def _initialize_method(self) -> None:
        """LoRA-SB needs its adapters from the first gradients before training; RoSTE's
        adaptive rotations are calibrated on the first ``calibration_samples`` examples
        (a no-op once chosen, e.g. on resume)."""
        if hasattr(self.method, "calibrate"):
            n = min(getattr(self.method, "calibration_samples", 128), len(self.rows))
            rows = self.rows[:n]
            if self.cfg.objective == "grpo":  # the prompts' tokens
                rows = [{"input_ids": ids, "labels": ids} for ids in
                        (data.prompt_ids(self.tokenizer, r["prompt"]) for r in rows)]
            size = self.cfg.batch_size
            self.method.calibrate(self.model, [
                {k: v.to(self.device) for k, v in data.collate(
                    rows[i:i + size], self.tokenizer.pad_token_id).items()}
                for i in range(0, n, size)])
        layers = adapter_layers(self.model)
        if not any(getattr(m, "initialized", True) is False for m in layers.values()):
            return
        check(self.cfg.objective == "sft", "LoRA-SB initialisation needs SFT data (labels)")
        n = getattr(self.method, "n_init", 50)
        # every process sums the same gradient: mini-batches of the global micro-batch size
        size = self.cfg.batch_size * self.dist.world
        batches, seen = [], 0
        for i in range(0, min(n, len(self.rows)), size):
            b = data.collate(self.rows[i:i + size], self.tokenizer.pad_token_id)
            batches.append({k: v.to(self.device) for k, v in b.items()})
            seen += b["input_ids"].shape[0]
        from ..methods import lora_sb

        lora_sb.initialize(self.model, batches, total_steps=self.total_steps, lr=self.cfg.lr,
                           warmup_ratio=self.cfg.warmup_ratio, n_init=min(n, seen),
                           seed=self.cfg.seed)

    def _replace_optimizer(self, new) -> None:
        if hasattr(new, "attach_hooks"):
            new.attach_hooks()
        self.optimizer = new
        self.scheduler = self._schedule()

    def _schedule(self):
        """Warm-up then cosine / linear / constant over ``total_steps``, on the optimizer."""
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                 lr_lambda(self.cfg, self.total_steps))

    # ---- saving and evaluation ----------------------------------------------------------

    def save(self) -> Path | None:
        d = self.dist
        if getattr(self, "_uds", None) is not None:  # UDS's queue, read only when saved
            self.state["uds"] = self._uds.state()
        model_state = optim_state = None
        if self.fsdp:  # every process takes part in gathering the full state dicts
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.engine, options=opts)
            model_state = {k.removeprefix("model."): v for k, v in full.items()}
            optim_state = get_optimizer_state_dict(self.engine, self.optimizer, options=opts)
        path = None
        if d.main:
            method_state = self.method.state_dict() if hasattr(self.method, "state_dict") else {}
            path = checkpoint.save_checkpoint(
                # named by the step counted over all phases: LT-SFT's two never collide
                self.out, self.state["phase"] * self.total_steps + self.state["step"],
                model=self.model, optimizer=self.optimizer,
                scheduler=self.scheduler, method_state=method_state,
                trainer_state={"state": self.state, "config": self.cfg.to_dict()},
                model_state=model_state, optimizer_state=optim_state, tokenizer=self.tokenizer)
        d.barrier()
        return path

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token cross-entropy on ``eval_data`` (SFT)."""
        check(self.eval_rows is not None, "no eval_data")
        was = self.model.training
        self.model.eval()
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        lm = self.loss_model
        starts = range(0, len(self.eval_rows), self.cfg.batch_size)
        for i in progress(starts, f"evaluating {len(self.eval_rows)} records",
                          enabled=self.cfg.progress and self.dist.main):
            b = data.collate(self.eval_rows[i:i + self.cfg.batch_size],
                             self.tokenizer.pad_token_id)
            b = {k: v.to(self.device) for k, v in b.items()}
            labels = next_token_labels(b["labels"])
            with self._autocast():
                h = lm.hidden(b)  # the model's own logits: softcap, temperature, head bias
                total += losses.cross_entropy(h, output_head(self.model).weight, labels,
                                              reduction="sum", softcap=lm.softcap,
                                              temperature=lm.temperature, bias=lm.head_bias())
            count += (labels != -100).sum()
        self.model.train(was)
        return float(total / count.clamp(min=1))

