"""GPU check and measurements of the CUDA C++ backend (backend="cuda"), for a session with one GPU.

    OUT=out/cuda PYTHONPATH=. python benchmarks/gpu_cuda_check.py [--budget-s 300] [--skip-pytest]

1. Library: uses $TRANSPEFT_CUDA_LIB / the installed / cached library, else builds it with the JIT
   route (kernels/cuda/build.py) for this GPU's architecture only (sm_90a on H100/H200; ~1-2 min).
2. Smoke numerics: knowledge and LoRA-dropout masks bit-equal to the reference (offsets past 2**31
   included) and across torch/triton/cuda; one bf16 gated MLP fwd+bwd on "cuda" vs "torch" vs float64,
   with a check that the fused kernels ran.
3. Bandwidth (bf16, 8192 x 14336): masked activation forward (reads g, u; writes h') and backward
   (reads dh', g, u; writes dg, du), plain and with the down projection's LoRA fused (r = 16), as
   achieved GB/s against a device-to-device copy of the same bytes. Target: plain fwd/bwd >= 85 %.
4. Gated MLP fwd+bwd, bf16 base, fp32 adapters, d = 4096, I = 14336, 8192 tokens, r = 16 on all three
   projections, masking 0.1, LoRA dropout 0.05: "cuda" (and "torch", "triton" when available) against
   the frozen-GEMM floor (the 6 bf16 GEMMs a frozen base needs: gate, up, down forward; dh, dx(gate),
   dx(up) backward). Target: cuda <= 1.10 x floor.
5. pytest python_tests/test_cuda_ops.py on the GPU (skipped with --skip-pytest or when the budget is spent).
Writes $OUT/cuda_check.json after every section (GPU, versions, commit, each result), prints one line
per check; exit status 1 if a check failed, 2 without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS: dict = {"checks": [], "bandwidth": {}, "mlp": {}}
FAILED: list[str] = []
T0 = time.time()


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    RESULTS["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
    if not ok:
        FAILED.append(name)


def save(out: Path) -> None:
    RESULTS["elapsed_s"] = round(time.time() - T0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_check.json").write_text(json.dumps(RESULTS, indent=2) + "\n")


def commit() -> str:
    if os.environ.get("TPK_COMMIT"):
        return os.environ["TPK_COMMIT"]
    if (ROOT / "COMMIT").is_file():
        return (ROOT / "COMMIT").read_text().strip()
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    import torch

    from transpeft_kernels.kernels.cuda import build

    env = {"gpu": torch.cuda.get_device_name(), "capability": ".".join(map(str, torch.cuda.get_device_capability())),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "commit": commit(), "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    nvcc = build.find_nvcc()
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        env["nvcc"] = out[-1] if out else None
    return env


def ensure_library() -> None:
    import torch

    from transpeft_kernels.kernels.cuda import build, library

    path = library.find_library()
    if path is None:
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}" + ("a" if major == 9 else "")
        t = time.time()
        path = build.build(archs=(arch,))
        RESULTS["build"] = {"route": "jit", "arch": arch, "seconds": round(time.time() - t, 1), "path": str(path)}
        print(f"built {path} for sm_{arch} in {time.time() - t:.0f}s", flush=True)
    else:
        RESULTS["build"] = {"route": "found", "path": str(path)}
    os.environ["TRANSPEFT_CUDA_LIB"] = str(path)
    library._LOADED = None
    check("library loads", library.load().path == path, str(path))


def bench_ms(fn, iters: int = 20) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def smoke() -> None:
    import torch

    from transpeft_kernels import ops, reference as R
    from transpeft_kernels.kernels import cuda as K
    from transpeft_kernels.kernels.cuda import library
    from transpeft_kernels.reference.lora import dropout_multiplier
    from transpeft_kernels.reference.philox import philox_uniform
    from transpeft_kernels.specs import GatedMLPWeights, LinearWeights, LoraWeights, MaskSpec, SubSeed, sub_seed

    dev = torch.device("cuda")
    seed = torch.tensor(2**41 + 3)
    g = (1 + torch.rand(3000, 1537, device=dev)).bfloat16()
    want = R.keep_mask(sub_seed(seed, SubSeed.MASK), 3000, 1537, 0.1, device=dev)
    names = dict.fromkeys([*ops.runnable_backends(), "cuda"])  # cuda is required here: resolve() says why not
    for name in names:
        h = ops.masked_gated_act(g, g, R.Activation.SILU, MaskSpec(0.1), seed, ops.resolve(name, dev))
        check(f"knowledge mask == reference ({name})", torch.equal(h != 0, want))
    x = 1 + torch.rand(1000, 96, device=dev)
    s = K.lora_shrink(x, torch.eye(96, device=dev), K.Dropout(0.05, seed))
    check("lora_shrink dropout == reference", torch.equal(s, x * dropout_multiplier(seed, x, 0.05)))
    rows, cols = 150_000, 14_336
    big = torch.ones(rows, cols, dtype=torch.bfloat16, device=dev)
    h = K.masked_gated_act_fwd(big, big, "silu", 0.3, False, seed)
    tail = torch.arange(rows - 3, rows, device=dev, dtype=torch.int64)[:, None] * cols + torch.arange(cols, device=dev)
    check("mask at offsets past 2**31 == reference", torch.equal(h[-3:] != 0, philox_uniform(seed, tail) >= 0.3))
    del big, h

    calls: list[str] = []
    original = library.Library.call
    library.Library.call = lambda self, name, *a: (calls.append(name), original(self, name, *a))[1]
    try:
        gen = torch.Generator().manual_seed(0)

        def lin(d_in, d_out, r):
            W = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).bfloat16()
            A = (torch.randn(r, d_in, generator=gen) / d_in**0.5).requires_grad_()
            B = (torch.randn(d_out, r, generator=gen) / r**0.5).requires_grad_()
            return LinearWeights(W, None, LoraWeights(A, B, 2.0, 0.05))

        lins = [lin(512, 1536, 16), lin(512, 1536, 16), lin(1536, 512, 16)]
        x = torch.randn(4, 300, 512, generator=gen).bfloat16()
        dy = torch.randn(4, 300, 512, generator=gen)

        def moved(t, device, dtype):
            # bf16 base weights take the run's dtype; fp32 adapters stay fp32 except in the float64 run
            if t is None:
                return None
            to = dtype if t.dtype == torch.bfloat16 or dtype == torch.float64 else t.dtype
            return t.detach().to(device, to).requires_grad_(t.requires_grad)

        def run(device, dtype, backend):
            ls = [lin_.with_tensors(*(moved(t, device, dtype) for t in lin_.tensors())) for lin_ in lins]
            xx = x.to(device, dtype).requires_grad_()
            y = ops.masked_gated_mlp(xx, GatedMLPWeights(tuple(ls[:2]), ls[2]), R.Activation.SILU, MaskSpec(0.1), seed,
                                     ops.resolve(backend, torch.device(device)))
            leaves = [xx] + [t for l in ls for t in (l.lora.A, l.lora.B)]
            return [y, *torch.autograd.grad(y, leaves, dy.to(device, y.dtype))]

        got, ref = run("cuda", torch.bfloat16, "cuda"), run("cuda", torch.bfloat16, "torch")
        exact = run("cpu", torch.float64, "torch")
        worst = 0.0
        for a, b, e in zip(got, ref, exact):
            err_a = (a.double().cpu() - e).abs().max().item()
            err_b = (b.double().cpu() - e).abs().max().item()
            worst = max(worst, err_a / (3 * err_b + 1e-3 * e.abs().max().item() + 1e-6))
        fused = {"transpeft_masked_gated_act_fwd", "transpeft_masked_gated_act_bwd"} <= set(calls)
        check("gated MLP bf16 fwd+bwd cuda vs torch vs float64", fused and worst <= 1.0,
              f"fused kernels ran={fused} worst error ratio={worst:.3f} (<= 1)")
    finally:
        library.Library.call = original


def bandwidth() -> None:
    import torch

    from transpeft_kernels.kernels import cuda as K

    M, I, r = 8192, 14336, 16
    dev = "cuda"
    seed = torch.tensor(5)
    g, u, dh = (torch.randn(M, I, device=dev, dtype=torch.bfloat16) for _ in range(3))
    A = torch.randn(r, I, device=dev) / I**0.5
    t = torch.randn(M, r, device=dev)
    elt = g.element_size() * M * I
    src = torch.empty(8 * elt // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() / copy_ms / 1e6
    del src, dst
    RESULTS["bandwidth"]["copy_GBps"] = round(copy_gbs, 1)
    cases = {
        "act_fwd": (3 * elt, lambda: K.masked_gated_act_fwd(g, u, "silu", 0.1, False, seed)),
        "act_bwd": (5 * elt, lambda: K.masked_gated_act_bwd(dh, g, u, "silu", 0.1, False, seed)),
        "act_fwd+down_shrink_r16": (3 * elt, lambda: K.masked_gated_act_fwd(
            g, u, "silu", 0.1, False, seed, down_a=A, down_drop=K.Dropout(0.05, seed))),
        "act_bwd+down_lora_r16": (5 * elt, lambda: K.masked_gated_act_bwd(
            dh, g, u, "silu", 0.1, False, seed, down_t=t, down_a=A, down_scaling=2.0, down_drop=K.Dropout(0.05, seed))),
    }
    for name, (nbytes, fn) in cases.items():
        ms = bench_ms(fn)
        gbs = nbytes / ms / 1e6
        RESULTS["bandwidth"][name] = {"ms": round(ms, 4), "GBps": round(gbs, 1), "fraction_of_copy": round(gbs / copy_gbs, 3)}
        target = name in ("act_fwd", "act_bwd")
        line = f"{ms:.3f} ms, {gbs:.0f} GB/s = {gbs / copy_gbs:.2f} of copy ({copy_gbs:.0f} GB/s)"
        if target:
            check(f"{name} bandwidth >= 0.85 of copy", gbs / copy_gbs >= 0.85, line)
        else:
            print(f"INFO  {name}  {line}", flush=True)


def mlp_timing() -> None:
    import torch

    from transpeft_kernels import ops, reference as R
    from transpeft_kernels.specs import GatedMLPWeights, LinearWeights, LoraWeights, MaskSpec

    d, inter, M, r = 4096, 14336, 8192, 16
    dev = "cuda"
    bf = torch.bfloat16

    def lin(d_in, d_out):
        W = torch.randn(d_out, d_in, device=dev, dtype=bf) / d_in**0.5
        A = (torch.randn(r, d_in, device=dev) / d_in**0.5).requires_grad_()
        B = (torch.randn(d_out, r, device=dev) / r**0.5).requires_grad_()
        return LinearWeights(W, None, LoraWeights(A, B, 2.0, 0.05))

    w = GatedMLPWeights((lin(d, inter), lin(d, inter)), lin(inter, d))
    x = torch.randn(M, d, device=dev, dtype=bf, requires_grad=True)
    dy = torch.randn(M, d, device=dev, dtype=bf)
    leaves = [x] + [t for p in w.projections for t in (p.lora.A, p.lora.B)]
    seed = torch.tensor(9)

    h = torch.randn(M, inter, device=dev, dtype=bf)
    Wg, Wu, Wd = (p.weight for p in w.projections)

    def floor():
        torch.mm(x, Wg.t()), torch.mm(x, Wu.t()), torch.mm(h, Wd.t())  # forward
        torch.mm(dy, Wd), torch.mm(h, Wg), torch.mm(h, Wu)  # dh' = dY W_d; dx = dg W_g + du W_u

    floor_ms = bench_ms(floor)
    RESULTS["mlp"]["floor_ms"] = round(floor_ms, 3)
    names = ["cuda"] + [n for n in ops.runnable_backends() if n != "cuda"]
    for name in names:
        be = ops.resolve(name, torch.device(dev))

        def step():
            y = ops.masked_gated_mlp(x, w, R.Activation.SILU, MaskSpec(0.1), seed, be)
            torch.autograd.grad(y, leaves, dy)

        ms = bench_ms(step, iters=10)
        RESULTS["mlp"][name] = {"ms": round(ms, 3), "x_floor": round(ms / floor_ms, 3)}
        line = f"{ms:.2f} ms = {ms / floor_ms:.3f} x floor ({floor_ms:.2f} ms)"
        if name == "cuda":
            check("gated MLP fwd+bwd cuda <= 1.10 x frozen-GEMM floor", ms / floor_ms <= 1.10, line)
        else:
            print(f"INFO  gated MLP fwd+bwd {name}  {line}", flush=True)


def run_pytest(timeout_s: float) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    env.pop("TRANSPEFT_CUDA_EMULATE", None)
    t = time.time()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "python_tests/test_cuda_ops.py"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        check("pytest test_cuda_ops.py", False, f"timed out after {timeout_s:.0f}s")
        return
    tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
    check("pytest test_cuda_ops.py (CUDA tensors)", out.returncode == 0, f"{tail} ({time.time() - t:.0f}s)")
    if out.returncode:
        print(out.stdout[-4000:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=600.0, help="start no section after this many seconds")
    ap.add_argument("--skip-pytest", action="store_true")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "out/gpu_cuda_check"))
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("TRANSPEFT_CUDA_EMULATE", None)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the CUDA backend on a GPU")
        return 2
    RESULTS["environment"] = environment()
    print(json.dumps(RESULTS["environment"]), flush=True)
    sections = [("library", ensure_library), ("smoke", smoke), ("bandwidth", bandwidth), ("mlp", mlp_timing)]
    for name, fn in sections:
        if time.time() - T0 > args.budget_s:
            check(f"section {name}", False, "not run: budget spent")
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on with the next section
            check(f"section {name}", False, f"{type(e).__name__}: {e}"[:2000])
            if name == "library":
                save(out)
                return 1
        finally:
            torch.cuda.empty_cache()
            save(out)
    left = args.budget_s - (time.time() - T0)
    if not args.skip_pytest and left > 60:
        run_pytest(left)
    elif not args.skip_pytest:
        print("SKIP  pytest test_cuda_ops.py: budget spent")
    save(out)
    print(f"\n{len(FAILED)} failed" + (": " + ", ".join(FAILED) if FAILED else "") + f"; results in {out / 'cuda_check.json'}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
