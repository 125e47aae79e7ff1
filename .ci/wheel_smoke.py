"""Run by .ci/wheel_check in a fresh virtual environment, from a folder outside the
checkout: the installed wheel imports every subpackage of the checkout's tree, and the CLI's
commands work end to end (info, profile of a tiny config, a 2-step train, the quick demo).

    python wheel_smoke.py CHECKOUT WORKDIR
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

checkout, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
tomllib = importlib.import_module("tomllib")
config = tomllib.loads((checkout / "pyproject.toml").read_text())["tool"]["setuptools"]
mapped = config["package-dir"]


def tree_packages() -> list[str]:
    """Every package folder (one with __init__.py) under each mapped root of the checkout."""
    names = set()
    for name, folder in mapped.items():
        root = checkout / folder
        for init in root.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(root).parts
            names.add(".".join((name, *rel)))
    return sorted(names)


def run(*args: str) -> str:
    print("$", " ".join(args), flush=True)
    proc = subprocess.run(args, cwd=work, capture_output=True, text=True)
    print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n", flush=True)
    if proc.returncode != 0:
        sys.exit(f"wheel check: {' '.join(args)} exited {proc.returncode}")
    return proc.stdout


packages = tree_packages()
site = Path(importlib.import_module("site").getsitepackages()[0]).resolve()
for name in packages:
    mod = importlib.import_module(name)
    where = Path(mod.__file__).resolve()
    if site not in where.parents:
        sys.exit(f"wheel check: {name} imported from {where}, not from the installed wheel")
print(f"wheel check: {len(packages)} packages import from {site}:", ", ".join(packages))

fastft = str(Path(sys.executable).parent / "fastft")
run(fastft, "info")

from transformers import LlamaConfig  # noqa: E402

tiny = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
(work / "tiny").mkdir(exist_ok=True)
(work / "tiny" / "config.json").write_text(tiny.to_json_string())
out = run(fastft, "profile", "--model", str(work / "tiny" / "config.json"), "--method",
          "full,lora", "--seq-len", "64", "--device", "cpu", "--dtype", "fp32")
assert "lora" in out and "full" in out, "fastft profile printed no table"

from fastft.demo import arithmetic as ar  # noqa: E402

tok = ar.tokenizer()
model = ar.model(tok, hidden=32, layers=2, heads=2)
model.save_pretrained(work / "model")
tok.save_pretrained(work / "model")
with open(work / "sft.jsonl", "w") as f:
    for r in ar.sft_records(ar.problems(16, seed=0)):
        f.write(json.dumps(r) + "\n")
run(fastft, "train", "--model", str(work / "model"), "--data", str(work / "sft.jsonl"),
    "--max-steps", "2", "--batch-size", "4", "--max-length", "64", "--output",
    str(work / "run"), "--no-progress")
metrics = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
steps = [m for m in metrics if "loss" in m]
assert len(steps) >= 2, f"fastft train logged {len(steps)} steps, not 2"
run(fastft, "demo", "--quick", "--out", str(work / "demo"))
print("wheel check: passed")
