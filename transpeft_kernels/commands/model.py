"""``model``: the GPU time of every op and implementation as a roofline MODEL, on any machine.

Each implementation runs its real code path once, forward and backward, on meta tensors (nothing is
computed); every launch is recorded (perf/ledger.py) and priced on the chosen GPU (perf/roofline.py).
Prints one table per device; ``--json`` writes one record per (op, implementation, case, device).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

NAME = "model"
HELP = "predict GPU time, bytes and launches of every op and implementation (a roofline model; no GPU needed)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="h200", help="comma-separated: h200, h100, a100 (default h200)")
    p.add_argument("--json", metavar="OUT", help="write the records to this JSON file")
    p.add_argument("--ops", default="lora_linear,gated_mlp,train_step", help="comma-separated ops (default all)")
    p.add_argument("--impls", default="vanilla,floor,torch,triton,cuda",
                   help="comma-separated implementations (default all; torch is the slowest to record)")
    p.add_argument("--ledger", action="store_true", help="also print every launch of every case (long)")
    p.add_argument("--tf32", action="store_true",
                   help="record with torch's fp32 matmuls on CUDA allowed to use TF32 (as after "
                        "torch.set_float32_matmul_precision('high') or transformers' tf32=True): vanilla's fp32 LoRA "
                        "matmuls on the tf32 tensor cores, ours as single tf32 products instead of tf32x3")
    p.add_argument("--compare", metavar="RESULTS_JSONL",
                   help="instead of the default cases: the model beside every op-level fwd+bwd time of this "
                        "benchmark run on a GPU (model error = measured / predicted); --json writes the pairs")


def _names(text: str, allowed, what: str) -> list[str]:
    from ..errors import UserError

    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise UserError(f"--{what}: expected comma-separated names from {tuple(allowed)}, got {text!r}")
    return names


def records_for(case, impls, devices, show_ledger: bool = False) -> list[dict]:
    """Record each implementation of ``case`` once per launch-config arch and price it on each device."""
    from ..kernels.env import dry_running
    from ..perf.ledger import recording
    from ..perf.roofline import launch_ms, predict

    ledgers: dict[tuple, object] = {}
    out = []
    for dev in devices:
        preds = {}
        for impl in impls:
            key = (dev.arch, impl)
            if key not in ledgers:  # the launches depend on the arch's configs, not on the device's speed
                with dry_running(dev.target):
                    step = _prepare(case, impl)
                with recording(dev.target) as ledger:
                    step()
                ledgers[key] = ledger
            ledger = ledgers[key]
            preds[impl] = predict(ledger, dev)
            if show_ledger:
                print(f"\n{case.label} | {impl} | {dev.name} (model)")
                for x in ledger.launches:
                    print(f"  {x.kind:9s} {x.name:34s} R {x.bytes_read / 1e6:9.1f} MB  W {x.bytes_written / 1e6:9.1f} MB  "
                          f"{sum(x.flops.values()) / 1e9:9.1f} GF  {launch_ms(x, dev):8.3f} ms  {x.detail}")
        floor, vanilla = preds.get("floor"), preds.get("vanilla")
        for impl, p in preds.items():
            out.append({
                **case.fields(), "impl": impl, "device": dev.name, "kind": "model",
                "launches": p.launches, "bytes_read": p.bytes_read, "bytes_written": p.bytes_written,
                "flops": p.flops, "predicted_ms": round(p.ms, 4),
                "ratio_vs_floor": round(p.ms / floor.ms, 4) if floor else None,
                "speedup_vs_vanilla": round(vanilla.ms / p.ms, 4) if vanilla else None,
                "extra_bytes_vs_floor": p.bytes - floor.bytes if floor else None,
                "host_syncs": p.host_syncs, "h2d_copies": p.h2d_copies,
            })
    return out


def _prepare(case, impl):
    from ..perf.cases import prepare

    return prepare(case, impl)


_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def format_table(records: list[dict]) -> str:
    from ..text_table import format_table as table

    header = ["op", "r", "q", "adapters", "impl", "ms (model)", "x floor", "x vanilla", "launches", "GB moved",
              "extra GB", "syncs", "h2d"]
    rows = [[r["op"], r["r"], r["lora_dropout"], _SHORT_DTYPE.get(r["adapter_dtype"], r["adapter_dtype"]), r["impl"],
             r["predicted_ms"], r["ratio_vs_floor"], r["speedup_vs_vanilla"], r["launches"],
             round((r["bytes_read"] + r["bytes_written"]) / 1e9, 2),
             None if r["extra_bytes_vs_floor"] is None else round(r["extra_bytes_vs_floor"] / 1e9, 2),
             r["host_syncs"], r["h2d_copies"]] for r in records]
    return table(rows, header)


def _predict_case(case, impls, dev) -> dict:
    return {r["impl"]: r["predicted_ms"] for r in records_for(case, impls, [dev])}


def _compare(args) -> int:
    from pathlib import Path

    from ..bench.records import read_jsonl
    from ..errors import UserError
    from ..perf.compare import model_beside_measured

    path = Path(args.compare)
    if not path.is_file():
        raise UserError(f"--compare: no such file {str(path)!r}")
    pairs = model_beside_measured(read_jsonl(path), _predict_case)
    if not pairs:
        print(f"{path}: no op-level fwd+bwd GPU records with a modelled device (H100, H200, A100)")
    for p in pairs:
        print(f"{p['op']:12s} M={p['M']:<6d} r={p['r']:<3d} q={p['lora_dropout']:<5g} {p['fp32_matmul']:4s} {p['impl']:8s} {p['gpu']}: "
              f"measured {p['measured_ms']:.3f} ms, model {p['predicted_ms']:.3f} ms, measured/model {p['model_error']:.2f}")
    if args.json:
        from ..atomic_io import atomic_write_text

        atomic_write_text(args.json, json.dumps({"kind": "model_vs_measured", "records": pairs}, indent=1) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..bench.records import environment
    from ..perf.cases import IMPLS, OPS, default_cases
    from ..perf.devices import DEVICES, device

    if args.compare:
        return _compare(args)

    devices = [device(n) for n in _names(args.device, DEVICES, "device")]
    ops = _names(args.ops, OPS, "ops")
    impls = _names(args.impls, IMPLS, "impls")
    from ..kernels.env import cuda_fp32_matmul, cuda_fp32_matmul_is_tf32

    fp32_matmul = "tf32" if args.tf32 or cuda_fp32_matmul_is_tf32() else "ieee"
    t0 = time.time()
    records = []
    with cuda_fp32_matmul(fp32_matmul):
        for case in [c for c in default_cases() if c.op in ops]:
            records += records_for(case, impls, devices, args.ledger)
            print(f"  recorded {case.label} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    for dev in devices:
        print(f"\n{dev.name}: predicted fwd+bwd time, a roofline MODEL (not measured); "
              f"M 8192, d 4096, I 14336 / n 4096, bf16 base, masking 0.1 (MLP); fp32 matmuls {fp32_matmul}")
        print(format_table([r for r in records if r["device"] == dev.name]))
    if args.json:
        import torch

        env = environment(torch.device("cpu"))
        doc = {"kind": "model", "note": "roofline model of recorded launches; not a measurement",
               "commit": env["commit"], "torch": env["torch"], "triton": env["triton"],
               "transformers": env["transformers"], "peft": env["peft"], "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               # the switches that change which kernels the triton backend launches
               "settings": {**{k: v for k, v in sorted(os.environ.items()) if k.startswith("TRANSPEFT_")},
                            "fp32_matmul": fp32_matmul},
               "records": records}
        from ..atomic_io import atomic_write_text

        atomic_write_text(args.json, json.dumps(doc, indent=1) + "\n")
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0
