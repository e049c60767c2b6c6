"""``bench``: the benchmark suite (op level and training step) with a table, JSON lines and a chart."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "bench"
HELP = ("benchmark lora_linear, the masked gated MLP and a training step against vanilla PEFT, "
        "torch.compile and the GEMM floor (--smoke: a small CPU run that checks the harness)")

SMOKE_NOTICE = ("SMOKE RUN on CPU: tiny shapes that check the harness (numerics, timing, records, chart). "
                "These numbers are not performance figures; GPU figures need a GPU (benchmarks/gpu_run.sh).")
# Seconds after which the gpu preset starts no new case: leaves room for the chart, the table and a
# margin inside the 10 minutes a GPU session allows per command.
DEFAULT_BUDGET_S = {"smoke": None, "gpu": 360.0, "full": None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true", help="the small CPU configuration (same as --preset smoke)")
    p.add_argument("--preset", choices=("smoke", "gpu", "full"), default=None,
                   help="which cases: smoke (CPU, seconds), gpu (default with a GPU: a few minutes), full (hours)")
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="output folder (default out/bench)")
    p.add_argument("--ops", nargs="+", default=None, metavar="OP", help="lora_linear gated_mlp train_step (default all)")
    p.add_argument("--impls", nargs="+", default=None, metavar="IMPL",
                   help="vanilla vanilla_compiled floor torch triton cuda (default all; vanilla always needed)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new case after this many seconds (default: 360 for gpu, none otherwise)")
    p.add_argument("--resume", action="store_true",
                   help="keep the cases a killed or cut-short run in --out finished, run the rest")
    p.add_argument("--list", action="store_true", help="measure nothing: print the preset's cases in run order")
    p.add_argument("--chart-from", type=Path, default=None, metavar="JSONL",
                   help="measure nothing: redraw the chart and table of an existing results.jsonl into --out")


def _redraw(path: Path, out: Path) -> int:
    from ..bench.chart import write_chart
    from ..bench.records import read_jsonl
    from ..bench.table import records_table, summary_lines

    if not path.is_file():
        raise ValueError(f"--chart-from: no such file: {path}")
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"--chart-from: no records in {path}")
    print(f"chart: {write_chart(records, out)}")
    print(records_table(records))
    print("\n".join(summary_lines(records)))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.chart_from is not None:
        return _redraw(args.chart_from, args.out)
    if args.smoke and args.preset not in (None, "smoke"):
        raise ValueError(f"--smoke and --preset {args.preset}: choose one")
    import torch

    from ..bench import cases
    from ..bench.suite import run_suite

    name = "smoke" if args.smoke else args.preset
    if name is None and args.list:
        name = "gpu"
    if name is None:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU here: GPU figures need a GPU. Run `python -m transpeft_kernels bench "
                               "--smoke` for the CPU harness check (not a performance figure)")
        name = "gpu"
    preset = cases.preset(name)
    if args.list:
        for k, case in enumerate(preset.cases, 1):
            passes = "" if isinstance(case, cases.TrainCase) else " [" + ", ".join(case.passes) + "]"
            print(f"{k:3d}. {case.key}{passes}")
        print(f"preset {name}: {len(preset.cases)} cases; " + "; ".join(preset.notes))
        return 0
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[name]
    if budget is not None and budget <= 0:
        raise ValueError(f"--budget-s: expected a positive number of seconds, got {budget!r}")
    if name == "smoke":
        print(SMOKE_NOTICE)
    log = lambda msg: print(msg, flush=True)  # noqa: E731 - progress must reach a log file as it happens
    result = run_suite(preset, args.out, ops=tuple(args.ops) if args.ops else None,
                       impls=tuple(args.impls) if args.impls else None, budget_s=budget, log=log,
                       resume=args.resume)
    from ..bench.table import summary_lines

    print()
    print(result.table)
    print("\n".join(summary_lines(result.records)))
    print(f"results: {result.jsonl}  chart: {result.chart}  table: {args.out / 'table.txt'}")
    if name == "smoke":
        print(SMOKE_NOTICE)
    failed = sum(r["status"] in ("error", "numerics_mismatch") for r in result.records)
    if failed:
        print(f"bench: {failed} records failed (errors or numerics mismatches); see above", file=sys.stderr)
        return 1
    return 0
