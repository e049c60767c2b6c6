"""The Triton backend compiled on a CUDA GPU: what the CPU interpreter cannot show. Marked ``gpu`` and
skipped without CUDA; benchmarks/gpu_triton_check.py runs it (``python -m pytest
python_tests/test_gpu_triton.py -m gpu``). Kept to a few shapes and dtypes so that Triton's compiles
stay short; the kernels' small-shape cases and every op variant run in test_triton_kernels.py,
test_triton_gate_up_act.py and test_ops.py, compiled as well when a GPU is present.

* tl.randint / tl.rand as compiled for the GPU give reference.philox's bits, at offsets past 2**31
  and 2**32 too (test_philox.py checks the interpreter's);
* the keep masks the compiled kernels regenerate, at a shape spanning many programs and tiles,
  equal reference.keep_mask bit for bit, and so do those at element offsets past 2**31;
* lora_linear and masked_gated_mlp (both layouts) on "triton", with cuBLAS and with Triton base GEMMs,
  forward and every gradient, at realistic shapes against "torch" on the same GPU and float64 on the
  CPU, within budget.py's error budget, with the Triton kernels counted as they launch (a silent
  fallback to torch fails);
* launches through the plans' compiled kernels (kernels/triton/direct_launch.py) give the same bits as
  launches through Triton's own kernel[grid] path, and are taken;
* the masked gated MLP's forward and backward capture into a CUDA graph and replay within budget.

Autotuning stays off unless TRANSPEFT_TRITON_AUTOTUNE is set: the numerics hold for any config,
and timing every candidate would cost minutes of compiles.
"""
import os

import pytest
import torch

from budget import assert_within_budget

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="TRITON_INTERPRET is set: these tests check the compiled kernels"),
]

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from transpeft_kernels import ops, reference as R  # noqa: E402
from transpeft_kernels.kernels import triton as K  # noqa: E402
from transpeft_kernels.reference.lora import lora_dropout  # noqa: E402
from transpeft_kernels.reference.philox import (keep_mask, keep_threshold, philox_randint,  # noqa: E402
                                               philox_randint4x, philox_uniform)
from transpeft_kernels.specs import GatedMLPWeights, LinearWeights, LoraWeights, MaskSpec  # noqa: E402

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _default_launch_configs():
    with pytest.MonkeyPatch.context() as mp:
        if "TRANSPEFT_TRITON_AUTOTUNE" not in os.environ:
            mp.setenv("TRANSPEFT_TRITON_AUTOTUNE", "0")
        yield


# ---- Philox on the GPU ----------------------------------------------------------------------------
@triton.jit
def _philox_draw(out_i, out_f, seed_ptr, base, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs = idx.to(tl.int64) + base
    ok = idx < n
    seed = tl.load(seed_ptr)  # an int64 key in device memory, as the kernels read theirs
    tl.store(out_i + idx, tl.randint(seed, offs).to(tl.int64) & 0xFFFFFFFF, mask=ok)
    tl.store(out_f + idx, tl.rand(seed, offs), mask=ok)


@pytest.mark.parametrize("seed,base", [
    (0, 0),
    (123456789, 5),
    (2**40 + 7, 2**33 - 100),      # offsets cross 2**33: the high counter word changes
    (2**62 + 12345, 2**31 - 64),   # offsets cross 2**31, where int32 offsets would wrap
])
def test_tl_rand_bits_equal_the_reference(seed, base):
    n = 1 << 16
    key = torch.tensor([seed], dtype=torch.int64, device=CUDA)
    oi = torch.full((n,), -1, dtype=torch.int64, device=CUDA)
    of = torch.full((n,), -1.0, dtype=torch.float32, device=CUDA)
    _philox_draw[(triton.cdiv(n, 1024),)](oi, of, key, base, n, BLOCK=1024)
    offs = torch.arange(n, dtype=torch.int64) + base
    assert torch.equal(oi.cpu(), philox_randint(seed, offs))
    assert torch.equal(of.cpu(), philox_uniform(seed, offs))


# ---- masks the compiled kernels regenerate ---------------------------------------------------------
def test_masked_gated_act_masks_at_a_realistic_shape():
    # act(g) * u and both gradients are never zero for g, u in [1, 2): zero exactly where dropped.
    M, I, p, key = 3000, 1537, 0.1, torch.tensor(2**41 + 3)
    g = (1 + torch.rand(M, I, device=CUDA)).bfloat16()
    u = (1 + torch.rand(M, I, device=CUDA)).bfloat16()
    keep = keep_mask(key, M, I, p)
    h = K.masked_gated_act_fwd(g, u, "silu", p, False, key)
    dg, du = K.masked_gated_act_bwd(torch.ones_like(g), g, u, "silu", p, False, key)
    assert torch.equal((h != 0).cpu(), keep)
    assert torch.equal((dg != 0).cpu(), keep)
    assert torch.equal((du != 0).cpu(), keep)


def test_lora_shrink_dropout_at_a_realistic_shape():
    # A = identity: S is the dropped input itself, bit for bit the reference's dropout. fp32 adapters run
    # as tf32x3 (about 20 ulps per product), so x holds bf16 values and 1/(1-q) is a power of two: every
    # product is exact in tf32 and the sums have one non-zero term.
    M, d, q, key = 4096, 96, 0.5, torch.tensor(2**41 + 3)
    x = (1 + torch.rand(M, d, device=CUDA)).bfloat16().float()
    s = K.lora_shrink(x, torch.eye(d, device=CUDA), q, key)
    assert torch.equal((s != 0).cpu(), keep_mask(key, M, d, q))
    assert torch.equal(s, lora_dropout(x, q, key))


def test_masked_gated_act_mask_past_2_pow_31_elements():
    rows, cols, p, key = 150_000, 14_336, 0.3, torch.tensor(987654321)  # rows * cols > 2**31
    if torch.cuda.mem_get_info(CUDA)[0] < 12 * 2**30:
        pytest.skip("needs 9 GB of free GPU memory (two 4.3 GB bf16 tensors)")
    ones = torch.ones(rows, cols, dtype=torch.bfloat16, device=CUDA)
    h = K.masked_gated_act_fwd(ones, ones, "silu", p, False, key)
    del ones
    kept_value = torch.nn.functional.silu(torch.ones(())).bfloat16()  # act(1) * 1, rounded to bf16
    for r0 in (0, rows - 3):  # the first rows, and the last ones at element offsets past 2**31
        # the mask spec: lane j % 8 of the Philox call at row * ceil(cols / 8) + j // 8
        groups = torch.arange(r0, r0 + 3, dtype=torch.int64)[:, None] * (cols // 8) + torch.arange(cols // 8)
        words = philox_randint4x(key, groups)
        lanes = torch.stack([(words[l // 2] >> (16 * (l % 2))) & 0xFFFF for l in range(8)], dim=-1).reshape(3, cols)
        keep = lanes >= keep_threshold(p)
        got = h[r0:r0 + 3].cpu()
        assert torch.equal(got != 0, keep), r0
        assert torch.equal(got, torch.where(keep, kept_value, torch.zeros((), dtype=torch.bfloat16))), r0
    del h
    torch.cuda.empty_cache()


# ---- the autograd ops at realistic shapes -----------------------------------------------------------
KERNELS = ("lora_shrink", "token_reduce", "gemm_lora_expand", "gate_up_act", "lora_expand_add", "lora_expand_into",
           "gate_up_lora_act", "act_bwd_lora", "masked_gated_act_fwd", "masked_gated_act_bwd")
# What each op launches, per base-GEMM mode (ops/triton_backend.base_gemm); the MLP's backward is the
# one pass (act_bwd_lora) in both
EXPECTED = {
    ("lora_linear", "cublas"): {"lora_shrink", "lora_expand_into", "token_reduce"},
    ("lora_linear", "triton"): {"lora_shrink", "gemm_lora_expand", "token_reduce"},
    ("gated_mlp", "cublas"): {"lora_shrink", "lora_expand_into", "token_reduce", "gate_up_lora_act", "act_bwd_lora"},
    ("gated_mlp", "triton"): {"lora_shrink", "gemm_lora_expand", "token_reduce", "gate_up_act", "act_bwd_lora"},
}


@pytest.fixture
def launches(monkeypatch):
    """Launch counts of the Triton kernels the backend calls (a fallback to torch leaves them at zero)."""
    counts = dict.fromkeys(KERNELS, 0)
    for name in KERNELS:
        original = getattr(K, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(K, name, counted)
    return counts


def _linear(d_in, d_out, dtype, adapter_dtype, rank, q, gen):
    W = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dtype)
    b = (torch.randn(d_out, generator=gen) * 0.1).to(dtype)
    A = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(adapter_dtype)
    B = (torch.randn(d_out, rank, generator=gen) / rank**0.5).to(adapter_dtype)  # non-zero B
    return LinearWeights(W, b, LoraWeights(A, B, 2.0, q))


def _placed(lin, device, dtype=None):
    """A copy on ``device`` (every tensor in ``dtype`` when given): frozen base, trainable A and B."""
    W, b, A, B = (t.detach().to(device=device, dtype=dtype or t.dtype) for t in lin.tensors())
    return lin.with_tensors(W, b, A.requires_grad_(), B.requires_grad_())


def _output_and_grads(fn, x, lins, dy):
    x = x.detach().requires_grad_()
    y = fn(x, lins)
    leaves = [x] + [t for lin in lins for t in (lin.lora.A, lin.lora.B)]
    return [y, *torch.autograd.grad(y, leaves, dy)]


DTYPES = {"fp32": (torch.float32, torch.float32), "bf16-fp32-adapters": (torch.bfloat16, torch.float32),
          "bf16": (torch.bfloat16, torch.bfloat16)}
# Every kernel in each (base, adapter) dtype pair, and each MLP layout twice, with the default cuBLAS base
# GEMMs; the Triton GEMMs in the main dtype pair; not the full product, which adds compiles and no kernel
# variant.
OP_CASES = [("lora_linear", dt, "cublas") for dt in DTYPES] + [
    ("gated_mlp_split", "fp32", "cublas"), ("gated_mlp_split", "bf16-fp32-adapters", "cublas"),
    ("gated_mlp_fused", "bf16-fp32-adapters", "cublas"), ("gated_mlp_fused", "bf16", "cublas"),
    ("lora_linear", "bf16-fp32-adapters", "triton"), ("gated_mlp_split", "bf16-fp32-adapters", "triton"),
    ("gated_mlp_fused", "fp32", "triton"),
    # rank 64 with bf16 adapters: the one pass's dh' fold at its sm_90-only rank (32 on sm_80: the separate expand)
    ("gated_mlp_split_r64", "bf16", "cublas"),
]


@pytest.mark.parametrize("op,dtypes,base_gemm", OP_CASES)
def test_ops_at_realistic_shapes_match_torch_and_float64(op, dtypes, base_gemm, launches, monkeypatch):
    from transpeft_kernels.ops.triton_backend import BASE_GEMM_ENV

    monkeypatch.setenv(BASE_GEMM_ENV, base_gemm)
    dtype, adt = DTYPES[dtypes]
    gen = torch.Generator().manual_seed(0)
    d, inter = 257, 700  # ragged against every tile size
    x = torch.randn(3, 333, d, generator=gen).to(dtype)
    seed = torch.tensor(11)
    if op == "lora_linear":
        lins = [_linear(d, 515, dtype, adt, 16, 0.1, gen)]

        def fn(x, ls, backend):
            return ops.lora_linear(x, ls[0], seed, backend)
    else:
        widths = [inter, inter] if op.startswith("gated_mlp_split") else [2 * inter]
        rank = 64 if op.endswith("_r64") else 8
        lins = [_linear(d, w, dtype, adt, rank, 0.05, gen) for w in widths] + \
            [_linear(inter, d, dtype, adt, rank, 0.05, gen)]

        def fn(x, ls, backend):
            return ops.masked_gated_mlp(x, GatedMLPWeights(tuple(ls[:-1]), ls[-1]), R.Activation.SILU, MaskSpec(0.1),
                                        seed, backend)
    dy = torch.randn(*x.shape[:-1], lins[-1].weight.shape[0], generator=gen).to(dtype)

    def run(backend, device, dtype=None):
        return _output_and_grads(lambda x, ls: fn(x, ls, ops.resolve(backend, device)), x.to(device, dtype),
                                 [_placed(lin, device, dtype) for lin in lins], dy.to(device, dtype))

    got = run("triton", CUDA)
    ran = {name for name, n in launches.items() if n}
    want = EXPECTED[("gated_mlp" if op.startswith("gated_mlp") else op, base_gemm)]
    assert want <= ran, f"Triton kernels not launched (a fallback to torch?): {sorted(want - ran)}"
    ref = run("torch", CUDA)
    exact = run("torch", CPU, torch.float64)
    # the longest chain of sums: the token reduction of dA, dB plus every projection's dimensions
    depth = x.numel() // d + sum(lin.weight.shape[0] + lin.weight.shape[1] + lin.lora.A.shape[0] for lin in lins) + 16
    names = ["y", "dx"] + [f"{n}[{i}]" for i in range(len(lins)) for n in ("dA", "dB")]
    for name, ours, theirs, e in zip(names, got, ref, exact, strict=True):
        assert ours.device.type == "cuda" and ours.dtype == theirs.dtype, name
        assert_within_budget(ours.cpu(), theirs.cpu(), e, ours.dtype, depth, f"{op} {dtypes} {name}")


@pytest.mark.parametrize("op", ["lora_linear", "gated_mlp_split"])
def test_direct_launches_give_the_same_bits_as_tritons_path(op, monkeypatch):
    """kernels/triton/direct_launch.py: after a plan's first launch the compiled kernel is called directly.
    Its results must equal, bit for bit, those of every launch going through kernel[grid] (the kernels
    are deterministic), and the direct path must actually have been taken."""
    from transpeft_kernels.kernels.triton import direct_launch, plans

    monkeypatch.setattr(direct_launch, "ENABLED", direct_launch.ENABLED)
    gen = torch.Generator().manual_seed(1)
    d, inter = 257, 700
    x = torch.randn(2, 300, d, generator=gen).to(CUDA, torch.bfloat16)
    seed = torch.tensor(5, device=CUDA)
    if op == "lora_linear":
        lins = [_placed(_linear(d, 515, torch.bfloat16, torch.float32, 16, 0.1, gen), CUDA)]

        def fn(x, ls):
            return ops.lora_linear(x, ls[0], seed, ops.resolve("triton", CUDA))
    else:
        lins = [_placed(_linear(a, b, torch.bfloat16, torch.float32, 8, 0.05, gen), CUDA)
                for a, b in ((d, inter), (d, inter), (inter, d))]

        def fn(x, ls):
            return ops.masked_gated_mlp(x, GatedMLPWeights(tuple(ls[:2]), ls[2]), R.Activation.SILU, MaskSpec(0.1),
                                        seed, ops.resolve("triton", CUDA))
    dy = torch.randn(*x.shape[:-1], lins[-1].weight.shape[0], generator=gen).to(CUDA, torch.bfloat16)

    def results(enabled):
        direct_launch.ENABLED = enabled
        return _output_and_grads(fn, x, lins, dy)

    plans.clear_all()
    through_triton = results(False)
    plans.clear_all()
    first, again = results(True), results(True)
    assert any(pl.compiled for c in plans.CACHES.values() for pl in c._plans.values()), "no direct launch happened"
    for i, (a, b, c) in enumerate(zip(through_triton, first, again, strict=True)):
        assert torch.equal(a, b) and torch.equal(a, c), f"{op} output {i}"


def test_mlp_fwd_bwd_captures_in_a_cuda_graph():
    """The masked gated MLP's forward and backward on "triton" capture into one CUDA graph (no host
    syncs, no pageable copies: the issue's "CUDA-graph capturable"), replay deterministically, and
    the replayed outputs and gradients stay within the error budget against float64."""
    from helpers import capture_and_replay

    gen = torch.Generator().manual_seed(2)
    d, inter = 257, 700
    lins = [_linear(a, b, torch.bfloat16, torch.float32, 8, 0.05, gen) for a, b in ((d, inter), (d, inter), (inter, d))]
    x = torch.randn(2, 300, d, generator=gen).bfloat16()
    dy = torch.randn(2, 300, d, generator=gen).bfloat16()

    def runner(backend, device, dtype=None):
        seed = torch.tensor(7, device=device)  # on the device: a CPU seed would be a host-to-device copy
        ls = [_placed(lin, device, dtype) for lin in lins]
        xx, dyy = x.to(device, dtype), dy.to(device, dtype)

        def fn(x, ls):
            return ops.masked_gated_mlp(x, GatedMLPWeights(tuple(ls[:2]), ls[2]), R.Activation.SILU, MaskSpec(0.1),
                                        seed, ops.resolve(backend, device))
        return lambda: _output_and_grads(fn, xx, ls, dyy)

    eager, first, second = capture_and_replay(runner("triton", CUDA))
    ref = runner("torch", CUDA)()
    exact = runner("torch", CPU, torch.float64)()
    depth = x.numel() // d + sum(lin.weight.shape[0] + lin.weight.shape[1] + 8 for lin in lins) + 16
    names = ["y", "dx"] + [f"{n}[{i}]" for i in range(3) for n in ("dA", "dB")]
    for name, e, a, b, theirs, ex in zip(names, eager, first, second, ref, exact, strict=True):
        assert torch.equal(a, b), f"{name}: two replays differ"
        for label, ours in (("eager", e), ("graph", a)):
            assert_within_budget(ours.cpu(), theirs.cpu(), ex, ours.dtype, depth, f"{label} {name}")
