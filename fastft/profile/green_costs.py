"""GreenTrainer's per-tensor backward costs, measured on fake-traced steps (METHODS.md §5).

For the model's config, the base method and the batch shape: one traced step with
every candidate tensor trainable, one with every candidate frozen but the
activation gradient flowing to the bottom (t_dy per module), and one per kind of
tensor (weight, bias, lora_A, ...) trainable alone (t_dw per module, the
difference to the frozen step). FLOPs are torch's FlopCounterMode counts with
fastft's formulas, filed by module (tracker.FlopRecorder). Backward FLOPs of a
module that no candidate of its own carries (the attention core between q/k/v and
o) are charged to the last candidate tensor that runs before them, the fused loss
head's to the head (or, frozen or tied, to the last tensor before it): the
attention core goes to v's bias where v has one, since a selected v bias needs it.
A module's own activation gradient is charged to its weight, none to its bias (a
bias's gradient needs only the module's output gradient); a LoRA layer's to its
last adapter tensor. A head tied to the embeddings puts its weight-gradient GEMM
on the embedding's t_dw: that tensor carries it. Norms are
elementwise (no FLOPs in the counter): t_dw = t_dy = tokens x width, as METHODS.md
gives them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..errors import check

ROOT = "CausalLMLoss"  # the Trainer's loss module: the fused loss head's ops run in it


@dataclass
class Costs:
    """Per candidate tensor, input to output: names, t_dw, t_dy; and the forward FLOPs."""

    names: list[str]
    t_dw: list[float]
    t_dy: list[float]
    t_fp: float

    @property
    def t_bp(self) -> float:
        return sum(self.t_dw) + sum(self.t_dy)


def measure_costs(config, base, *, batch_size: int, seq_len: int, dtype: torch.dtype) -> Costs:
    """The backward costs of every tensor ``base`` trains, from fake-traced steps."""
    from .step import trace

    common = dict(batch_size=batch_size, seq_len=seq_len, dtype=dtype, kind="cpu",
                  optimizer_step=False, steps=1)
    tied: list[str] = []  # the embedding's name when the output head shares its weight

    def find_tied(model):
        from ..patch import output_head

        head, emb = output_head(model), model.get_input_embeddings()
        if head is not None and emb is not None and head.weight is emb.weight:
            tied.extend(n for n, p in model.named_parameters() if p is emb.weight)

    full = trace(config, copy.deepcopy(base), before_step=find_tied, **common)
    cands = [(n, k) for n, _, trains, k in full.parameter_names if trains]
    check(bool(cands), "GreenTrainer: the base method trains no tensor")
    names = [n for n, _ in cands]
    head = full.head_name

    def only(role):
        def set_grads(model):
            for n, p in model.named_parameters():
                p.requires_grad_(n in names and (role is not None and n.rsplit(".", 1)[-1] == role))
        return set_grads

    frozen = trace(config, copy.deepcopy(base), before_step=only(None), input_grad=True,
                   **common)
    roles = sorted({n.rsplit(".", 1)[-1] for n in names})
    by_role = {r: trace(config, copy.deepcopy(base), before_step=only(r), input_grad=True,
                        **common) for r in roles}

    def module_of(name: str) -> str:
        if name == head:
            return ROOT
        return f"{ROOT}.model." + name.rsplit(".", 1)[0]

    def bwd(tr, module):
        return tr.flops.phase_total("backward", module)

    tokens = batch_size * seq_len
    numel = {n: c for n, c, _, _ in full.parameter_names}
    kinds = dict(cands)
    rec = full.flops
    owners = {module_of(n) for n in names}
    # positions in the forward: a candidate's module by its first op; any other module by its
    # first op with FLOPs; the head last
    last = max(list(rec.first_op.values()) + [0]) + 1

    def position(module):
        if module == ROOT:
            return last
        table = rec.first_op if module in owners else rec.first_flop
        return table.get(module)

    items = []  # (position, 0 = candidate / 1 = activation-gradient item, name, t_dw, t_dy)
    for n in names:
        module = module_of(n)
        role = n.rsplit(".", 1)[-1]
        if "Norm" in kinds[n]:
            dw = tokens * numel[n]
        else:
            dw = max(0, bwd(by_role[role], module) - bwd(frozen, module))
        if n in tied:  # the head's weight-gradient GEMM, in the fused loss head
            dw += max(0, bwd(by_role[role], ROOT) - bwd(frozen, ROOT))
        pos = position(module)
        if pos is None:  # never ran (e.g. a head tied elsewhere): last
            pos = last
        items.append((pos, 0, n, float(dw), 0.0))
    modules = {m for (m, _, ph) in frozen.flops.by if ph == "backward"} | owners
    for module in modules:
        dy = bwd(frozen, module)
        if any("Norm" in kinds[n] for n in names if module_of(n) == module):
            dy += tokens * next(numel[n] for n in names if module_of(n) == module)
        pos = position(module)
        if dy and pos is not None:
            items.append((pos, 1, module, 0.0, float(dy)))
    items.sort(key=lambda it: (it[0], it[1]))
    # a linear's (or norm's) input gradient goes to its weight, never its bias: a bias's
    # gradient needs only the module's output gradient
    weight_of = {module_of(n): n for n in names if n.rsplit(".", 1)[-1] == "weight"}
    t_dw = {n: 0.0 for n in names}
    t_dy = {n: 0.0 for n in names}
    current = None
    for _, is_dy, name, dw, dy in items:
        if not is_dy:
            current = name
            t_dw[name] += dw
        elif name in weight_of:
            t_dy[weight_of[name]] += dy
        elif current is not None:  # needed only when something at or below it trains
            t_dy[current] += dy
    order = [n for _, is_dy, n, _, _ in items if not is_dy]
    t_fp = full.flops.phase_total("forward")
    return Costs(order, [t_dw[n] for n in order], [t_dy[n] for n in order], float(t_fp))
