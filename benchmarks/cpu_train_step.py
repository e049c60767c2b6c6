"""A Trans-PEFT training step on CPU with the torch backend, against vanilla PEFT with the reference
code's masking, side by side in one run (the benchmark suite's train_step harness, ``run_train_case``).

    python benchmarks/cpu_train_step.py [--threads 2] [--steps 4] [--json OUT]

Shape: SmolLM2-135M's (d 576, I 1536, 9/3 heads, vocab 49152) with 6 of its 30 layers, batch 4 x 128
tokens, fp32, LoRA r 16 on all linear layers, lora_dropout 0.05, masking 0.1, dropping 0 (dropping
skips FFNs, which would make trans-peft look cheaper than it is). Prints and records the median step
time of each and the ratio torch / vanilla (target <= 1.3). Medians of warm steps; a shared machine
makes both slower, so compare ratios measured in the same run only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2_6 = dict(model="SmolLM2-135M (6 layers)", layers=6, d=576, I=1536, heads=9, kv_heads=3, vocab=49152,
                 tie_embeddings=True)


def main(argv=None) -> int:
    from transpeft_kernels.bench.cases import Preset, TrainCase
    from transpeft_kernels.bench.train import run_train_case
    from transpeft_kernels.provenance import environment

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per implementation (after 1 warm-up)")
    ap.add_argument("--json", type=Path, help="write the records and the ratio here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = TrainCase(**SMOLLM2_6, batch=4, seq=128, checkpointing=False, r=16, lora_dropout=0.05, masking=0.1,
                     dropping=0.0, dtype="float32", steps=args.steps, warmup=1)
    preset = Preset("cpu-train-step", (case,), device="cpu", reps=args.steps, warmup=1, check_tokens=64,
                    cpu_threads=args.threads)
    env = environment(torch.device("cpu"))
    records = run_train_case(case, ["vanilla", "torch"], torch.device("cpu"), preset, env)
    ms = {r["impl"]: r.get("median_ms") for r in records}
    for r in records:
        print(f"{r['impl']:>8}: {r['status']:>6}  median {r.get('median_ms')} ms per step  {r.get('reason') or ''}")
    ratio = ms["torch"] / ms["vanilla"] if ms.get("torch") and ms.get("vanilla") else None
    print(f"torch / vanilla = {ratio:.2f} (target <= 1.3; threads {args.threads})" if ratio else "ratio: not measured")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"ratio_torch_over_vanilla": ratio, "threads": args.threads,
                                         "records": records}, indent=1, default=str) + "\n")
    return 0 if ratio else 1


if __name__ == "__main__":
    sys.exit(main())
