"""GPU check of the Triton backend, for a session with a CUDA GPU: correctness through pytest, then timing.

    OUT=out/triton PYTHONPATH=. python benchmarks/gpu_triton_check.py [--budget-s 600] [--skip-pytest] [--autotune]

1. Correctness: ``python -m pytest python_tests/test_gpu_triton.py -m gpu`` (tl.rand bits compiled for
   the GPU, the kernels' masks at realistic shapes and past 2**31 elements, lora_linear and the gated
   MLP at realistic shapes against "torch" and float64 with their Triton launches counted).
2. Timing, informational: median ms of a LoRA linear 4096->4096, r=16, 8192 tokens, bf16, forward +
   backward, "triton" vs "torch"; the gated MLP in each base-GEMM and backward mode; and a cuBLAS
   product with and without a C operand, beside the two ways of adding a LoRA term to it.
3. Unless --skip-pytest, while the budget lasts: the kernel, op and custom-op tests (test_triton_kernels,
   test_triton_tf32 (whether the MMA reads fp32 operands truncated to tf32, as the interpreter does: the
   same bits for truncated and raw operands), test_triton_gate_up_act, test_ops, test_triton_ops,
   test_custom_ops) compiled on the GPU with their
   tensors there; stopped (SIGINT, so its JUnit XML keeps what ran) when the budget is spent.
Prints one PASS/FAIL/SKIP line per test of part 1 (FAIL lines only for part 3) and INFO lines for
timings. Writes under $OUT: triton_check.json (GPU, versions, commit, each pytest run and test, the
timings; rewritten after every part), triton_check.junit.xml (part 1), triton_suite.junit.xml (part 3).
Exit status 1 when a test failed or part 1 did not complete, 2 without a GPU. Autotuning is off
unless --autotune (timing every candidate costs minutes; the fixed defaults are what the numerics
depend on anyway).

The helpers above main() (Report: pytest runs, JUnit reading, the JSON) serve gpu_cuda_check.py too.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SUITE = ["python_tests/test_triton_kernels.py", "python_tests/test_triton_tf32.py", "python_tests/test_triton_gate_up_act.py",
         "python_tests/test_ops.py", "python_tests/test_triton_ops.py", "python_tests/test_custom_ops.py"]


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

    env = {"gpu": torch.cuda.get_device_name(), "capability": ".".join(map(str, torch.cuda.get_device_capability())),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "commit": commit(), "python": sys.version.split()[0]}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def read_junit(path: Path) -> tuple[list[dict], dict]:
    """(tests, suite properties) of a pytest JUnit XML file: each test's name, status (passed, failed,
    error, skipped), seconds and message."""
    root = ET.parse(path).getroot()
    tests, props = [], {}
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for prop in suite.findall("./properties/property"):
            props[prop.get("name")] = prop.get("value")
        for case in suite.iter("testcase"):
            if case.get("name") is None:  # the test a SIGINT interrupted: not a result
                continue
            module = (case.get("classname") or "").rsplit(".", 1)[-1]
            status, message = "passed", ""
            for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
                found = case.find(tag)
                if found is not None:
                    status, message = name, (found.get("message") or found.text or "").strip()
                    break
            tests.append({"name": f"{module}.py::{case.get('name')}" if module else case.get("name"), "status": status,
                          "seconds": round(float(case.get("time") or 0.0), 2), "message": message[:2000]})
    return tests, props


class Report:
    """The results of one check script: printed as they come, kept in ``data`` and written to
    $OUT/<stem>.json by ``save``; ``failed`` names what makes the script exit with status 1."""

    def __init__(self, out: Path, stem: str):
        self.out, self.stem, self.t0 = out, stem, time.time()
        self.data: dict = {"environment": {}, "pytest": {}, "checks": []}
        self.failed: list[str] = []

    def elapsed(self) -> float:
        return time.time() - self.t0

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.data["failed"] = list(self.failed)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.stem}.json").write_text(json.dumps(self.data, indent=2) + "\n")

    def fail(self, name: str, detail: str) -> None:
        print(f"FAIL  {name}  {detail}", flush=True)
        self.data["checks"].append({"name": name, "ok": False, "status": "failed", "detail": detail})
        self.failed.append(name)

    def info(self, name: str, detail: str) -> None:
        print(f"INFO  {name}  {detail}", flush=True)

    def target(self, name: str, measured: float, op: str, bound: float, detail: str) -> None:
        """A performance target: reported, never a failure."""
        met = measured >= bound if op == ">=" else measured <= bound
        self.data.setdefault("targets", []).append(
            {"name": name, "measured": round(measured, 4), "target": f"{op} {bound}", "met": met})
        self.info(name, f"{detail}; target {op} {bound}: {'met' if met else 'MISSED'}")

    def pytest(self, label: str, args: list[str], junit: str, timeout_s: float, required: bool,
               every_test: bool = True) -> dict:
        """Runs ``python -m pytest ARGS`` in a child process (its output streams through) with a JUnit XML
        under $OUT, interrupted with SIGINT after ``timeout_s`` (pytest then still writes what ran).
        Failed tests always count as failures; a ``required`` run also fails when it was interrupted,
        passed nothing or exited non-zero otherwise. Lines per test: all (``every_test``) or failures only."""
        junit_path = self.out / junit
        self.out.mkdir(parents=True, exist_ok=True)
        junit_path.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("TRITON_INTERPRET", None)  # the kernels compiled for the GPU, never the interpreter
        env.pop("TRANSPEFT_CUDA_EMULATE", None)  # the library on the GPU, never its host emulation
        env.setdefault("TRANSPEFT_TRITON_AUTOTUNE", "0")  # numerics only: no minutes of candidate timing
        env["PYTHONUNBUFFERED"] = "1"  # its output in order with ours, and kept if a time cap kills it
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit_path}", *args]
        print(f"== pytest: {label} (budget {timeout_s:.0f}s): {shlex.join(cmd[1:])}", flush=True)
        t, interrupted = time.time(), False
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        try:
            rc = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            interrupted = True
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        except BaseException:  # our own SIGTERM (a session's time cap): do not leave the child running
            proc.kill()
            proc.wait()
            self.data["pytest"][label] = {"command": cmd[1:], "terminated_after_s": round(time.time() - t, 1)}
            raise
        tests, props = read_junit(junit_path) if junit_path.is_file() else ([], {})
        counts = {s: sum(1 for x in tests if x["status"] == s) for s in ("passed", "failed", "error", "skipped")}
        summary = {"command": cmd[1:], "rc": rc, "interrupted": interrupted, "seconds": round(time.time() - t, 1),
                   "junit": junit if junit_path.is_file() else None, **counts, "properties": props}
        self.data["pytest"][label] = summary
        for x in tests:
            bad = x["status"] in ("failed", "error")
            if bad or every_test:
                word = {"passed": "PASS", "skipped": "SKIP"}.get(x["status"], "FAIL")
                detail = f"({x['seconds']:.1f}s)" + (f" {x['message'].splitlines()[0][:300]}" if x["message"] else "")
                print(f"{word}  {x['name']}  {detail}", flush=True)
            if bad:
                self.failed.append(x["name"])
            if bad or every_test:
                self.data["checks"].append({"name": x["name"], "ok": not bad, "status": x["status"],
                                            "seconds": x["seconds"], "detail": x["message"][:500]})
        line = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
                f"{counts['skipped']} skipped in {summary['seconds']:.0f}s (exit {rc})")
        if interrupted:
            line += f"; stopped at its budget of {timeout_s:.0f}s"
        if not junit_path.is_file():
            line += "; no JUnit XML was written"
        incomplete = interrupted or rc not in (0, 1) or counts["passed"] == 0
        if required and incomplete and not (counts["failed"] or counts["error"]):
            self.fail(f"pytest {label}", line + " (expected to complete with tests passed)")
        else:
            print(f"{'FAIL' if counts['failed'] or counts['error'] else 'INFO'}  pytest {label}  {line}", flush=True)
        self.save()
        return {**summary, "tests": tests}


def _terminate(signum, frame):  # a session's time cap: exit through the finally blocks (the JSON is saved)
    raise SystemExit(128 + signum)


def timings(report: Report) -> None:
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
    key = "lora_linear_4096x4096_r16_8192_tokens_bf16_fwd_bwd_ms"
    report.data.setdefault("timings", {})[key] = {}
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
        ms = times[len(times) // 2]
        report.data["timings"][key][name] = round(ms, 3)
        report.info(f"lora_linear 4096->4096 r=16 8192 tokens bf16 fwd+bwd {name}", f"{ms:.3f} ms (median of 20)")


def _median_ms(step, reps: int = 10) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(2):
        step()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def mlp_mode_timings(report: Report, d: int = 4096, inter: int = 14336, tokens: int = 8192,
                     device: str = "cuda") -> None:
    """The masked gated MLP (Llama-3-8B shape, 8192 tokens, bf16 base, lora_dropout 0.05, masking 0.1),
    fwd+bwd on the triton backend. At r 16, fp32 and bf16 adapters side by side in every combination of
    the base GEMMs (TRANSPEFT_TRITON_BASE_GEMM: cublas, triton) and the backward
    (TRANSPEFT_TRITON_ONE_PASS_BWD: one pass, multi-pass), with bf16 adapters also the one pass without
    the dh' fold (TRANSPEFT_TRITON_FOLD_DH); at r 64, bf16 adapters, the one pass with and without the
    fold, where this GPU folds at rank 64 (sm_90). The measurements that decide the defaults
    (ops/triton_backend.base_gemm, one_pass_bwd_enabled, fold_dh_enabled), chosen by the model until now."""
    import torch

    from transpeft_kernels.kernels import triton as K
    from transpeft_kernels import ops
    from transpeft_kernels.ops.triton_backend import BASE_GEMM_ENV, FOLD_DH_ENV, ONE_PASS_ENV
    from transpeft_kernels.reference.activations import Activation
    from transpeft_kernels.specs import GatedMLPWeights, LinearWeights, LoraWeights, MaskSpec

    dev = torch.device(device)
    be = ops.resolve("triton", dev)
    seed, mask = torch.tensor(3), MaskSpec(0.1)
    every = [("cublas", "1", "1", "one_pass"), ("cublas", "0", "1", "multi_pass"),
             ("triton", "1", "1", "one_pass"), ("triton", "0", "1", "multi_pass")]
    fold = [("cublas", "1", "1", "one_pass"), ("cublas", "1", "0", "one_pass_no_fold")]  # the fold: 16-bit adapters
    for r, adt, modes in ((16, torch.float32, every), (16, torch.bfloat16, every[:1] + fold[1:] + every[1:]),
                          (64, torch.bfloat16, fold)):
        if r > 16 and not K.act_bwd_fold_supported(adt, r, dev):
            report.info(f"gated MLP fwd+bwd triton r {r}", "skipped: this GPU's architecture folds ranks <= 32")
            continue
        key = f"gated_mlp_{d}x{inter}_r{r}_{tokens}_tokens_bf16_fwd_bwd_ms"
        report.data.setdefault("timings", {}).setdefault(key, {})

        def lin(n_in, n_out):
            W = torch.randn(n_out, n_in, device=dev, dtype=torch.bfloat16) / n_in**0.5
            A = (torch.randn(r, n_in, device=dev) / n_in**0.5).to(adt).requires_grad_()
            B = (torch.randn(n_out, r, device=dev) / r**0.5).to(adt).requires_grad_()
            return LinearWeights(W, None, LoraWeights(A, B, 2.0, 0.05))

        w = GatedMLPWeights((lin(d, inter), lin(d, inter)), lin(inter, d))
        params = [t for p in w.projections for t in (p.lora.A, p.lora.B)]
        x = torch.randn(tokens, d, device=dev, dtype=torch.bfloat16, requires_grad=True)

        def step():
            y = ops.masked_gated_mlp(x, w, Activation.SILU, mask, seed, be)
            torch.autograd.grad(y, [x, *params], torch.ones_like(y))

        for base, flag, fold_dh, label in modes:
            os.environ[ONE_PASS_ENV], os.environ[BASE_GEMM_ENV], os.environ[FOLD_DH_ENV] = flag, base, fold_dh
            try:
                ms = _median_ms(step)
            finally:
                for env in (ONE_PASS_ENV, BASE_GEMM_ENV, FOLD_DH_ENV):
                    os.environ.pop(env, None)
            name = f"{base}_gemms_{label}_{str(adt).replace('torch.', '')}_adapters"
            report.data["timings"][key][name] = round(ms, 3)
            report.info(f"gated MLP fwd+bwd triton r {r} {name}", f"{ms:.3f} ms (median of 10)")
        del w, params, x
        torch.cuda.empty_cache()


def c_operand_timings(report: Report, tokens: int = 8192, r: int = 16, device: str = "cuda") -> None:
    """The model's assumption behind lora_expand_into: cuBLAS reads a C operand (addmm_, beta 1) in its
    epilogue at no cost while compute-bound. Side by side at the Llama-3-8B MLP's product shapes, bf16,
    fp32 adapters, lora_dropout 0.05 (the dX case): mm alone, addmm_ into a C alone, and the two ways of
    adding a LoRA term, mm + lora_expand_add (read-modify-write) and lora_expand_into + addmm_."""
    import torch

    from transpeft_kernels.kernels import triton as K

    dev = torch.device(device)
    key = f"c_operand_{tokens}_tokens_r{r}_bf16_ms"
    report.data.setdefault("timings", {})[key] = {}
    seed = torch.tensor(11)
    for k, n in ((4096, 14336), (14336, 4096), (4096, 4096)):
        x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        s = torch.randn(tokens, r, device=dev)
        a = torch.randn(r, n, device=dev) / r**0.5
        c = torch.randn(tokens, n, device=dev, dtype=torch.bfloat16)
        term = K.LoraTerm(s, a.t(), 2.0, 0.05, seed)
        cases = {
            "mm": lambda: torch.mm(x, w.t()),
            "addmm_": lambda: c.addmm_(x, w.t()),
            "mm+lora_expand_add": lambda: K.lora_expand_add(torch.mm(x, w.t()), s, a.t(), 2.0, 0.05, seed),
            "lora_expand_into+addmm_": lambda: K.lora_expand_into(torch.empty_like(c), (term,)).addmm_(x, w.t()),
        }
        name = f"{tokens}x{k}->{n}"
        report.data["timings"][key][name] = {label: round(_median_ms(fn, reps=20), 4) for label, fn in cases.items()}
        report.info(f"C operand {name}", json.dumps(report.data["timings"][key][name]))
        del x, w, s, a, c
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=600.0, help="start no part after this many seconds")
    ap.add_argument("--skip-pytest", action="store_true", help="skip part 3 (the kernel/op/custom-op tests)")
    ap.add_argument("--autotune", action="store_true")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "out/gpu_triton_check"))
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRANSPEFT_TRITON_AUTOTUNE"] = "1" if args.autotune else "0"  # the pytest runs inherit it
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the Triton backend on a GPU")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    report = Report(out, "triton_check")
    report.data["environment"] = environment()
    print(json.dumps(report.data["environment"]), flush=True)
    try:
        # Fast and most telling first: a session's time cap may cut the later parts short.
        report.pytest("test_gpu_triton.py", ["python_tests/test_gpu_triton.py", "-m", "gpu"], "triton_check.junit.xml",
                      args.budget_s - report.elapsed(), required=True)
        if report.elapsed() < args.budget_s:
            try:
                timings(report)
                mlp_mode_timings(report)
                c_operand_timings(report)
            except Exception as e:  # noqa: BLE001 - a crash is reported; the next part still runs
                report.fail("timing", f"{type(e).__name__}: {e}"[:2000])
            finally:
                torch.cuda.empty_cache()
                report.save()
        else:
            report.info("timing", "not run: budget spent")
        left = args.budget_s - report.elapsed()
        if args.skip_pytest:
            pass
        elif left > 60:
            report.pytest("kernel, op and custom-op tests", SUITE, "triton_suite.junit.xml", left, required=False,
                          every_test=False)
        else:
            report.info("pytest kernel, op and custom-op tests", f"not run: {max(left, 0):.0f}s of budget left")
    finally:
        report.save()
    print(f"\n{len(report.failed)} failed" + (": " + ", ".join(report.failed) if report.failed else "")
          + f"; results in {out / 'triton_check.json'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
