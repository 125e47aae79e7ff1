"""A training loop that calls a method's hooks the way fastft.Trainer does, for the tests."""

import pytest
import torch

import fastft

from ..tiny_models import batch


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models are far too small for threads; two of them on shared cores only wait."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def batches(n=3, seed=0):
    out = []
    for i in range(n):
        ids, labels = batch(B=2, S=12, seed=seed + i)
        out.append(dict(input_ids=ids, labels=labels))
    return out


@torch.no_grad()
def mean_loss(model, data) -> float:
    return sum(float(model(**b).loss) for b in data) / len(data)


def train(model, method, data, *, epochs=2, lr=1e-2, micro=1, hooks=True, clip=1.0,
          record=None):
    """prepare, make_optimizer (+ attach_hooks), then per phase: on_phase_begin, epochs of
    steps (on_epoch_begin from the second epoch, as the trainer does when the epoch
    changes), clipping, step, zero_grad, on_step_end. Returns the last optimizer."""
    fastft.prepare(model, method)
    opt = method.make_optimizer(model, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if opt is None:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if hooks and hasattr(opt, "attach_hooks"):
        opt.attach_hooks()
    for phase in method.phases():
        new = method.on_phase_begin(model, opt, phase)
        if new is not None:
            opt = new
            if hooks and hasattr(opt, "attach_hooks"):
                opt.attach_hooks()
        step = 0
        for epoch in range(epochs):
            if epoch > 0:
                method.on_epoch_begin(model, opt, epoch)
            for b in data:
                for _ in range(micro):
                    (model(**b).loss / micro).backward()
                if hasattr(opt, "grad_norm_sq"):
                    opt.clip_grad_norm_(clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                method.on_step_end(model, opt, step)
                if record is not None:
                    record(phase, epoch, step, opt)
    return opt


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}
