"""The real step, measured with torch's own tools: what a profile is checked against
(FlopCounterMode for FLOPs; for the peak, the CPU allocator's byte counts, or
torch.cuda.max_memory_allocated on a GPU)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile
from torch.utils.flop_counter import FlopCounterMode

from .step import _grad_tensors, _nbytes, _state_tensors


def real_step(model, method, batch: dict, *, max_length: int) -> dict:
    """Prepare ``model`` with ``method``, take two Trainer steps on ``batch`` and measure the
    second: FLOPs, the allocator's peak (bytes alive before the step + the largest total it
    allocated during it; on CUDA, max_memory_allocated), and the parameter / gradient /
    optimizer bytes."""
    from ..patch import prepare
    from ..recipe import CausalLMLoss, TrainConfig, build_optimizer

    prepare(model, method)
    cfg = TrainConfig(max_length=max_length)
    lm = CausalLMLoss(model, cfg)
    opt = build_optimizer(method, model, cfg)
    n = torch.tensor(float(batch["input_ids"].numel()))
    out = {}

    def step():
        loss, _ = lm(batch, num_items=n)
        loss.backward()
        out["gradients"] = _nbytes(_grad_tensors(model, opt))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    with FlopCounterMode(display=False) as fc:
        step()
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"flops": fc.get_total_flops(), "peak": torch.cuda.max_memory_allocated(),
                "parameters": _nbytes(list(model.parameters()) + list(model.buffers())),
                "optimizer": _nbytes(_state_tensors(opt)), "gradients": out["gradients"]}
    live = _nbytes(list(model.parameters()) + list(model.buffers()) + _state_tensors(opt)
                   + [v for v in batch.values() if isinstance(v, torch.Tensor)])
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(f"{d}/trace.json")
        events = json.loads(Path(f"{d}/trace.json").read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    # "Total Allocated" need not start at 0: a tensor allocated under an earlier profiler
    # session and freed outside it stays in the count; the step's own total is measured
    # from the count before its first allocation
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"] if memory else 0
    allocated = [m["Total Allocated"] - start for m in memory]
    return {"flops": fc.get_total_flops(), "peak": live + max(allocated, default=0),
            "parameters": _nbytes(list(model.parameters()) + list(model.buffers())),
            "optimizer": _nbytes(_state_tensors(opt)), "gradients": out["gradients"]}
