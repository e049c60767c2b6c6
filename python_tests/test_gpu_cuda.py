"""The CUDA C++ backend built for this GPU and run on it. Marked ``gpu`` and skipped without CUDA;
benchmarks/gpu_cuda_check.py runs it (``python -m pytest python_tests/test_gpu_cuda.py -m gpu``).

The session fixture builds libtranspeft_cuda.so with the JIT route (kernels/cuda/build.py, what
``python -m transpeft_kernels build-cuda --arch <this GPU>`` does) for this GPU's architecture only,
into the JIT cache where backend="cuda" finds it later (ninja makes a repeat build a no-op), and
loads a private copy of it for the session. Without nvcc or ninja the tests are skipped.

* the library builds for this GPU, loads (ABI checked) and its kernels run here;
* a bf16 gated MLP with fp32 adapters at a realistic shape, both layouts, forward and every
  gradient on "cuda" against "torch" on the same GPU and float64 on the CPU, within budget.py's
  error budget, with the fused kernels counted as they are called (a silent fallback to torch fails);
* the same MLP's forward and backward capture into a CUDA graph and replay within budget.

The op-level cases (every dtype, layout, rank, activation and mask) and the masks bit-equal to the
reference (offsets past 2**31 included) are test_cuda_ops.py's, which runs once the library is
found; benchmarks/gpu_cuda_check.py runs it after this file.
"""
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from budget import assert_close_to_exact, assert_within_budget
from helpers import ACT_BWD_CALLS, FUSED_MLP_CALLS, spy_cuda_calls
from transpeft_kernels import ops, reference as R
from transpeft_kernels.kernels.cuda import build, library
from transpeft_kernels.specs import GatedMLPWeights, Layout, LinearWeights, LoraWeights, MaskSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def gpu_arch() -> str:
    """This GPU's nvcc architecture: "90a" on H100/H200 (the sm_90a features), else e.g. "80"."""
    major, minor = torch.cuda.get_device_capability(CUDA)
    return f"{major}{minor}" + ("a" if major == 9 else "")


@dataclass(frozen=True)
class BuiltLibrary:
    built: Path     # the build output in the JIT cache
    loaded: Path    # the private copy this session loads
    arch: str
    seconds: float


@pytest.fixture(scope="session")
def cuda_library(tmp_path_factory, record_testsuite_property):
    """Builds the library for this GPU's architecture and points backend="cuda" at a copy of it for the
    session (a copy: a library already loaded from the cache path would otherwise be reused by the
    dynamic loader). The JUnit XML gets the build's path, architecture and time as suite properties."""
    missing = [what for what, found in (("the CUDA sources (csrc/)", build.find_csrc()), ("nvcc", build.find_nvcc()),
                                        ("ninja", build.find_ninja())) if found is None]
    if missing:
        pytest.skip(f"cannot build the CUDA library here: {', '.join(missing)} not found")
    arch = gpu_arch()
    t0 = time.time()
    try:
        built = build.build(archs=(arch,))
    except RuntimeError as e:
        pytest.fail(f"building libtranspeft_cuda.so for sm_{arch} failed: {e}", pytrace=False)
    seconds = round(time.time() - t0, 1)
    loaded = tmp_path_factory.mktemp("cuda_library") / build.LIB_NAME
    shutil.copy2(built, loaded)
    record_testsuite_property("cuda_library", str(built))
    record_testsuite_property("cuda_arch", arch)
    record_testsuite_property("cuda_build_seconds", seconds)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSPEFT_CUDA_LIB", str(loaded))
        mp.delenv("TRANSPEFT_CUDA_EMULATE", raising=False)
        mp.setattr(library, "_LOADED", None)
        yield BuiltLibrary(built, loaded, arch, seconds)


@pytest.fixture
def calls(cuda_library, monkeypatch):
    return spy_cuda_calls(monkeypatch)


def test_library_builds_for_this_gpu_and_loads(cuda_library):
    from transpeft_kernels.kernels import cuda as K

    assert cuda_library.built.is_file(), cuda_library
    lib = library.load()  # checks the ABI version and the argument structs' layout
    assert lib.path == cuda_library.loaded and not lib.emulated
    ops.check_available("cuda")  # raises with the reason when backend="cuda" cannot run
    assert ops.resolve("cuda", CUDA).name == "cuda"
    # A kernel of this build runs on this GPU (an architecture mismatch fails here: no kernel image).
    # S = x I^T = x exactly: x holds bf16 values, exact in tf32, so the tf32x3 tile products are exact
    x = (1 + torch.rand(300, 64, device=CUDA)).bfloat16().float()
    s = K.lora_shrink(x, torch.eye(64, device=CUDA))
    torch.cuda.synchronize()
    assert torch.equal(s, x)


# frozen bases, trainable A_d: the backward's activation pass is the one-pass act_bwd_lora (the earlier
# masked_gated_act_bwd + ATen dA_d path with TRANSPEFT_CUDA_ONE_PASS_BWD=0)


def _linear(d_in, d_out, rank, gen):
    """bf16 frozen base, fp32 adapters (as PEFT creates them on a bf16 model), LoRA dropout 0.05."""
    W = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).bfloat16()
    A = torch.randn(rank, d_in, generator=gen) / d_in**0.5
    B = torch.randn(d_out, rank, generator=gen) / rank**0.5  # non-zero B
    return LinearWeights(W, None, LoraWeights(A, B, 2.0, 0.05))


def _placed(lin, device, dtype=None):
    """A copy on ``device`` (every tensor in ``dtype`` when given): frozen base, trainable A and B."""
    W, b, A, B = (None if t is None else t.detach().to(device=device, dtype=dtype or t.dtype) for t in lin.tensors())
    return lin.with_tensors(W, b, A.requires_grad_(), B.requires_grad_())


@pytest.mark.parametrize("one_pass", ["1", "0"], ids=["one_pass", "multi_pass"])
@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.FUSED_GATE_UP], ids=lambda v: v.value)
def test_gated_mlp_at_a_realistic_shape_matches_torch_and_float64(layout, one_pass, calls, monkeypatch):
    monkeypatch.setenv("TRANSPEFT_CUDA_ONE_PASS_BWD", one_pass)
    gen = torch.Generator().manual_seed(0)
    d, inter, rank = 512, 1536, 16  # rank <= 64 and fp32 adapters: the fused activation + down-LoRA path
    widths = [inter, inter] if layout is Layout.SPLIT else [2 * inter]
    lins = [_linear(d, w, rank, gen) for w in widths] + [_linear(inter, d, rank, gen)]
    x = torch.randn(4, 300, d, generator=gen).bfloat16()
    dy = torch.randn(4, 300, d, generator=gen).bfloat16()
    seed = torch.tensor(2**41 + 3)

    def run(backend, device, dtype=None):
        ls = [_placed(lin, device, dtype) for lin in lins]
        xx = x.to(device, dtype).requires_grad_()
        y = ops.masked_gated_mlp(xx, GatedMLPWeights(tuple(ls[:-1]), ls[-1]), R.Activation.SILU, MaskSpec(0.1), seed,
                                 ops.resolve(backend, device))
        leaves = [xx] + [t for lin in ls for t in (lin.lora.A, lin.lora.B)]
        return [y, *torch.autograd.grad(y, leaves, dy.to(device, dtype))]

    got = run("cuda", CUDA)
    missing = (FUSED_MLP_CALLS | {ACT_BWD_CALLS[one_pass]}) - set(calls)
    assert not missing, f"kernels not called (a fallback to torch?): {sorted(missing)}"
    ref = run("torch", CUDA)
    exact = run("torch", CPU, torch.float64)
    # the longest chain of sums: the token reduction of dA, dB plus every projection's dimensions
    depth = x.numel() // d + sum(lin.weight.shape[0] + lin.weight.shape[1] + rank for lin in lins) + 16
    names = ["y", "dx"] + [f"{n}[{i}]" for i in range(len(lins)) for n in ("dA", "dB")]
    for name, ours, theirs, e in zip(names, got, ref, exact, strict=True):
        assert ours.device.type == "cuda" and ours.dtype == theirs.dtype, name
        # fp32 adapters: the tile kernels' LoRA products are tf32x3 (budget.py), every step of the chain
        assert_within_budget(ours.cpu(), theirs.cpu(), e, ours.dtype, depth, f"{layout.value} {name}", tf32x3_depth=depth)


def test_gated_mlp_captures_in_a_cuda_graph(calls):
    """The fused MLP's forward and backward on "cuda" capture into one CUDA graph (the wrappers read the
    current stream, which is the capture stream, and make no host syncs or pageable copies), replay
    deterministically, and the replayed outputs and gradients stay within budget against float64."""
    from helpers import capture_and_replay

    gen = torch.Generator().manual_seed(3)
    d, inter, rank = 512, 1536, 16
    lins = [_linear(d, inter, rank, gen), _linear(d, inter, rank, gen), _linear(inter, d, rank, gen)]
    x = torch.randn(2, 300, d, generator=gen).bfloat16()
    dy = torch.randn(2, 300, d, generator=gen).bfloat16()

    def runner(backend, device, dtype=None):
        seed = torch.tensor(2**41 + 5, device=device)  # on the device: a CPU seed would be a host-to-device copy
        ls = [_placed(lin, device, dtype) for lin in lins]
        xx, dyy = x.to(device, dtype), dy.to(device, dtype)

        def step():
            xl = xx.detach().requires_grad_()
            y = ops.masked_gated_mlp(xl, GatedMLPWeights(tuple(ls[:2]), ls[2]), R.Activation.SILU, MaskSpec(0.1), seed,
                                     ops.resolve(backend, device))
            return [y, *torch.autograd.grad(y, [xl] + [t for lin in ls for t in (lin.lora.A, lin.lora.B)], dyy)]
        return step

    eager, first, second = capture_and_replay(runner("cuda", CUDA))
    missing = FUSED_MLP_CALLS - set(calls)
    assert not missing, f"kernels not called (a fallback to torch?): {sorted(missing)}"
    ref = runner("torch", CUDA)()
    exact = runner("torch", CPU, torch.float64)()
    depth = x.numel() // d + sum(lin.weight.shape[0] + lin.weight.shape[1] + rank for lin in lins) + 16
    names = ["y", "dx"] + [f"{n}[{i}]" for i in range(3) for n in ("dA", "dB")]
    for name, e, a, b, theirs, ex in zip(names, eager, first, second, ref, exact, strict=True):
        assert torch.equal(a, b), f"{name}: two replays differ"
        for label, ours in (("eager", e), ("graph", a)):
            assert_within_budget(ours.cpu(), theirs.cpu(), ex, ours.dtype, depth, f"{label} {name}", tf32x3_depth=depth)


@pytest.mark.parametrize("dtype,a_dtype,r,r_gu,layout", [
    (torch.bfloat16, torch.float32, 16, 16, "split"), (torch.bfloat16, torch.float32, 32, 24, "fused"),
    (torch.bfloat16, torch.bfloat16, 64, 64, "split"), (torch.bfloat16, torch.bfloat16, 16, 40, "fused"),
    (torch.float16, torch.float16, 64, 48, "split"), (torch.float32, torch.float32, 8, 32, "split"),
], ids=["bf16-fp32-r16", "bf16-fp32-r32-fused", "bf16-r64", "bf16-r40-fused", "fp16-r64", "fp32-r32"])
def test_forward_gate_up_expands_give_the_bits_of_the_separate_expands_here(cuda_library, calls, dtype, a_dtype, r,
                                                                            r_gu, layout):
    """On the GPU, where the warps really run concurrently: the forward with the gate/up expands writes g,
    u, h' and S_d with the same bits as two lora_expand_ passes and the plain forward (the same mma; the
    host emulation's lockstep schedule cannot show a missing barrier, e.g. between z_g and the restaging
    of B_u at rank 64). Ragged rows, columns split (8192-wide I), rank tiles 16 to 64, every activation
    dtype, the fused layout (one S, B's halves), repeated runs equal."""
    from transpeft_kernels.kernels import cuda as K

    gen = torch.Generator().manual_seed(11)
    M, inter = 1000, 8192 + 64

    def rnd(*shape, scale=1.0, dtype=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(device=CUDA, dtype=dtype)

    g0, u0 = rnd(M, inter), rnd(M, inter)
    A = rnd(r, inter, scale=inter**-0.5, dtype=a_dtype)
    if layout == "fused":
        s = rnd(M, r_gu, dtype=a_dtype)
        b_g, b_u = rnd(2 * inter, r_gu, scale=0.5, dtype=a_dtype).chunk(2)
        gu = K.GateUpLora(s, b_g, 0.5, s, b_u, 0.5)
    else:
        gu = K.GateUpLora(rnd(M, r_gu, dtype=a_dtype), rnd(inter, r_gu, scale=0.5, dtype=a_dtype), 0.5,
                          rnd(M, r_gu, dtype=a_dtype), rnd(inter, r_gu, scale=0.5, dtype=a_dtype), 2.0)
    seed_m, drop = torch.tensor(21, device=CUDA), K.Dropout(0.1, torch.tensor(8, device=CUDA))
    g1, u1 = g0.clone(), u0.clone()
    K.lora_expand_(g1, gu.s_g, gu.b_g, gu.scaling_g)
    K.lora_expand_(u1, gu.s_u, gu.b_u, gu.scaling_u)
    want = (g1, u1, *K.masked_gated_act_fwd(g1, u1, "silu", 0.1, True, seed_m, down_a=A, down_drop=drop))
    for run in range(3):
        g2, u2 = g0.clone(), u0.clone()
        calls.clear()
        got = (g2, u2, *K.masked_gated_act_fwd(g2, u2, "silu", 0.1, True, seed_m, down_a=A, down_drop=drop, gate_up=gu))
        assert calls == ["transpeft_masked_gated_act_fwd"]
        for name, a, b in zip(("g", "u", "h", "S_d"), got, want, strict=True):
            assert torch.equal(a, b), f"run {run}: {name}"


def test_shrink_splits_agree_here(cuda_library):
    """The shrink's K split on the GPU (fp32 partials summed in a fixed order): every split count within the
    rounding of the K-long sum against float64 (tf32x3 products), the default split the same bits on a
    repeated run."""
    from transpeft_kernels.kernels import cuda as K

    gen = torch.Generator().manual_seed(12)
    x = torch.randn(3000, 14336, generator=gen).bfloat16().to(CUDA)
    a = (torch.randn(16, 14336, generator=gen) / 120).to(CUDA)
    exact = (x.double() @ a.double().t()).cpu()
    first = K.lora_shrink(x, a)
    assert torch.equal(first, K.lora_shrink(x, a))
    for splits in (1, 3, 64, None):
        assert_close_to_exact(K.lora_shrink(x, a, splits=splits).cpu(), exact, torch.float32, x.shape[1],
                              f"S, {splits} splits", tf32x3_depth=x.shape[1])
