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
  triton launch path: lora_linear fwd+bwd (bf16 x 8 x 64 -> 64, fp32 adapters r 16, LoRA dropout 0.05) and
               the gated MLP fwd+bwd (d 64, I 128, masking 0.1) on backend="triton", in a subprocess without
               TRITON_INTERPRET under a stub CUDA driver (perf/triton_stub_driver.py): kernels compile
               for sm_90 and every host step up to the compiled kernel's launcher runs, only the launch
               itself is skipped. Ours through Triton's kernel[grid] path and through direct launches
               (kernels/triton/direct_launch.py), beside vanilla PEFT at the same shapes, alternated.
               The first H200 run found lora_linear 1.8-3.4 ms whatever the shape: this is the CPU side
               of that question.
  cuda launch path: the MLP with the cuda backend's library calls stubbed (wrappers and structs run).
One thread; means of many warm calls. Host-time figures: compare runs on the same machine only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
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


def _lora_linear_case(backend):
    """(vanilla, ours) closures: lora_linear fwd+bwd, bf16 x 8 x 64 -> 64, fp32 adapters r 16, LoRA dropout
    0.05, PEFT's LoRA Linear against ops.lora_linear on ``backend``."""
    from peft import LoraConfig, get_peft_model

    from transpeft_kernels import ops
    from transpeft_kernels.specs import LinearWeights, LoraWeights

    M, d, n, r = 8, 64, 64, 16

    class Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(d, n, bias=False)

        def forward(self, x):
            return self.q(x)

    layer = get_peft_model(Proj().to(torch.bfloat16),
                           LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=["q"])).base_model.model.q
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.nn.init.normal_(B)
    x = torch.randn(M, d, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, n, dtype=torch.bfloat16)
    w = LinearWeights(layer.base_layer.weight, None, LoraWeights(A, B, 2.0, 0.05))
    seed = torch.tensor(3)

    def vanilla():
        torch.autograd.grad(layer(x), [x, A, B], dy)

    def ours():
        torch.autograd.grad(ops.lora_linear(x, w, seed, backend), [x, A, B], dy)

    return vanilla, ours


def _alternating(fns: dict, n: int, rounds: int = 3) -> dict:
    """Each function's mean time (us) over ``n`` calls, measured in ``rounds`` alternating rounds; the
    median round (the VM drifts: alternation keeps the comparison side by side)."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_mean_us(fn, n))
    return {k: round(sorted(v)[len(v) // 2]) for k, v in times.items()}


def triton_launch_path() -> dict:
    """Runs without TRITON_INTERPRET (main clears it for this subprocess), under the stub CUDA driver of
    perf/triton_stub_driver.py: the kernels compile for sm_90 and everything up to each compiled kernel's
    launcher runs as on a GPU machine (our launchers, Triton's own launch path, autograd, ATen), the
    launcher itself records instead of launching. Ours twice: every launch through Triton's
    ``kernel[grid]`` path, and through the compiled kernels (kernels/triton/direct_launch.py)."""
    from transpeft_kernels.kernels.triton import direct_launch
    from transpeft_kernels.ops.backends import by_name
    from transpeft_kernels.perf.triton_stub_driver import stub_cuda_driver

    torch.set_num_threads(1)
    torch.manual_seed(0)
    backend = by_name("triton")
    backend._cpu_ok = True  # CPU tensors reach the real JITFunctions; only the stub driver sees them
    out = {}
    with stub_cuda_driver(arch=90) as state:
        for label, (vanilla, ours), n in (("lora_linear", _lora_linear_case(backend), 1000),
                                          ("mlp", _mlp_case(backend), 400)):
            ours()  # compile (Triton's cache makes later runs quick)
            state.launches.clear()
            state.record = True
            ours()
            launches = len(state.launches)
            state.launches.clear()
            state.record = False  # the records would keep every call's tensors alive

            def through_triton(ours=ours):
                direct_launch.ENABLED = False
                ours()

            def direct(ours=ours):
                direct_launch.ENABLED = True
                ours()

            t = _alternating({"vanilla": vanilla, "through_triton": through_triton, "direct": direct}, n)
            out[f"vanilla_peft_{label}_fwd_bwd"] = t["vanilla"]
            out[f"triton_{label}_fwd_bwd_through_tritons_launch_path"] = t["through_triton"]
            out[f"triton_{label}_fwd_bwd_direct_launch"] = t["direct"]
            out[f"triton_{label}_launches_per_call"] = launches
    return out


def cuda_launch_path() -> dict:
    """Runs with TRANSPEFT_CUDA_EMULATE=1 (set by main for this subprocess): the cuda backend's wrappers,
    argument structs and autograd with every library call stubbed out (no kernel, no emulation), on the
    same shapes as triton_launch_path, beside vanilla PEFT."""
    from transpeft_kernels import ops
    from transpeft_kernels.kernels.cuda import launch as cuda_launch

    calls = [0]

    class NoKernels:
        def call(self, name, args, stream=0):
            calls[0] += 1

    cuda_launch.load = lambda: NoKernels()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return _mlp_launch_path(ops.resolve("cuda", torch.device("cpu")), calls, "cuda", "library_calls")


def _mlp_case(backend):
    """(vanilla, ours) closures: the gated MLP (Llama-shaped, d 64, I 128, 8 tokens, bf16 base, fp32
    adapters r 16, LoRA dropout 0.05, masking 0.1) fwd+bwd, vanilla PEFT with the reference masking
    against ops.masked_gated_mlp on ``backend``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from transpeft_kernels import ops
    from transpeft_kernels.baselines import vanilla_masked_mlp
    from transpeft_kernels.integration.projections import read_projection
    from transpeft_kernels.reference import Activation
    from transpeft_kernels.specs import GatedMLPWeights, MaskSpec

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=128, hidden_act="silu"))

    names = ["gate_proj", "up_proj", "down_proj"]
    inner = get_peft_model(Holder().to(torch.bfloat16), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                                  target_modules=names)).base_model.model
    inner.train()
    layers = [getattr(inner.mlp, n) for n in names]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    lins = [read_projection(layer).weights for layer in layers]
    w = GatedMLPWeights((lins[0], lins[1]), lins[2])
    params = [t for layer in layers for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(8, 64, dtype=torch.bfloat16)
    seed = torch.tensor(3)

    def vanilla():
        torch.autograd.grad(vanilla_masked_mlp(inner.mlp, x, 0.1), [x, *params], dy)

    def ours():
        torch.autograd.grad(ops.masked_gated_mlp(x, w, Activation.SILU, MaskSpec(0.1), seed, backend), [x, *params], dy)

    return vanilla, ours


def _mlp_launch_path(backend, launches, label: str, counted: str) -> dict:
    """The MLP case with the kernels stubbed (``launches[0]`` counts the stubbed calls)."""
    vanilla, ours = _mlp_case(backend)
    out = {"vanilla_peft_mlp_fwd_bwd": round(_mean_us(vanilla, 500))}
    launches[0] = 0
    out[f"{label}_mlp_fwd_bwd_kernels_stubbed"] = round(_mean_us(ours, 500))
    out[f"{label}_mlp_{counted}_per_call"] = launches[0] / 550
    return out


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


def _in_subprocess(backend: str, **env) -> dict:
    """The --<backend>-stub part's figures, run in a child with ``env`` set before anything is imported."""
    proc = subprocess.run([sys.executable, __file__, f"--{backend}-stub"], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the {backend} launch-path measurement failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--triton-stub", action="store_true", help=argparse.SUPPRESS)  # the subprocesses' parts
    ap.add_argument("--cuda-stub", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.triton_stub:
        print(json.dumps(triton_launch_path()))
        return 0
    if args.cuda_stub:
        print(json.dumps(cuda_launch_path()))
        return 0
    result = {"eager_ops_us": eager_ops(), "patched_30_layer_forward": patched_forward()}
    result["triton_launch_path_us"] = _in_subprocess("triton", TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result["cuda_launch_path_us"] = _in_subprocess("cuda", TRANSPEFT_CUDA_EMULATE="1")
    from transpeft_kernels.provenance import environment

    result["environment"] = environment(torch.device("cpu"))
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
