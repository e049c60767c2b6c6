"""The "cuda" backend's binding and kernels on CPU, through the emulation library: the CUDA kernels'
own source compiled by g++ against a host stand-in for the CUDA runtime (csrc/emulation/simt), which
runs each launch with one fiber per CUDA thread, barriers and warp shuffles included.

It checks what can be checked without a GPU: which kernel gets which pointer, stride, dtype code,
mask and scale; the kernels' indexing, 16-byte packs, block reductions and grid-stride loops; the fused
down-projection shrink and LoRA gradient term; the dtype rounding; masks bit for bit against the
reference. Not checked here: timing, coalescing, register and shared-memory limits, and device-only
instructions (their host fallbacks run instead): test_cuda_ops.py on a GPU. The op-level tests of
test_ops.py run on "cuda" through the same emulation (their backend fixture).
"""
import shutil

import pytest
import torch

import test_ops
from budget import assert_close_to_exact, assert_within_budget
from transpeft_kernels import ops, reference as R
from transpeft_kernels.kernels import cuda as K
from transpeft_kernels.ops import backends
from transpeft_kernels.reference.lora import dropout_multiplier
from transpeft_kernels.specs import Layout, MaskSpec

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found: cannot build the emulation")


@pytest.fixture(autouse=True)
def _emulate(monkeypatch):
    monkeypatch.setenv("TRANSPEFT_CUDA_EMULATE", "1")
    yield


@pytest.fixture
def backend(_emulate):
    return ops.resolve("cuda", torch.device("cpu"))


@pytest.fixture
def calls(monkeypatch):
    """Names of the C functions called, to prove the kernels ran (no silent fallback to torch)."""
    seen: list[str] = []
    lib = K.load()
    original = type(lib).call

    def spy(self, name, *args):
        seen.append(name)
        return original(self, name, *args)

    monkeypatch.setattr(type(lib), "call", spy)
    return seen


def test_the_emulated_backend_is_the_cuda_backend_and_runs_the_kernels(backend, calls):
    assert backend.name == "cuda" and K.load().emulated
    w = test_ops.make_mlp(16, 24, Layout.SPLIT, torch.bfloat16, adapter_dtype=torch.float32, rank=4, dropout=0.1)
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    y = ops.masked_gated_mlp(x, w, R.Activation.SILU, MaskSpec(0.2), torch.tensor(3), backend)
    y.sum().backward()
    for name in ("transpeft_lora_shrink", "transpeft_lora_expand", "transpeft_masked_gated_act_fwd",
                 "transpeft_masked_gated_act_bwd", "transpeft_lora_dropout_cast"):
        assert name in calls, (name, calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", list(R.Activation))
def test_masked_act_forward_masks_bit_for_bit_and_values_to_rounding(dtype, activation):
    """The kept set equals reference.keep_mask exactly; values differ from torch's activation only by
    the last bit of act(g) (expf / erff / tanhf against ATen's vectorised versions)."""
    g, u = torch.randn(37, 53).to(dtype), torch.randn(37, 53).to(dtype)
    seed = torch.tensor(2**40 + 11)  # knowledge_mask adds SubSeed.MASK (= 0) itself
    dense = R.act(g, activation) * u
    for mask in (None, MaskSpec(0.3), MaskSpec(0.3, rescale=True)):
        p, rescale = (0.0, False) if mask is None else (mask.p, mask.rescale)
        got = K.masked_gated_act_fwd(g, u, activation.value, p, rescale, seed)
        want = dense if mask is None else R.knowledge_mask(dense, mask, seed)
        exact = R.act(g.double(), activation) * u.double()
        if mask is not None:
            keep = R.keep_mask(seed, 37, 53, mask.p)
            assert torch.equal(got[dense != 0] != 0, keep[dense != 0])
            exact = R.knowledge_mask(exact, mask, seed)
        assert_within_budget(got, want, exact, dtype, 16, f"h {mask}")


@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16])
def test_fused_down_shrink_and_grad_term_match_the_unfused_composition(a_dtype):
    dtype = torch.bfloat16
    M, inter, r = 9, 40, 5
    g, u = torch.randn(M, inter).to(dtype), torch.randn(M, inter).to(dtype)
    A = torch.randn(r, inter).to(a_dtype)
    seed_m, seed_d = torch.tensor(11), torch.tensor(14)
    drop = K.Dropout(0.2, seed_d)
    h, s = K.masked_gated_act_fwd(g, u, "gelu", 0.1, True, seed_m, down_a=A, down_drop=drop)
    h_ref = K.masked_gated_act_fwd(g, u, "gelu", 0.1, True, seed_m)
    assert torch.equal(h, h_ref)
    xd = h.to(a_dtype) * dropout_multiplier(seed_d, h.to(a_dtype), 0.2)
    # s = xd A^T over `inter` terms, accumulated in fp32 and rounded once to the adapter dtype
    assert_close_to_exact(s, xd.double() @ A.double().t(), a_dtype, inter, "s")
    assert torch.equal(K.lora_dropout_cast(h, a_dtype, drop), xd)

    dh_base, t = torch.randn(M, inter).to(dtype), torch.randn(M, r).to(a_dtype)
    dg, du, h2, xd2 = K.masked_gated_act_bwd(dh_base, g, u, "gelu", 0.1, True, seed_m, down_t=t, down_a=A,
                                             down_scaling=2.0, down_drop=drop, want_h=True, want_xd=True)
    assert torch.equal(h2, h) and torch.equal(xd2, xd)
    term = ((t.float() @ A.float()).to(a_dtype) * 2.0 * dropout_multiplier(seed_d, xd, 0.2)).to(dtype)
    dh = dh_base + term
    want = backends.TORCH.masked_act_bwd(dh, g, u, R.Activation.GELU, MaskSpec(0.1, True), seed_m)
    # exact: the same backward in float64 on the fused path's inputs (the LoRA term unrounded)
    term64 = (t.double() @ A.double()) * 2.0 * dropout_multiplier(seed_d, xd, 0.2).double()
    exact = backends.TORCH.masked_act_bwd(dh_base.double() + term64, g.double(), u.double(), R.Activation.GELU,
                                          MaskSpec(0.1, True), seed_m)
    for name, a, b, e in zip(("dg", "du"), (dg, du), want, exact):
        assert_within_budget(a, b, e, dtype, r + 16, name)


def test_fused_gate_up_backward_writes_both_halves_of_one_buffer(backend):
    test_ops.test_gated_mlp_matches_reference_low_precision(torch.bfloat16, torch.float32, Layout.FUSED_GATE_UP, backend)


def test_unsupported_dtype_combination_fails_cleanly():
    g = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="transpeft_masked_gated_act_fwd failed"):
        # an fp16 adapter on an fp32 activation is not a fused combination
        K.masked_gated_act_fwd(g, g, "silu", 0.0, False, None, down_a=torch.randn(2, 8).half())


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_patched_tiny_model_on_cuda_matches_torch(family, calls):
    import transpeft_kernels as tpk
    from helpers import assert_same_training_step, batch, lora_model, twin

    model = lora_model(family, lora_dropout=0.1)
    reference = twin(model)
    tpk.patch(model, masking=0.2, dropping=0.1, backend="cuda")
    tpk.patch(reference, masking=0.2, dropping=0.1, backend="torch")
    for seed in range(2):
        assert_same_training_step(model, reference, batch(seed), seed=seed)
    assert "transpeft_masked_gated_act_bwd" in calls
