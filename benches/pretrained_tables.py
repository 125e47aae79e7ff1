#!/usr/bin/env python
"""Tables on the real SmolLM2-135M-Instruct: RoSTE, GreenTrainer, model soups and LiNeS.

    python benches/pretrained_tables.py [roste|green|soups|all] [--out DIR] [--steps N]
                                        [--quick]

The model is the folder ``fastft pretrained`` builds (fastft/pretrained.py). The task:
continue a section of the Python reference (``pydoc_data.topics``, which ships with
Python) from its title. The topics of at least 1500 characters, in name order, are
split: every fifth is held out, the rest trains; each topic is cut into chunks of about
500 characters at paragraph breaks, one record per chunk (prompt: the topic's name;
completion: the chunk). Held-out perplexity is exp(mean token cross-entropy) over the
completion tokens of 48 held-out chunks. The soups table adds a control set that no run
trains on: the base's own greedy answers (48 tokens) to 24 everyday chat questions, the
behaviour a fine-tune should keep (LiNeS's aim).

Every run is full fine-tuning (RoSTE's default, GreenTrainer's base) from the same base
with the same data order: ``--steps`` optimizer steps (40) of 4 records of at most 128
tokens, AdamW lr 2e-5, cosine with 10% warm-up. Writes ``<table>.json`` and
``<table>.md`` under ``--out`` as each table ends; every row is printed as it comes.

- roste: the base; SFT in fp32; that model round-to-nearest (fake-quantized, no
  rotations) and rotated then round-to-nearest (R1-R4 everywhere, no training);
  QAT without rotations (RoSTE rotations="none"); RoSTE (adaptive rotations, calibrated
  on 128 training records); at W4A4KV4 and at W4A8KV8.
- green: full fine-tuning and GreenTrainer at rho 0.7 and 0.5 (one selection: the run
  is one epoch), with the FLOPs of a step (forward and backward) under each selection,
  measured by torch's FlopCounterMode.
- soups: two fine-tunes (seed 0, lr 2e-5; seed 1, lr 4e-5), their uniform soup, their
  greedy soup (scored on the held-out chunks), and LiNeS of each (alpha 0.5, beta 0.5).
"""

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastft
import fastft.profile  # noqa: F401 (registers the CPU attention FLOP formula)
from fastft import losses
from fastft.patch import next_token_labels, output_head
from fastft.pretrained import smollm2_folder
from fastft.recipe import CausalLMLoss
from fastft.train import TrainConfig, Trainer, data

PROMPT = "From the Python reference, on {}:\n"


# ---- data ------------------------------------------------------------------------------

def chunks(text: str, size: int = 500) -> list[str]:
    """``text`` cut at paragraph breaks into pieces of about ``size`` characters."""
    out, cur = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if cur and len(cur) + len(para) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
        while len(cur) > 2 * size:  # one long paragraph: cut at a space
            cut = cur.rfind(" ", 0, size) if cur.rfind(" ", 0, size) > 0 else size
            out.append(cur[:cut])
            cur = cur[cut:].lstrip()
    if cur:
        out.append(cur)
    return out


def task_records() -> tuple[list[dict], list[dict]]:
    """(train, held-out) records of the Python reference's topics (see the docstring)."""
    from pydoc_data.topics import topics

    names = sorted(k for k in topics if len(topics[k].strip()) >= 1500)
    train, held = [], []
    for i, name in enumerate(names):
        recs = [{"prompt": PROMPT.format(name), "completion": c}
                for c in chunks(topics[name].strip())]
        (held if i % 5 == 4 else train).extend(recs)
    return train, held


CHAT = (
    "How do I make a good cup of tea?", "What is the capital of Australia?",
    "Give me three tips for sleeping better.", "Why is the sky blue?",
    "How can I keep a houseplant alive?", "What should I pack for a weekend hike?",
    "Explain what a rainbow is to a child.", "How do bees make honey?",
    "What is a healthy breakfast?", "How do I start learning to play the guitar?",
    "Why do leaves change colour in autumn?", "What are good manners at a dinner party?",
    "How does a bicycle stay upright?", "What is the difference between weather and climate?",
    "How can I save money on groceries?", "What makes a good friend?",
    "How do I write a thank-you note?", "Why do cats purr?",
    "What is the tallest mountain in Africa?", "How do I boil an egg?",
    "What causes the seasons?", "How can I be more productive in the morning?",
    "What is photosynthesis?", "How do airplanes fly?",
    "What is a good way to learn a new language?", "Why is exercise good for you?",
    "How do I plan a birthday party?", "What is the moon made of?",
    "How should I prepare for a job interview?", "What is the water cycle?",
    "How do I clean a cast iron pan?", "Why do we have time zones?")


@torch.no_grad()
def control_records(model, tok, n: int = 32, tokens: int = 48) -> list[dict]:
    """The base's own greedy answers to everyday questions (chat records): what a
    fine-tune on the Python reference should not forget. Their perplexity under the base
    is low by construction; the rise under a fine-tune measures how far it moved away."""
    out = []
    for q in CHAT[:n]:
        msgs = [{"role": "user", "content": q}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        gen = model.generate(**ids, max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        answer = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append({"messages": msgs + [{"role": "assistant", "content": answer.strip()}]})
    return out


# ---- measuring -------------------------------------------------------------------------

@torch.no_grad()
def perplexity(model, tok, records: list[dict], max_length: int = 128) -> float:
    """exp(mean token cross-entropy) of ``records``' completions under ``model`` (its own
    forward: quantizers and rotations included), in fp32."""
    rows, _ = data.tokenize_sft(data.read_records(records), tok, max_length=max_length,
                                truncation=True, completion_only=True, skip_invalid=False)
    was = model.training
    model.eval()
    lm, total, count = CausalLMLoss(model, None), 0.0, 0
    for i in range(0, len(rows), 8):
        b = data.collate(rows[i:i + 8], tok.pad_token_id)
        labels = next_token_labels(b["labels"])
        total += float(losses.cross_entropy(lm.hidden(b), output_head(model).weight, labels,
                                            reduction="sum", bias=lm.head_bias()))
        count += int((labels != -100).sum())
    model.train(was)
    return math.exp(total / count)


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


class Table:
    """Rows printed as they come; ``<name>.json`` and ``<name>.md`` written at the end."""

    def __init__(self, out: Path, name: str, columns: list[str]):
        self.out, self.name, self.columns, self.rows = out, name, columns, []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, **row):
        self.rows.append(row)
        print(" | ".join(f"{row.get(c, '')}" for c in self.columns), flush=True)

    def write(self, note: str = ""):
        (self.out / f"{self.name}.json").write_text(json.dumps(self.rows, indent=1))
        md = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        md += ["| " + " | ".join(_cell(r.get(c)) for c in self.columns) + " |"
               for r in self.rows]
        text = "\n".join(md) + "\n" + (f"\n{note}\n" if note else "")
        (self.out / f"{self.name}.md").write_text(text)
        print(text, flush=True)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if v >= 1 else f"{v:.3f}"
    return str(v)


# ---- runs ------------------------------------------------------------------------------

class Bench:
    def __init__(self, out: Path, steps: int, quick: bool):
        from transformers import AutoTokenizer

        self.out, self.steps, self.quick = out, steps, quick
        self.folder = smollm2_folder()
        self.tok = AutoTokenizer.from_pretrained(str(self.folder))
        self.base = load(self.folder)
        train, held = task_records()
        self.train = train[:steps * 4]
        self.held = held[:8 if quick else 48]
        self.control = control_records(self.base, self.tok, 4 if quick else 24)
        print(f"SmolLM2-135M-Instruct from {self.folder}: {len(self.train)} training records "
              f"of {len(train)}, {len(self.held)} held-out, {len(self.control)} control",
              flush=True)

    def fresh(self):
        return copy.deepcopy(self.base)

    def sft(self, name: str, seed: int = 0, lr: float = 2e-5, model=None, **cfg):
        """Fine-tune (a copy of the base unless ``model``); (model, wall seconds)."""
        model = model if model is not None else self.fresh()
        cfg = TrainConfig(**{**dict(method="full", max_steps=self.steps, batch_size=4,
                                    max_length=128, lr=lr, warmup_ratio=0.1, seed=seed,
                                    progress=False, overwrite=True,
                                    output_dir=str(self.out / "runs" / name)), **cfg})
        t0 = time.perf_counter()
        Trainer(model, self.tok, self.train, cfg).train()
        return model, round(time.perf_counter() - t0, 1)

    def ppl(self, model, which: str = "held") -> float:
        return round(perplexity(model, self.tok, getattr(self, which)), 3)


def roste_table(b: Bench):
    t = Table(b.out, "roste", ["model", "bits", "held-out perplexity", "wall s"])
    t.add(model="SmolLM2-135M-Instruct (base)", bits="fp32", **{
        "held-out perplexity": b.ppl(b.base)})
    fp, wall = b.sft("sft-fp32")
    t.add(model="SFT", bits="fp32", **{"held-out perplexity": b.ppl(fp), "wall s": wall})
    for bits in ((4, 4, 4), (4, 8, 8)):
        q = dict(w_bits=bits[0], a_bits=bits[1], kv_bits=bits[2])
        label = "W{}A{}KV{}".format(*bits)
        for name, rot in (("SFT, then round-to-nearest", "none"),
                          ("SFT, then rotate (R1-R4) and round-to-nearest", "all")):
            m = fastft.prepare(fastft.unpatch(copy.deepcopy(fp)), fastft.RoSTE(**q, rotations=rot))
            t.add(model=name, bits=label, **{"held-out perplexity": b.ppl(m)})
        for name, rot in (("QAT, no rotations", "none"), ("RoSTE (adaptive rotations)",
                                                          "adaptive")):
            m, wall = b.sft(f"{rot}-{label}", method="roste", rotations=rot, **q)
            extra = ""
            if rot == "adaptive":
                chosen = m._fastft.method.chosen
                extra = " (" + ", ".join(f"{k}: {len(v)}/30" for k, v in chosen.items()) + ")"
            t.add(model=name + extra, bits=label, **{"held-out perplexity": b.ppl(m),
                                                     "wall s": wall})
    t.write()


def step_flops(model, b: Bench, selected) -> int:
    """FLOPs of one step (forward and backward: the fused loss head forms the head's and
    the hidden states' gradients in its forward call, for what trains) of 4 training
    records with ``selected`` (None: all) trainable, by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    rows, _ = data.tokenize_sft(data.read_records(b.train[:4]), b.tok, max_length=128,
                                truncation=True, completion_only=True, skip_invalid=False)
    batch = data.collate(rows, b.tok.pad_token_id)
    lm = CausalLMLoss(model, TrainConfig())
    keep = None if selected is None else set(selected)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(keep is None or n in keep)
    n = torch.tensor(float(data.item_weight(batch)))
    with FlopCounterMode(display=False) as fc:
        loss, _ = lm(batch, num_items=n)
        loss.backward()
    model.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])
    return fc.get_total_flops()


def green_table(b: Bench):
    t = Table(b.out, "green", ["run", "held-out perplexity", "tensors trained",
                               "GFLOP / step", "vs full", "wall s"])
    t.add(run="base (no fine-tuning)", **{"held-out perplexity": b.ppl(b.base)})
    full = None
    for name, cfg in (("full fine-tuning", dict(method="full")),
                      ("GreenTrainer rho=0.7", dict(method="green", rho=0.7)),
                      ("GreenTrainer rho=0.5", dict(method="green", rho=0.5))):
        m, wall = b.sft(name.split()[-1].replace("=", ""), **cfg)
        method = m._fastft.method
        selected = method.history[-1]["selected"] if cfg["method"] == "green" else None
        flops = step_flops(m, b, selected)
        full = full or flops
        n = len(selected) if selected is not None else sum(1 for _ in m.parameters())
        t.add(run=name, **{"held-out perplexity": b.ppl(m), "tensors trained": n,
                           "GFLOP / step": round(flops / 1e9, 1),
                           "vs full": round(flops / full, 3), "wall s": wall})
    t.write()


def soups_table(b: Bench):
    from fastft.merging import lines
    from fastft.soups import greedy_soup, uniform_soup

    t = Table(b.out, "soups", ["model", "held-out perplexity", "control perplexity",
                               "wall s"])
    t.add(model="base", **{"held-out perplexity": b.ppl(b.base),
                           "control perplexity": b.ppl(b.base, "control")})
    runs = []
    for name, seed, lr in (("A", 0, 2e-5), ("B", 1, 4e-5)):
        m, wall = b.sft(f"soup-{name}", seed=seed, lr=lr)
        runs.append(b.out / "runs" / f"soup-{name}")
        t.add(model=f"fine-tune {name} (seed {seed}, lr {lr:g})", **{
            "held-out perplexity": b.ppl(m), "control perplexity": b.ppl(m, "control"),
            "wall s": wall})
        del m

    def score(folder) -> float:  # higher is better: minus the held-out perplexity
        return -perplexity(load(folder), b.tok, b.held)

    with tempfile.TemporaryDirectory(dir=b.out) as scratch:
        scratch = Path(scratch)
        made = []
        t0 = time.perf_counter()
        uniform_soup(runs, scratch / "uniform")
        made.append(("uniform soup of A and B", scratch / "uniform", time.perf_counter() - t0))
        t0 = time.perf_counter()
        recipe = greedy_soup(runs, scratch / "greedy", score)
        made.append((f"greedy soup (kept {', '.join(Path(k).name for k in recipe['kept'])})",
                     scratch / "greedy", time.perf_counter() - t0))
        for name, run in zip("AB", runs):
            t0 = time.perf_counter()
            lines(b.folder, run, scratch / f"lines-{name}", 0.5, 0.5)
            made.append((f"LiNeS of {name} (alpha 0.5, beta 0.5)", scratch / f"lines-{name}",
                         time.perf_counter() - t0))
        for name, folder, wall in made:
            m = load(folder)
            t.add(model=name, **{"held-out perplexity": b.ppl(m),
                                 "control perplexity": b.ppl(m, "control"),
                                 "wall s": round(wall, 1)})
    t.write()


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("table", nargs="?", default="all", choices=["roste", "green", "soups", "all"])
    p.add_argument("--out", default="bench-results/pretrained")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--quick", action="store_true", help="2 steps and 8 evaluation records: "
                   "a rehearsal of the programme, not a measurement")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    b = Bench(Path(args.out), 2 if args.quick else args.steps, args.quick)
    for name in ("roste", "green", "soups") if args.table == "all" else (args.table,):
        t0 = time.perf_counter()
        {"roste": roste_table, "green": green_table, "soups": soups_table}[name](b)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
