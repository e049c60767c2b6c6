"""kernels/triton/direct_launch.py hands each compiled kernel's launcher exactly what Triton's own
``kernel[grid](...)`` path would, and skips that path after a plan's first launch.

Run in a child process without TRITON_INTERPRET (kernels must be real JITFunctions) under
perf/triton_stub_driver.py: every kernel compiles for sm_90 with ptxas, and the launcher records its
arguments instead of launching. The same workload (lora_linear and the gated MLP fwd+bwd with LoRA
dropout and the knowledge mask, and the masked activation on its own) runs three times through Triton's
path, then three times with direct launches; the recorded launches must agree one by one: grid,
stream, function handle, the compiled kernel's metadata (the same object: the same specialisation),
hooks, launch metadata, and every argument (tensors by shape, strides, dtype and 16-byte alignment,
the rest by value). The Philox sub-seeds are 8-byte-offset views, so one plan sees seeds of both
alignments: the direct path must keep one compiled kernel per alignment, as Triton does.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, os
import torch, triton
from triton.runtime.jit import JITFunction
from transpeft_kernels import ops
from transpeft_kernels.ops.backends import by_name
from transpeft_kernels.kernels.triton import direct_launch, plans, masked_gated_act_fwd, masked_gated_act_bwd
from transpeft_kernels.perf.triton_stub_driver import stub_cuda_driver
from transpeft_kernels.reference import Activation
from transpeft_kernels.specs import GatedMLPWeights, LinearWeights, LoraWeights, MaskSpec

torch.manual_seed(0)
bf16 = torch.bfloat16
def lin(d_in, d_out, q):
    A = torch.randn(16, d_in, requires_grad=True)
    B = torch.randn(d_out, 16, requires_grad=True)
    return LinearWeights(torch.randn(d_out, d_in, dtype=bf16), None, LoraWeights(A, B, 2.0, q))
M, d, I = 48, 64, 96   # ragged for the 16 x 64 and 32 x 128 tiles
proj = lin(d, d, 0.05)
mlp = GatedMLPWeights((lin(d, I, 0.05), lin(d, I, 0.05)), lin(I, d, 0.05))
x = torch.randn(M, d, dtype=bf16, requires_grad=True)
dy = torch.randn(M, d, dtype=bf16)
g, u, dh = (torch.randn(M, I, dtype=bf16) for _ in range(3))
seed = torch.tensor(11)
backend = by_name("triton")
backend._cpu_ok = True  # CPU tensors with real JITFunctions: only the stub driver sees them

def workload():
    params = [x, *[t for l in (proj, *mlp.projections) for t in (l.lora.A, l.lora.B)]]
    torch.autograd.grad(ops.lora_linear(x, proj, seed, backend), params[:3], dy)
    torch.autograd.grad(ops.masked_gated_mlp(x, mlp, Activation.SILU, MaskSpec(0.1), seed, backend),
                        [x, *params[3:]], dy)
    masked_gated_act_fwd(g, u, "silu", 0.1, True, seed)
    masked_gated_act_bwd(dh, g, u, "gelu_tanh", 0.1, True, seed)

jit_calls = [0]
real_run = JITFunction.run
def counted(self, *a, **k):
    jit_calls[0] += 1
    return real_run(self, *a, **k)
JITFunction.run = counted

def describe(v):
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.stride(), str(v.dtype), v.data_ptr() % 16 == 0)
    return v

def lazy(m):
    return None if m is None else sorted((k, str(v)) for k, v in getattr(m, "data", {}).items())

def series(enabled, st):
    direct_launch.ENABLED = enabled
    plans.clear_all()
    out = []
    for _ in range(3):
        st.launches.clear(); jit_calls[0] = 0
        workload()
        out.append((jit_calls[0], list(st.launches)))
    return out

with stub_cuda_driver(arch=90) as st:  # one driver: compiled kernels keep the launcher they were loaded with
    jit_path, direct = series(False, st), series(True, st)
mismatches = []
for i, ((_, a), (_, b)) in enumerate(zip(jit_path, direct)):
    if len(a) != len(b):
        mismatches.append(f"iteration {i}: {len(a)} launches through Triton, {len(b)} direct")
        continue
    for j, (p, q) in enumerate(zip(a, b)):
        same = (p.grid == q.grid and p.stream == q.stream and p.function == q.function
                and p.packed_metadata is q.packed_metadata and p.hooks[0] is q.hooks[0] and p.hooks[1] is q.hooks[1]
                and lazy(p.launch_metadata) == lazy(q.launch_metadata)
                and [describe(v) for v in p.args] == [describe(v) for v in q.args])
        if not same:
            mismatches.append(f"iteration {i} launch {j}: {p} != {q}")
compiled = [len(pl.compiled) for c in plans.CACHES.values() for pl in c._plans.values()]
print(json.dumps({"triton": triton.__version__, "supported": direct_launch.SUPPORTED, "launches": [len(l) for _, l in direct],
                  "jit_calls_jit_path": [n for n, _ in jit_path], "jit_calls_direct": [n for n, _ in direct],
                  "plans": len(compiled), "most_compiled_per_plan": max(compiled), "mismatches": mismatches[:5],
                  "kernels": sorted({l.function for _, ls in direct for l in ls}).__len__()}))
"""


@pytest.fixture(scope="module")
def child():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=900,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-6000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_direct_launches_match_tritons_own(child):
    assert child["mismatches"] == []
    n = child["launches"][0]
    assert n >= 12 and child["launches"] == [n, n, n]
    assert child["kernels"] >= 6  # shrink, expand_add, token_reduce, gate_up_lora_act, act_bwd_lora, masked act


def test_direct_launches_skip_tritons_path_after_the_first(child):
    n = child["launches"][0]
    assert child["jit_calls_jit_path"] == [n, n, n]
    if not child["supported"]:  # a Triton outside direct_launch.TESTED: everything through kernel[grid]
        assert child["jit_calls_direct"] == [n, n, n]
        pytest.skip(f"Triton {child['triton']} is outside direct_launch.TESTED: direct launches are off")
    first, *later = child["jit_calls_direct"]
    assert 0 < first <= n and later == [0, 0]


def test_one_compiled_kernel_per_seed_alignment(child):
    if not child["supported"]:
        pytest.skip(f"Triton {child['triton']} is outside direct_launch.TESTED: direct launches are off")
    # the gate and up projections share a shrink plan but get seed views 8 bytes apart
    assert child["most_compiled_per_plan"] >= 2
