"""``demo``: train adapters on an old base, update the base, and measure what the adapters keep."""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "demo"
HELP = ("the transfer demo: LoRA and Trans-PEFT adapters trained on SmolLM2-135M, evaluated on it and on an "
        "updated base (--quick: about 14 minutes on a 2-core CPU)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="CPU-sized run (full depth, fewer steps and test items)")
    p.add_argument("--out", default="demo_out", help="output directory (data, new base, adapters, results.json, "
                                                     "results.png); default: demo_out. Rerunning with the same "
                                                     "settings reuses the phases a killed run finished")
    p.add_argument("--seed", type=int, default=0, help="seed of the task split, the base update and training")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); on a machine shared with other jobs, "
                        "fewer threads than cores avoids oversubscription, which slows training several-fold")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Tests only: a config-built 2-layer model, the whole pipeline in seconds.
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import UserError
    from ..workflow.demo import PRESETS, run_demo

    from ..workflow.jobs import check_writable, require

    require("peft", "the demo trains LoRA adapters")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads: expected a positive integer, got {args.threads}")
        try:
            torch.set_num_threads(args.threads)
        except (ValueError, RuntimeError) as e:  # from 2**31 on: "Overflow when unpacking long"
            raise UserError(f"--threads: {args.threads} is more than torch accepts ({e})") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a directory")
    check_writable("--out", out)  # before the demo starts: a read-only or impossible --out fails here
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    if mode == "full" and not torch.cuda.is_available():
        print("note: the full demo is sized for a GPU; on this CPU it takes hours (use --quick)")
    run_demo(PRESETS[mode], out, seed=args.seed, progress=not args.no_progress)
    return 0
