"""Running a preset: every selected case in priority order, records appended as each case finishes.

Writes under ``out_dir``: results.jsonl (the records), speedup.png (or .svg), table.txt, and returns the
records. Stops starting new cases once ``budget_s`` seconds have passed; the cases not started are
recorded as skipped with that reason, so a cut-short run is visible as such.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .cases import OPS, OpCase, Preset, TrainCase
from .chart import write_chart
from .impls import IMPL_NAMES
from .op_runner import run_case
from ..atomic_io import atomic_write_text
from .records import append_jsonl, environment, make_record, read_jsonl
from .table import records_table, summary_lines
from .train import TRAIN_IMPLS, run_train_case

RESULTS = "results.jsonl"


@dataclass
class SuiteResult:
    records: list[dict]
    jsonl: Path
    chart: Path | None
    table: str
    mismatches: int


def select(preset: Preset, ops: tuple[str, ...] | None) -> list[OpCase | TrainCase]:
    ops = ops or OPS
    for op in ops:
        if op not in OPS:
            raise ValueError(f"ops: expected names from {OPS}, got {op!r}")
    return [c for c in preset.cases if (c.op if isinstance(c, OpCase) else "train_step") in ops]


def check_impls(impls: tuple[str, ...] | None) -> tuple[str, ...]:
    impls = impls or IMPL_NAMES
    for name in impls:
        if name not in IMPL_NAMES:
            raise ValueError(f"impls: expected names from {IMPL_NAMES}, got {name!r}")
    if "vanilla" not in impls:
        raise ValueError(f"impls: must include 'vanilla' (every speedup is relative to it), got {impls}")
    return tuple(n for n in IMPL_NAMES if n in impls)  # a fixed order, whatever the command line's


def device_for(preset: Preset) -> torch.device:
    if preset.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"preset {preset.name!r} needs a CUDA GPU and none is visible here; "
                               "run --smoke on a CPU (a harness check, not a performance figure)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _skipped(case, impls, env, preset, reason):
    if isinstance(case, TrainCase):
        base = dict(op="train_step", model=case.model, label=f"L={case.layers}", M=case.M, d=case.d, I=case.I, r=case.r,
                    masking=case.masking, dropping=case.dropping, lora_dropout=case.lora_dropout, dtype=case.dtype,
                    checkpointing=case.checkpointing, layers=case.layers)
        return [make_record(env, preset.name, **base, **{"pass": "fwd+bwd"}, impl=i, status="skipped", reason=reason)
                for i in impls if i in TRAIN_IMPLS]
    return [make_record(env, preset.name, **case.fields(), **{"pass": p}, impl=i, status="skipped", reason=reason)
            for p in case.passes for i in impls]


def run_suite(preset: Preset, out_dir: Path, ops=None, impls=None, budget_s: float | None = None, log=print,
              resume: bool = False) -> SuiteResult:
    """``resume``: keep the cases an earlier run of ``out_dir`` finished (see ``_finished``) and run
    only the others; otherwise results.jsonl starts empty."""
    impls = check_impls(impls)
    cases = select(preset, ops)
    device = device_for(preset)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if preset.cpu_threads is not None:
        torch.set_num_threads(preset.cpu_threads)
    try:
        return _run(preset, cases, impls, device, out_dir, budget_s, log, resume)
    finally:
        torch.set_num_threads(threads)


# A record measured elsewhere or with other code is not a finished cell of this run.
_SAME_RUN = ("preset", "device", "gpu", "torch", "commit")


def _finished(jsonl: Path, cases, impls, env: dict, preset: Preset) -> dict[str, list[dict]]:
    """Per case key, the records of the cases an earlier run of the same preset, device and code
    finished: a record for every (pass, impl) this run would write, not all of them skipped (a case
    the time budget skipped is run again)."""
    if not jsonl.is_file():
        return {}
    by_key: dict[str, list[dict]] = {}
    for r in read_jsonl(jsonl):
        if r.get("case_key") and all(r.get(k) == (preset.name if k == "preset" else env.get(k)) for k in _SAME_RUN):
            by_key.setdefault(r["case_key"], []).append(r)
    done = {}
    for case in cases:
        recs = by_key.get(case.key, [])
        expected = {(r["pass"], r["impl"]) for r in _skipped(case, impls, env, preset, "")}
        if {(r["pass"], r["impl"]) for r in recs} == expected and any(r["status"] != "skipped" for r in recs):
            done[case.key] = [r for r in recs if (r["pass"], r["impl"]) in expected]
    return done


def _run(preset, cases, impls, device, out_dir: Path, budget_s, log, resume: bool = False) -> SuiteResult:
    jsonl = out_dir / RESULTS
    env = environment(device)
    done = _finished(jsonl, cases, impls, env, preset) if resume else {}
    # A fresh file per run (records of one run only), or the finished cases of the run being resumed.
    kept = [r for recs in done.values() for r in recs]
    atomic_write_text(jsonl, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    log(f"bench: preset {preset.name}, {len(cases)} cases, impls {', '.join(impls)}, device {env['gpu'] or 'cpu'}")
    for note in preset.notes:
        log(f"bench: {note}")
    records, start, op_cases = [], time.perf_counter(), 0
    for k, case in enumerate(cases, 1):
        if case.key in done:
            log(f"bench: [{k}/{len(cases)}] {case.key}: finished by the earlier run, kept")
            records += done[case.key]
            op_cases += isinstance(case, OpCase)
            continue
        elapsed = time.perf_counter() - start
        if budget_s is not None and elapsed > budget_s:
            recs = _skipped(case, impls, env, preset, f"time budget of {budget_s:g} s reached before this case")
        else:
            log(f"bench: [{k}/{len(cases)}] {case.key} (t={elapsed:.0f}s)")
            if isinstance(case, TrainCase):
                recs = run_train_case(case, impls, device, preset, env, log)
            else:
                op_cases += 1
                skip = {}
                if preset.compiled_cases is not None and op_cases > preset.compiled_cases:
                    skip["vanilla_compiled"] = (f"preset {preset.name}: compiled on its first {preset.compiled_cases} "
                                                "op cases only (a compilation per shape; see the full preset)")
                recs = run_case(case, impls, device, preset, env, log, skip)
        for r in recs:
            r["case_key"] = case.key
        append_jsonl(jsonl, recs)
        records += recs
    table = records_table(records)
    atomic_write_text(out_dir / "table.txt", table + "\n\n" + "\n".join(summary_lines(records)) + "\n")
    try:
        chart = write_chart(records, out_dir)
    except ValueError as e:
        log(f"bench: no chart: {e}")
        chart = None
    mismatches = sum(r["status"] == "numerics_mismatch" for r in records)
    return SuiteResult(records, jsonl, chart, table, mismatches)
