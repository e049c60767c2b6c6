"""The training-step benchmark's memory accounting, replayed on the CPU: what is allocated when each
implementation's timed steps start, and the peak while they run.

    python benchmarks/train_peak_memory_cpu.py [--json OUT] [--impls vanilla torch]

Runs bench.train.run_train_case (the GPU benchmark's harness: one model, implementations in turn,
numerics check, saved-bytes count, warm-up, timed steps) on a small Llama-shaped stack (2 layers, d 512,
I 2048, vocab 4096, 2 x 128 tokens, bf16, LoRA r 16 on all linear layers, LoRA dropout 0.05, masking 0.1,
dropping 0.1) under torch.profiler's memory tracking, and replays the allocations in order: live bytes
at the start of each implementation's timed steps and their peak. On a GPU the benchmark records
``torch.cuda.max_memory_allocated`` over those steps, which is that peak plus everything allocated
before (weights, optimizer state, and whatever an earlier step of the harness left behind).

Why: the first H200 run's train-step peaks grew with each implementation measured (vanilla 72.5 GB,
then triton 75.8, cuda 93.2; 87-97 GB on the next case) although ours saves less. Replayed here, the
same harness showed the live bytes at the start of the timed steps growing from one implementation to
the next: memory.saved_activation_bytes leaked the forward it counted (a reference cycle through C++).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def replay(impls: list[str]) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    from transpeft_kernels.bench import train as T
    from transpeft_kernels.bench.cases import PRESETS, TrainCase

    real = T.time_calls

    def marked(*args, **kwargs):
        with record_function("timed_steps"):
            return real(*args, **kwargs)

    case = TrainCase(model="llama-small", layers=2, d=512, I=2048, heads=4, kv_heads=2, vocab=4096, batch=2, seq=128,
                     checkpointing=False, r=16, lora_dropout=0.05, masking=0.1, dropping=0.1, dtype="bfloat16",
                     steps=3, warmup=1)
    T.time_calls = marked
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            records = T.run_train_case(case, impls, torch.device("cpu"), PRESETS["smoke"](), {}, log=print)
    finally:
        T.time_calls = real
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    spans = [(e.time_range.start, e.time_range.end) for e in events if e.name == "timed_steps"]
    start_live: list[int | None] = [None] * len(spans)
    peak: list[int] = [0] * len(spans)
    live = 0
    for e in events:  # each op's own allocations minus frees, in the order the ops started
        t = e.time_range.start
        for i, (s, end) in enumerate(spans):
            if start_live[i] is None and t >= s:
                start_live[i] = live
        live += e.self_cpu_memory_usage
        for i, (s, end) in enumerate(spans):
            if s <= t <= end:
                peak[i] = max(peak[i], live)
    ran = [r["impl"] for r in records if r["status"] == "ok"]
    out = {"case": {k: getattr(case, k) for k in ("layers", "d", "I", "vocab", "batch", "seq", "r", "lora_dropout",
                                                   "masking", "dropping", "dtype")},
           "statuses": {r["impl"]: r["status"] for r in records}, "by_impl": {}}
    for impl, s0, p in zip(ran, start_live, peak):
        out["by_impl"][impl] = {"live_at_timed_start_mb": round((s0 or 0) / 2**20, 2), "peak_during_timed_mb": round(p / 2**20, 2),
                                "peak_above_start_mb": round((p - (s0 or 0)) / 2**20, 2)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--impls", nargs="+", default=["vanilla", "torch"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transpeft_kernels.provenance import environment

    result = replay(args.impls)
    result["environment"] = environment(torch.device("cpu"))
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
