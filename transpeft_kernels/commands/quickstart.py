"""``quickstart``: patch a small built-in model, train a few LoRA steps, print the report."""
from __future__ import annotations

import argparse

NAME = "quickstart"
HELP = "patch a small built-in model, train a few LoRA steps with masking and dropping, print the report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--masking", type=float, default=0.1)
    p.add_argument("--dropping", type=float, default=0.1)
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"))
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from ..workflow.quickstart import QuickstartConfig, run as run_quickstart

    cfg = QuickstartConfig(steps=args.steps, masking=args.masking, dropping=args.dropping,
                           backend=args.backend, seed=args.seed)
    return 0 if run_quickstart(cfg)["eval_identical"] else 1
