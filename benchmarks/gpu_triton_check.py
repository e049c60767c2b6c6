"""GPU check of the Triton backend, for a session with a CUDA GPU (sized for ~10 minutes on an H200).

    PYTHONPATH=. python benchmarks/gpu_triton_check.py [--skip-pytest] [--autotune]

1. GPU ``tl.rand`` / ``tl.randint`` bits equal reference.philox at offsets past 2**31, and the keep
   masks the compiled kernels regenerate equal reference.keep_mask bit for bit.
2. The kernel, op and custom-op tests (test_triton_kernels, test_ops, test_triton_ops,
   test_custom_ops) compiled on the GPU, with their tensors on the GPU.
3. The autograd ops on CUDA tensors (lora_linear, masked_gated_mlp in both layouts; fp32, bf16 with
   fp32 and bf16 adapters) on "triton" against "torch" on the same GPU and against float64 on CPU,
   with a check that the Triton kernels really ran (no silent fallback).
4. Informational timings (median ms) of a LoRA linear 4096->4096, r=16, 8192 tokens, bf16, forward
   + backward, "triton" vs "torch".
Prints one line per check and exits non-zero if any check fails. Autotuning is off unless --autotune
(timing every candidate costs minutes; the fixed defaults are what the numerics depend on anyway).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def rand_bits() -> None:
    import torch
    import triton
    import triton.language as tl

    from transpeft_kernels.reference.philox import keep_mask, philox_randint, philox_uniform

    @triton.jit
    def draw(out_i, out_f, seed_ptr, base, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs = idx.to(tl.int64) + base
        ok = idx < n
        seed = tl.load(seed_ptr)
        tl.store(out_i + idx, tl.randint(seed, offs).to(tl.int64) & 0xFFFFFFFF, mask=ok)
        tl.store(out_f + idx, tl.rand(seed, offs), mask=ok)

    n = 1 << 16
    for seed, base in [(0, 0), (123456789, 5), (2**40 + 7, 2**33 - 100), (2**62 + 12345, 2**31 - 64)]:
        s = torch.tensor([seed], dtype=torch.int64, device="cuda")
        oi = torch.full((n,), -1, dtype=torch.int64, device="cuda")
        of = torch.full((n,), -1.0, device="cuda")
        draw[(triton.cdiv(n, 1024),)](oi, of, s, base, n, BLOCK=1024)
        offs = torch.arange(n, dtype=torch.int64) + base
        check(f"tl.randint bits seed={seed} base={base}", torch.equal(oi.cpu(), philox_randint(seed, offs)))
        check(f"tl.rand bits seed={seed} base={base}", torch.equal(of.cpu(), philox_uniform(seed, offs)))

    from transpeft_kernels.kernels import triton as K

    key = torch.tensor(2**41 + 3)
    g = (1 + torch.rand(3000, 1537, device="cuda")).bfloat16()
    h = K.masked_gated_act_fwd(g, g, "silu", 0.1, False, key)
    check("masked_gated_act keep mask == reference", torch.equal((h != 0).cpu(), keep_mask(key, 3000, 1537, 0.1)))
    x = (1 + torch.rand(1000, 96, device="cuda"))
    s = K.lora_shrink(x, torch.eye(96, device="cuda"), 0.05, key)
    check("lora_shrink dropout mask == reference", torch.equal((s != 0).cpu(), keep_mask(key, 1000, 96, 0.05)))


def run_pytest() -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    t0 = time.time()
    files = [f"python_tests/{n}.py" for n in ("test_triton_kernels", "test_triton_gate_up_act", "test_ops", "test_triton_ops",
                                                  "test_custom_ops")]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
    check(f"pytest {' '.join(files)} (compiled, CUDA tensors)", out.returncode == 0, f"{tail} ({time.time() - t0:.0f}s)")
    if out.returncode:
        print(out.stdout[-4000:])


def ops_numerics() -> None:
    import torch

    from transpeft_kernels import ops, reference as R
    from transpeft_kernels.kernels import triton as K
    from transpeft_kernels.specs import GatedMLPWeights, Layout, LinearWeights, LoraWeights, MaskSpec

    # Count launches of the GEMM kernels, so that a silent fallback to torch fails the check.
    spied = ("gemm_lora_expand", "gate_up_act")
    originals = {name: getattr(K, name) for name in spied}
    calls = dict.fromkeys(spied, 0)

    def counter(name):
        def counted(*a, **k):
            calls[name] += 1
            return originals[name](*a, **k)
        return counted

    for name in spied:
        setattr(K, name, counter(name))
    tri, tor = ops.resolve("triton", torch.device("cuda")), ops.resolve("torch", torch.device("cuda"))

    def linear(d_in, d_out, dtype, adt, rank, q, gen):
        W = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dtype)
        b = (torch.randn(d_out, generator=gen) * 0.1).to(dtype)
        A = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(adt).requires_grad_()
        B = (torch.randn(d_out, rank, generator=gen) / rank**0.5).to(adt).requires_grad_()
        return LinearWeights(W, b, LoraWeights(A, B, 2.0, q))

    def to(lin, device, dtype=None):
        def c(t):
            if t is None:
                return None
            return t.detach().to(device=device, dtype=dtype or t.dtype).requires_grad_(t.requires_grad)
        return lin.with_tensors(*(c(t) for t in lin.tensors()))

    def grads(fn, x, lins):
        leaves = [x] + [t for lin in lins for t in lin.tensors() if t is not None and t.requires_grad]
        y = fn(x, lins)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device=y.device, dtype=y.dtype)
        return [y] + list(torch.autograd.grad(y, leaves, dy))

    seed = torch.tensor(11)
    for dtype, adt in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 333, 257, generator=gen).to(dtype)
        cases = {
            "lora_linear": ([linear(257, 515, dtype, adt, 16, 0.1, gen)],
                            lambda x, ls, be: ops.lora_linear(x, ls[0], seed, be)),
        }
        for layout in (Layout.SPLIT, Layout.FUSED_GATE_UP):
            width = 700 if layout is Layout.SPLIT else 1400
            ins = [linear(257, width, dtype, adt, 8, 0.05, gen) for _ in range(2 if layout is Layout.SPLIT else 1)]
            cases[f"gated_mlp {layout.value}"] = (ins + [linear(700, 257, dtype, adt, 8, 0.05, gen)],
                                                  lambda x, ls, be: ops.masked_gated_mlp(
                                                      x, GatedMLPWeights(tuple(ls[:-1]), ls[-1]), R.Activation.SILU,
                                                      MaskSpec(0.1), seed, be))
        for name, (lins, f) in cases.items():
            for k in calls:
                calls[k] = 0
            xc = x.cuda().requires_grad_()
            got = grads(lambda x, ls: f(x, ls, tri), xc, [to(lin, "cuda") for lin in lins])
            ran = calls["gemm_lora_expand"] > 0 and (name == "lora_linear" or calls["gate_up_act"] > 0)
            ref = grads(lambda x, ls: f(x, ls, tor), x.cuda().requires_grad_(), [to(lin, "cuda") for lin in lins])
            exact = grads(lambda x, ls: f(x, ls, tor), x.double().requires_grad_(), [to(lin, "cpu", torch.float64) for lin in lins])
            worst = 0.0
            for a, b, e in zip(got, ref, exact):
                err_ours = (a.double().cpu() - e).abs().max().item()
                err_ref = (b.double().cpu() - e).abs().max().item()
                worst = max(worst, err_ours / (3 * err_ref + 1e-3 * e.abs().max().item() + 1e-6))
            check(f"{name} {dtype} adapters {adt} vs torch and float64", ran and worst <= 1.0,
                  f"kernels ran={ran} worst error ratio={worst:.3f} (<= 1)")
    for name, fn in originals.items():
        setattr(K, name, fn)


def timings() -> None:
    import torch

    from transpeft_kernels import ops
    from transpeft_kernels.specs import LinearWeights, LoraWeights

    d, r, tokens = 4096, 16, 8192
    W = torch.randn(d, d, device="cuda", dtype=torch.bfloat16) / 64
    A = (torch.randn(r, d, device="cuda") / 64).requires_grad_()
    B = (torch.randn(d, r, device="cuda") / 4).requires_grad_()
    lin = LinearWeights(W, None, LoraWeights(A, B, 2.0, 0.05))
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    seed = torch.tensor(3)
    for name in ("torch", "triton"):
        be = ops.resolve(name, torch.device("cuda"))

        def step():
            y = ops.lora_linear(x, lin, seed, be)
            torch.autograd.grad(y, (x, A, B), torch.ones_like(y))

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        print(f"TIME  lora_linear 4096->4096 r=16 8192 tokens bf16 fwd+bwd  {name}: {times[len(times) // 2]:.3f} ms (median of 20)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-pytest", action="store_true")
    ap.add_argument("--autotune", action="store_true")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    if not args.autotune:
        os.environ["TRANSPEFT_TRITON_AUTOTUNE"] = "0"
    import torch
    import triton

    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the Triton backend on a GPU")
        return 2
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    # Fast and most telling first: a session's time cap may cut the pytest run short.
    rand_bits()
    ops_numerics()
    timings()
    if not args.skip_pytest:
        run_pytest()
    print(f"\n{len(FAILED)} failed" + (": " + ", ".join(FAILED) if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
