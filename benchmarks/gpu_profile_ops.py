"""Where the time of one op goes on a GPU: host-bound or device-bound, and which kernels.

    OUT=out/profile PYTHONPATH=. python benchmarks/gpu_profile_ops.py [--impls vanilla triton cuda]

Why: the first H200 run (benchmarks/results/gpu_h200_2026-12-04) measured lora_linear fwd+bwd at
1.8-3.4 ms on "triton" and "cuda" for every projection shape (Llama-3-8B k,v: 2.5 / 2.3 ms against
PEFT's 0.99 ms; the model predicted 0.31 / 0.45 ms), and the gated MLP ~3 ms above the model at every
token count (2048 tokens: 5.2 ms, model 2.3 ms). A cost that does not scale with the shape is either
host time (Python, launches, the dispatcher) that the GPU waits for, or a kernel whose grid does not
grow with the problem. This script tells them apart, per implementation, on the bench's own setups
(bench/impls.py: the PEFT module's tensors, fp32 adapters on a bf16 base, r 16, LoRA dropout 0.05):

  wall_ms         median of 20 fwd+bwd calls, CUDA events (what the bench reports)
  host_ms         host time to enqueue one fwd+bwd, the GPU kept busy beforehand by a long matmul queue
                  so that nothing the host does waits for it (median of 20)
  kernel_ms       the sum of the device kernels' time per call (torch.profiler, 5 calls)
  gpu_busy        kernel_ms / wall_ms: near 1 means device-bound; far below 1 and host_ms near wall_ms
                  means the GPU waits for the host
  top kernels     the 12 kernels with the most device time per call, with their launch counts
  host_profile    cProfile of 20 calls: own time by origin (Triton's runtime, this package, torch's Python,
                  C functions) and the top functions: whether Triton's launcher or our Python dominates

Implementations: vanilla, triton, triton-jit (triton with every launch through Triton's own kernel[grid]
path instead of the plans' compiled kernels: what direct launches save on this GPU's host), cuda.
Cases: lora_linear Llama-3-8B q,o and k,v at 8192 tokens; gated MLP Llama-3-8B at 2048 tokens, r 16, and
at 8192 tokens, r 64 (masking 0.1). Writes $OUT/profile_ops.json (GPU, versions, commit) and prints one block per case and impl.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_cuda_check import bench_ms  # noqa: E402
from gpu_triton_check import ROOT, environment  # noqa: E402

sys.path.insert(0, str(ROOT))


def host_ms(call, iters: int = 20) -> float:
    """Median host time of call(), each measured behind ~20 ms of queued GPU work."""
    import torch

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(iters):
        for _ in range(20):  # ~1 ms each on an H100/H200: the queue outlasts the host's enqueue
            a @ a
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def host_profile(call, calls: int = 20) -> dict:
    """Where the host time of one call goes, by cProfile (which inflates Python-heavy code: compare the
    shares, not the absolute times): own time summed by origin (Triton's runtime, this package, torch's
    Python, C functions) and the 12 functions with the most own time."""
    import cProfile
    import pstats

    import torch

    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats
    groups: dict[str, float] = {}
    rows = []
    for (filename, line, name), (_, _, tottime, _, _) in stats.items():
        if "/triton/" in filename:
            group = "triton"
        elif "transpeft_kernels" in filename:
            group = "transpeft_kernels"
        elif "/torch/" in filename:
            group = "torch_python"
        elif filename == "~":
            group = "c_functions"
        else:
            group = "other"
        groups[group] = groups.get(group, 0.0) + tottime
        rows.append((tottime, f"{Path(filename).name}:{line}({name})" if filename != "~" else name))
    rows.sort(reverse=True)
    return {"own_ms_per_call_by_origin": {k: round(v * 1e3 / calls, 4) for k, v in sorted(groups.items())},
            "top_functions": [{"function": f[:120], "own_ms_per_call": round(t * 1e3 / calls, 4)} for t, f in rows[:12]]}


def kernel_table(call, calls: int = 5) -> tuple[float, list[dict]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    kernels = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(ev.name, {"name": ev.name[:120], "us": 0.0, "count": 0})
            k["us"] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            k["count"] += 1
    rows = sorted(kernels.values(), key=lambda k: -k["us"])
    total_ms = sum(k["us"] for k in rows) / 1e3 / calls
    return total_ms, [{"name": k["name"], "ms_per_call": round(k["us"] / 1e3 / calls, 4),
                       "launches_per_call": k["count"] / calls} for k in rows[:12]]


def through_tritons_path(call):
    """call() with every Triton launch through kernel[grid] (kernels/triton/direct_launch.py off)."""
    from transpeft_kernels.kernels.triton import direct_launch

    def run():
        direct_launch.ENABLED = False
        try:
            return call()
        finally:
            direct_launch.ENABLED = True

    return run


def main() -> int:
    import torch

    from transpeft_kernels.bench.cases import MLP_SHAPES, PROJ_SHAPES, OpCase
    from transpeft_kernels.bench.impls import build_impl, build_setup
    from transpeft_kernels.bench.op_runner import make_inputs, pass_calls

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impls", nargs="+", default=["vanilla", "triton", "triton-jit", "cuda"],
                    help="triton-jit: the triton backend with every launch through Triton's kernel[grid] path "
                         "(direct launches off; not for the device-bound rank-64 case)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT", "out/profile"))
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    llama8 = MLP_SHAPES[0]
    cases = [OpCase("lora_linear", s.model, s.label, 8192, s.d, s.n, None, 16, 0.05, 0.0, s.bias, "bfloat16",
                    ("fwd+bwd",)) for s in PROJ_SHAPES[:2]]
    cases.append(OpCase("gated_mlp", llama8.model, f"d={llama8.d},I={llama8.I}", 2048, llama8.d, None, llama8.I,
                        16, 0.05, 0.1, False, "bfloat16", ("fwd+bwd",)))
    # rank 64 at 8192 tokens: the cuda backend matched vanilla there (20.4 ms) where the model said 14.4
    cases.append(OpCase("gated_mlp", llama8.model, f"d={llama8.d},I={llama8.I},r=64", 8192, llama8.d, None, llama8.I,
                        64, 0.05, 0.1, False, "bfloat16", ("fwd+bwd",)))
    report = {"environment": environment(), "cases": []}
    for case in cases:
        setup = build_setup(case, dev)
        xs, dys = make_inputs(setup, 1)
        for name in args.impls:
            if name == "triton-jit" and case.r == 64:
                continue
            try:
                impl = build_impl("triton" if name == "triton-jit" else name, setup)
                calls = pass_calls(impl, "fwd+bwd", xs, dys, setup.params)
                call = lambda: calls.call(calls.prepare(0))  # noqa: E731
                if name == "triton-jit":
                    call = through_tritons_path(call)
                for _ in range(5):
                    call()
                wall = bench_ms(call)
                host = host_ms(call)
                kernel_ms, top = kernel_table(call)
                where = host_profile(call)
            except Exception as e:  # report and go on: the other implementations still tell
                report["cases"].append({"case": f"{case.op} {case.model} {case.label} M={case.M}", "impl": name,
                                        "error": f"{type(e).__name__}: {e}"})
                print(f"ERROR {case.op} {case.label} M={case.M} {name}: {type(e).__name__}: {e}", flush=True)
                continue
            rec = {"case": f"{case.op} {case.model} {case.label} M={case.M}", "impl": name,
                   "wall_ms": round(wall, 3), "host_ms": round(host, 3), "kernel_ms": round(kernel_ms, 3),
                   "gpu_busy": round(kernel_ms / wall, 3), "top_kernels": top, "host_profile": where}
            report["cases"].append(rec)
            print(f"INFO  {rec['case']}  {name}: wall {wall:.3f} ms, host {host:.3f} ms, kernels {kernel_ms:.3f} ms "
                  f"(busy {kernel_ms / wall:.2f})", flush=True)
            for k in top[:8]:
                print(f"        {k['ms_per_call']:8.4f} ms  x{k['launches_per_call']:<4g} {k['name'][:90]}")
            print(f"        host own time by origin (cProfile, ms per call): {where['own_ms_per_call_by_origin']}")
            (out / "profile_ops.json").write_text(json.dumps(report, indent=1) + "\n")
        del setup, xs, dys
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
