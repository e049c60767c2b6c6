"""Host-side cost of the ops layer on CPU: what Python and the dispatcher add per call, measured on
tiny shapes where the arithmetic is negligible.

    python benchmarks/host_overhead.py [--json OUT]

  eager ops:   mean time of lora_linear fwd+bwd (8 x 64 -> 64, r 4), masked gated MLP fwd+bwd and fwd
               (d 64, I 96, r 4, 8 tokens), torch backend, after 50 warm-up calls; no mask and no LoRA
               dropout (the torch backend's Philox arithmetic would dominate the host cost)
  patched 30-layer forward: a Llama-shaped model with 30 layers (hidden 64, intermediate 96, LoRA r 4 on
               all linear layers, training mode, masking 0 and dropping 0: the fused path without random
               work), one forward of 1 x 8 tokens, patched and unpatched; the difference is the patch's
               host time per forward
One thread; means of many warm calls. Host-time figures: compare runs on the same machine only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _mean_us(fn, n: int, warmup: int = 50) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def eager_ops() -> dict:
    from transpeft_kernels import ops
    from transpeft_kernels.reference import Activation
    from transpeft_kernels.specs import GatedMLPWeights, LinearWeights, LoraWeights

    def lin(d_in, d_out, r=4, q=0.0):
        return LinearWeights(torch.randn(d_out, d_in), None, LoraWeights(
            torch.randn(r, d_in).requires_grad_(), torch.randn(d_out, r).requires_grad_(), 2.0, q))

    backend = ops.resolve("torch", torch.device("cpu"))
    seed = torch.tensor(3)
    w = lin(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    mlp = GatedMLPWeights((lin(64, 96), lin(64, 96)), lin(96, 64))
    xm = torch.randn(8, 64, requires_grad=True)
    mask = None

    def lora_fb():
        ops.lora_linear(x, w, seed, backend).sum().backward()

    def mlp_fb():
        ops.masked_gated_mlp(xm, mlp, Activation.SILU, mask, seed, backend).sum().backward()

    def mlp_f():
        ops.masked_gated_mlp(xm, mlp, Activation.SILU, mask, seed, backend)

    return {"lora_linear_fwd_bwd": round(_mean_us(lora_fb, 2000)), "mlp_fwd_bwd": round(_mean_us(mlp_fb, 1000)),
            "mlp_fwd": round(_mean_us(mlp_f, 1000))}


def patched_forward() -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import transpeft_kernels as tpk

    def model():
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=30, num_attention_heads=2,
                          num_key_value_heads=2, vocab_size=128)
        m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        m.train()
        return m

    ids = torch.randint(0, 128, (1, 8))
    plain, patched = model(), model()
    tpk.patch(patched, masking=0.0, dropping=0.0)
    out = {}
    for name, m in (("unpatched_us", plain), ("patched_us", patched)):
        with torch.no_grad():
            out[name] = round(_mean_us(lambda m=m: m(input_ids=ids), 100, warmup=10))
    out["patch_host_us_per_forward"] = out["patched_us"] - out["unpatched_us"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = {"eager_ops_us": eager_ops(), "patched_30_layer_forward": patched_forward()}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
