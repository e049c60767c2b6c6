"""Command line: ``python -m transpeft_kernels [quickstart]`` (also the ``transpeft`` script)."""
from __future__ import annotations

import argparse
import sys
import warnings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transpeft", description="Trans-PEFT training tools for transformers models.")
    sub = p.add_subparsers(dest="command")
    q = sub.add_parser("quickstart", help="(default) patch a small built-in model, train a few LoRA steps, print the report")
    q.add_argument("--steps", type=int, default=40)
    q.add_argument("--masking", type=float, default=0.1)
    q.add_argument("--dropping", type=float, default=0.1)
    q.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"))
    q.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "quickstart")  # the default job
    args = _parser().parse_args(argv)
    # transformers/PEFT deprecation chatter is not the user's business in a command-line run.
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.command == "quickstart":
        from .quickstart import QuickstartConfig, run

        cfg = QuickstartConfig(steps=args.steps, masking=args.masking, dropping=args.dropping,
                               backend=args.backend, seed=args.seed)
        try:
            result = run(cfg)
        except (ValueError, TypeError, RuntimeError) as e:
            print(f"transpeft: error: {e}", file=sys.stderr)
            return 2
        return 0 if result["eval_identical"] else 1
    return 2
