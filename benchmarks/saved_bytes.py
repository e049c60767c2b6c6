"""Saved activation bytes per patched MLP against vanilla PEFT with the reference code's float mask.

    python benchmarks/saved_bytes.py [--out benchmarks/results/saved_bytes_cpu.json]

Counts what autograd keeps for backward (saved_tensors_hooks, parameters excluded) for one Llama MLP
with PEFT LoRA r=16 on gate/up/down, masking 0.1, on the torch backend. Device-independent: the
bytes are a property of the graph, so a CPU run gives the figure a GPU run would.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

import warnings

import torch

from transpeft_kernels.baselines import mlp_saved_bytes_vs_vanilla

SHAPES = [("SmolLM2-135M", 576, 1536), ("Llama-3.2-1B", 2048, 8192)]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    import peft
    import transformers

    env = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "commit": _commit()}
    rows = []
    for name, d, inter in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            for q in (0.0, 0.05):
                vanilla, ours = mlp_saved_bytes_vs_vanilla(d, inter, args.tokens, dtype, rank=16, lora_dropout=q)
                rows.append({"shape": name, "d": d, "I": inter, "M": args.tokens, "dtype": str(dtype).split(".")[-1],
                             "lora_dropout": q, "vanilla_bytes": vanilla, "ours_bytes": ours,
                             "ratio": round(ours / vanilla, 3), **env})
                print(f"{name:>13} {rows[-1]['dtype']:>8} lora_dropout={q:<4} vanilla {vanilla / 2**20:7.2f} MiB  "
                      f"ours {ours / 2**20:7.2f} MiB  ratio {ours / vanilla:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
