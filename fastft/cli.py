"""The ``fastft`` command line.

    fastft info                          versions, device, the backend of every op
    fastft check-kernels [--arch ...]    ahead-of-time compile of every kernel
    fastft bench --suite NAME ...        a benchmark suite, JSON + markdown
    fastft train [options]               fine-tune; with no options, the embedded demo
    fastft demo [--quick]                the embedded demo

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


def cmd_check_kernels(args) -> int:
    from . import aot, backends

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if a not in aot.extensions.SMEM_LIMIT:
            raise FastftError(f"unknown arch {a!r}; use sm_90 and/or sm_80")
    if backends.interpreter_on():
        return aot.run_in_clean_process(archs)
    rows = aot.check(archs)
    for r in rows:
        r["status"] = "ok" if r["ok"] else ("FAIL: " + r["error"] if r["ok"] is False
                                           else "skipped: " + r["error"])
    print(_table(rows, ["file", "kernel", "config", "arch", "registers", "spill_bytes",
                        "shared_bytes", "wgmma", "status"]))
    failed = [r for r in rows if r["ok"] is False]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} compiled clean for {', '.join(archs)}")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    from .bench import run_suite, suites

    device = args.device
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise FastftError("--device cuda but torch sees no CUDA device; use --device cpu")
    names = suites() if args.suite == "all" else [args.suite]
    ops = {o.strip() for o in args.op.split(",") if o.strip()} if args.op else None
    if ops:
        from .bench.harness import suite_ops

        known = set().union(*(suite_ops(n, device) for n in names))
        unknown = sorted(ops - known)
        if unknown:
            raise FastftError(f"--op {','.join(unknown)} names no op of suite {args.suite}; its "
                              f"ops are: {', '.join(sorted(known))}")
    for name in names:
        run_suite(name, device, args.out, quick=args.quick, ops=ops)
    print(f"\nresults: {args.out}/results.json and results.md")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def cmd_train(args) -> int:
    from .train import cli

    return cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastft", description="fine-tuning on fused kernels")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="versions, device and the backend each op uses")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("check-kernels",
                       help="compile every kernel ahead of time for GPUs; fail on spills")
    s.add_argument("--arch", default="sm_90,sm_80", help="comma-separated archs (sm_90,sm_80)")
    s.set_defaults(func=cmd_check_kernels)

    s = sub.add_parser("bench", help="run a benchmark suite")
    s.add_argument("--suite", required=True, help="suite name (losses, ...) or 'all'")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    s.add_argument("--out", default="bench-results", help="folder for results.json/.md")
    s.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    s.add_argument("--op", default=None, help="only these ops (comma-separated), e.g. grpo,otr")
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
