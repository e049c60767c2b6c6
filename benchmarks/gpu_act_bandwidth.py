"""Masked activation bandwidth on one GPU, every backend side by side, and the torch backend's masks.

    OUT=out/act PYTHONPATH=. python benchmarks/gpu_act_bandwidth.py

bf16 g, u, dh of 8192 x 14336 (the Llama-3-8B MLP at 8192 tokens), SiLU, knowledge masking 0.1 with
rescaling, and unmasked (p = 0) to show what the mask costs:
  forward  reads g, u and writes h'           (3 x 235 MB)
  backward reads dh', g, u and writes dg, du  (5 x 235 MB)
as GB/s against a device-to-device copy of the same total size (bytes read + written), measured in the
same run. Rows: "triton" with its fixed default config (TRANSPEFT_TRITON_AUTOTUNE=0) and autotuned
(the chosen config recorded), "cuda" (when the library loads), and eager PyTorch's silu(g) * u without
a mask (what an unfused implementation pays for the activation alone). Then the torch backend's
costs on the GPU: one reference keep_mask of 8192 x 14336 and the gated MLP fwd+bwd (bf16 base, fp32
adapters r 16, masking 0.1, LoRA dropout 0.05). Medians of 20 warm calls (CUDA events). Writes
$OUT/act_bandwidth.json with the GPU, versions and commit.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_cuda_check import bench_ms, gated_mlp_problem  # noqa: E402
from gpu_triton_check import ROOT, environment  # noqa: E402

sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch
    import torch.nn.functional as F

    from transpeft_kernels import ops, reference as R
    from transpeft_kernels.kernels import triton as KT
    from transpeft_kernels.specs import MaskSpec

    if not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT", "out/act"))
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda"
    M, I = 8192, 14336
    g, u, dh = (torch.randn(M, I, device=dev, dtype=torch.bfloat16) for _ in range(3))
    seed = torch.tensor(5, device=dev)
    elt = g.element_size() * M * I
    src = torch.empty(4 * elt, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() / copy_ms / 1e6
    del src, dst
    report = {"environment": environment(), "shape": [M, I], "dtype": "bfloat16", "activation": "silu",
              "copy_GBps": round(copy_gbs, 1), "rows": []}

    def row(backend: str, variant: str, p: float, fwd, bwd):
        for name, nbytes, fn in (("fwd", 3 * elt, fwd), ("bwd", 5 * elt, bwd)):
            if fn is None:
                continue
            ms = bench_ms(fn)
            gbs = nbytes / ms / 1e6
            report["rows"].append({"backend": backend, "variant": variant, "p": p, "pass": name, "ms": round(ms, 4),
                                   "GBps": round(gbs, 1), "fraction_of_copy": round(gbs / copy_gbs, 3)})
            print(f"INFO  {backend:6s} {variant:16s} p={p:<4} {name}  {ms:.3f} ms  {gbs:6.0f} GB/s  "
                  f"{gbs / copy_gbs:.2f} of copy ({copy_gbs:.0f} GB/s)", flush=True)

    for autotune in ("0", "1"):
        os.environ["TRANSPEFT_TRITON_AUTOTUNE"] = autotune
        for p in (0.1, 0.0):
            row("triton", "default config" if autotune == "0" else "autotuned", p,
                lambda: KT.masked_gated_act_fwd(g, u, "silu", p, True, seed),
                lambda: KT.masked_gated_act_bwd(dh, g, u, "silu", p, True, seed))
    os.environ.pop("TRANSPEFT_TRITON_AUTOTUNE")
    from transpeft_kernels.kernels.triton import configs

    # what the tuner chose (the default config reached 0.41 / 0.51 of copy on the first H200 run, tuned 0.66 / 0.72)
    report["triton_autotuned_configs"] = {repr(k): repr(v) for k, v in configs._CACHE.items() if k[0] == "elementwise"}
    for k, v in report["triton_autotuned_configs"].items():
        print(f"INFO  triton tuned {k}: {v}", flush=True)
    try:
        from transpeft_kernels.kernels import cuda as KC

        KC.library.load()
        for p in (0.1, 0.0):
            row("cuda", "", p, lambda: KC.masked_gated_act_fwd(g, u, "silu", p, True, seed),
                lambda: KC.masked_gated_act_bwd(dh, g, u, "silu", p, True, seed))
    except Exception as e:  # the CUDA library is optional here: report, go on
        report["cuda_error"] = f"{type(e).__name__}: {e}"
        print(f"INFO  cuda not measured: {report['cuda_error']}")
    row("eager", "silu(g) * u", 0.0, lambda: F.silu(g) * u, None)

    keep_ms = bench_ms(lambda: R.keep_mask(seed, M, I, 0.1, device=dev), iters=5)
    report["torch_backend"] = {"keep_mask_ms": round(keep_ms, 3)}
    print(f"INFO  reference keep_mask {M}x{I} on the GPU  {keep_ms:.2f} ms", flush=True)
    del dh
    w, x, dy, leaves = gated_mlp_problem(M, 4096, I, 16)
    be = ops.resolve("torch", torch.device(dev))

    def step():
        y = ops.masked_gated_mlp(x, w, R.Activation.SILU, MaskSpec(0.1), seed, be)
        torch.autograd.grad(y, leaves, dy)

    mlp_ms = bench_ms(step, iters=5)
    report["torch_backend"]["gated_mlp_fwd_bwd_ms"] = round(mlp_ms, 2)
    print(f"INFO  gated MLP fwd+bwd, torch backend  {mlp_ms:.1f} ms", flush=True)
    (out / "act_bandwidth.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
