#!/usr/bin/env python
"""Why rotating SmolLM2-135M-Instruct, then rounding its weights, loses: per linear, the
output error of per-channel 4-bit round-to-nearest on the model's own inputs.

    python benches/rotation_error.py [--records 8]

For each decoder linear: ||X (q(W) - W)^T||^2 / ||X W^T||^2, with X the linear's inputs on
held-out records of benches/pretrained_tables.py's task and q a min/max 4-bit quantizer
per output row written here, for the model as it is (RoSTE rotations="none", quantizers
off) and with R1 (rotations="r1": the RMSNorm scales folded into the readers, the
residual stream rotated). Then the same with every weight moved off its Q4_1 grid (noise
of half a 32-block's step), and the energy the largest channel of each MLP norm's
normalised input holds, with the norm's scale there.
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

import fastft
from fastft.pretrained import smollm2_folder
from fastft.train import data

sys.path.insert(0, str(Path(__file__).parent))
import pretrained_tables as tables  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OFF = dict(w_bits=None, a_bits=None, kv_bits=None)


def rtn(w: torch.Tensor, bits: int = 4) -> torch.Tensor:
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    s = (hi - lo).clamp(min=1e-12) / (2**bits - 1)
    return torch.round((w - lo) / s).clamp(0, 2**bits - 1) * s + lo


@torch.no_grad()
def output_errors(model, batch) -> dict[str, float]:
    inputs, hooks = {}, []
    for name, mod in model.named_modules():
        if name.endswith(LINEARS) and hasattr(mod, "weight"):
            def keep(m, args, name=name):
                inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))
            hooks.append(mod.register_forward_pre_hook(keep))
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    mods = dict(model.named_modules())
    out = {}
    for name, xs in inputs.items():
        x, w = torch.cat(xs), mods[name].weight.float()
        out[name] = float((x @ (rtn(w) - w).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())
    return out


def compare(model, batch, label: str) -> None:
    plain = output_errors(fastft.prepare(copy.deepcopy(model), fastft.RoSTE(**OFF,
                                                                            rotations="none")),
                          batch)
    r1 = output_errors(fastft.prepare(copy.deepcopy(model), fastft.RoSTE(**OFF, rotations="r1")),
                       batch)
    print(f"\n{label}\n| linear | output error, unrotated | with R1 | R1 worse in |\n|---|---|---|---|")
    for kind in LINEARS:
        names = [n for n in plain if n.endswith(kind)]
        a = torch.tensor([plain[n] for n in names])
        b = torch.tensor([r1[n] for n in names])
        print(f"| {kind} | {a.median():.2e} | {b.median():.2e} | {int((b > a).sum())} of "
              f"{len(names)} layers |")


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=8)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = tables.load(folder)
    _, held = tables.task_records()
    rows, _ = data.tokenize_sft(data.read_records(held[:args.records]), tok, max_length=128,
                                truncation=True, completion_only=True, skip_invalid=False)
    batch = data.collate(rows, tok.pad_token_id)
    compare(model, batch, "As loaded (medians over the 30 layers):")
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, mod in noisy.named_modules():
            if isinstance(mod, torch.nn.Linear) and "layers" in name:
                b = mod.weight.reshape(mod.weight.shape[0], -1, 32)
                step = (b.amax(-1, keepdim=True) - b.amin(-1, keepdim=True)) / 15
                mod.weight.copy_((b + 0.5 * step * torch.randn(b.shape, generator=g))
                                 .reshape(mod.weight.shape))
    compare(noisy, batch, "Every weight moved off its Q4_1 grid:")
    seen = {}
    layers = model.model.layers
    for i in (1, 3, 10, 20):
        layers[i].post_attention_layernorm.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, o.detach()))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    print("\n| layer | largest channel of the MLP norm's normalised input | its share of the "
          "energy | norm scale there | median scale |\n|---|---|---|---|---|")
    for i, y in seen.items():
        gamma = layers[i].post_attention_layernorm.weight.detach()
        energy = (y / gamma).pow(2).mean((0, 1))
        j = int(energy.argmax())
        print(f"| {i} | {j} | {energy[j] / energy.sum():.1%} | {gamma[j]:.4f} | "
              f"{gamma.abs().median():.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
