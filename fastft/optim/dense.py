"""torch's AdamW (fused where it takes the parameters) for SparseAdamW's unmasked parameters."""

from __future__ import annotations

import torch


class DenseAdamW:
    """AdamW over the dense parameters of a SparseAdamW, following its groups' settings."""

    def __init__(self, opt: torch.optim.AdamW, groups: list[int], order: list):
        self.opt, self.groups, self.order = opt, groups, order

    @property
    def state(self):
        return self.opt.state

    def step(self, param_groups) -> None:
        """One AdamW step with the hyper-parameters of SparseAdamW's groups (a scheduler
        changes those; torch's load_state_dict replaces the AdamW's own group dicts)."""
        for j, gi in enumerate(self.groups):
            self.opt.param_groups[j].update(
                {k: param_groups[gi][k] for k in ("lr", "betas", "eps", "weight_decay")})
        self.opt.step()

    def state_tensors(self, index: dict) -> dict:
        """{"dense.<i>.<key>": tensor} for the state of each dense parameter i."""
        return {f"dense.{index[p]}.{k}": t for p, st in self.opt.state.items()
                for k, t in st.items()}

    def load(self, state: dict, index: dict) -> None:
        """Load ``dense.<i>.<key>`` tensors through torch's own load_state_dict."""
        own = self.opt.state_dict()
        per = {}
        for j, p in enumerate(self.order):
            prefix = f"dense.{index[p]}."
            keys = [k for k in state if k.startswith(prefix)]
            if keys:
                per[j] = {k[len(prefix):]: state[k] for k in keys}
        own["state"] = per
        self.opt.load_state_dict(own)


def make(groups, masked: list[bool], index: dict) -> DenseAdamW | None:
    dense_groups, which, order = [], [], []
    for gi, g in enumerate(groups):
        ps = [p for p in g["params"] if not masked[index[p]]]
        if ps:
            dense_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ps})
            which.append(gi)
            order.extend(ps)
    if not dense_groups:
        return None
    try:
        opt = torch.optim.AdamW(dense_groups, fused=True)
    except RuntimeError:  # a device or dtype the fused kernel does not take
        opt = torch.optim.AdamW(dense_groups)
    return DenseAdamW(opt, which, order)
