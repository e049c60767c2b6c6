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
from budget import UNIT_ROUNDOFF, assert_close_to_exact, assert_within_budget, floor
from helpers import ACT_BWD_CALLS, FUSED_MLP_CALLS, assert_act_at_extremes
from transpeft_kernels import ops, reference as R
from transpeft_kernels.kernels import cuda as K
from transpeft_kernels.ops import backends, cuda_backend
from transpeft_kernels.reference.lora import dropout_multiplier
from transpeft_kernels.specs import GatedMLPWeights, Layout, MaskSpec

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


@pytest.mark.parametrize("one_pass", ["1", "0"])
def test_the_emulated_backend_is_the_cuda_backend_and_runs_the_kernels(backend, calls, monkeypatch, one_pass):
    monkeypatch.setenv(cuda_backend.ONE_PASS_ENV, one_pass)
    assert backend.name == "cuda" and K.load().emulated
    w = test_ops.make_mlp(16, 24, Layout.SPLIT, torch.bfloat16, adapter_dtype=torch.float32, rank=4, dropout=0.1)
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    y = ops.masked_gated_mlp(x, w, R.Activation.SILU, MaskSpec(0.2), torch.tensor(3), backend)
    y.sum().backward()
    act_bwd = ACT_BWD_CALLS[one_pass]
    missing = (FUSED_MLP_CALLS | {act_bwd}) - set(calls)  # what test_gpu_cuda.py expects on a GPU
    assert not missing, (sorted(missing), calls)
    other = set(ACT_BWD_CALLS.values()) - {act_bwd}
    assert not other & set(calls), calls
    # token sums: dB_d, dA_g, dA_u; the one pass also gives the gate/up dB (the multi-pass path reduces them)
    assert calls.count("transpeft_lora_token_reduce") == (3 if one_pass == "1" else 5), calls


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.FUSED_GATE_UP])
def test_gate_up_db_from_the_one_pass_backward_matches_the_token_sums(backend, calls, monkeypatch, layout):
    """The MLP's gate/up dB from act_bwd_lora equal those of the token reductions it replaces up to fp32
    summation order (both sum s cast_A(dg)^T S in fp32 on the tensor cores), and every other gradient
    bit for bit; the fused layout's dB is [dg^T S; du^T S]."""
    w = test_ops.make_mlp(16, 48, layout, torch.bfloat16, adapter_dtype=torch.float32, rank=8, dropout=0.1)

    def grads():
        torch.manual_seed(0)
        x = torch.randn(70, 16, dtype=torch.bfloat16, requires_grad=True)
        y = ops.masked_gated_mlp(x, w, R.Activation.SILU, MaskSpec(0.2), torch.tensor(3), backend)
        return torch.autograd.grad(y, test_ops.leaves(x, w), torch.randn_like(y))

    input_bs = [lin.lora.B for lin in w.inputs]
    is_input_db = [any(t is b for b in input_bs) for t in test_ops.leaves(torch.empty(0), w)]
    assert sum(is_input_db) == len(w.inputs)
    fused = grads()
    n_fused = calls.count("transpeft_lora_token_reduce")
    monkeypatch.setattr(cuda_backend.CudaBackend, "_gate_up_db", lambda self, *a: None)
    calls.clear()
    separate = grads()
    assert calls.count("transpeft_lora_token_reduce") == n_fused + len(w.inputs)
    for i, (a, b, db) in enumerate(zip(fused, separate, is_input_db, strict=True)):
        if db:
            assert_close_to_exact(a, b.double(), torch.float32, 70, f"grad {i}", tf32x3_depth=70)
        else:
            assert torch.equal(a, b), f"grad {i}"


@pytest.mark.parametrize("activation", list(R.Activation))
def test_masked_act_at_extreme_inputs(activation):
    assert_act_at_extremes(lambda g, u: K.masked_gated_act_fwd(g, u, activation.value, 0.0, False, None),
                           lambda dh, g, u: K.masked_gated_act_bwd(dh, g, u, activation.value, 0.0, False, None)[:2],
                           activation)


@pytest.mark.parametrize("x_dtype, a_dtype, rank, q, shrink, reduce", [
    (torch.bfloat16, torch.bfloat16, 8, 0.0, False, False),   # nothing to fuse: cuBLAS for S, t, dA, dB
    (torch.bfloat16, torch.bfloat16, 8, 0.1, True, True),     # the dropout fused; dA reduced with the mask
    (torch.bfloat16, torch.bfloat16, 64, 0.1, True, False),   # rank 64: dA on a masked copy (lora_dropout_cast)
    (torch.float32, torch.float32, 8, 0.0, True, False),      # fp32 stays on the tf32x3 kernel
    (torch.bfloat16, torch.float32, 8, 0.0, True, True),      # the fp32 cast fused; tensor-core token sums
    (torch.bfloat16, torch.float32, 64, 0.1, True, True),     # so at rank 64 too, mask and cast fused
])
def test_lora_linear_routes_by_what_there_is_to_fuse(backend, calls, x_dtype, a_dtype, rank, q, shrink, reduce):
    """CudaBackend's choices (the model's): lora_shrink only where it fuses a cast or a mask,
    lora_token_reduce for dA/dB where it saves a cast (rank <= 64) or a masked 16-bit copy (rank <= 32)."""
    lin = test_ops.make_linear(16, 24, x_dtype, adapter_dtype=a_dtype, rank=rank, dropout=q)
    x = torch.randn(7, 16, dtype=x_dtype, requires_grad=True)
    ops.lora_linear(x, lin, torch.tensor(5), backend).sum().backward()
    assert ("transpeft_lora_shrink" in calls) == shrink, calls
    assert ("transpeft_lora_token_reduce" in calls) == reduce, calls
    assert ("transpeft_lora_dropout_cast" in calls) == (q > 0 and not reduce), calls


def test_a_bad_one_pass_setting_is_refused(monkeypatch):
    monkeypatch.setenv(cuda_backend.ONE_PASS_ENV, "yes")
    with pytest.raises(ValueError, match="TRANSPEFT_CUDA_ONE_PASS_BWD: expected 0 or 1"):
        cuda_backend.one_pass_bwd_enabled()


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


@pytest.mark.parametrize("x_dtype, out_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                                 (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("K_cols, layout", [(48, "rows"), (37, "rows"), (40, "padded"), (24, "strided")])
@pytest.mark.parametrize("q", [0.0, 0.3])
def test_dropout_cast_bit_for_bit(x_dtype, out_dtype, K_cols, layout, q):
    """lora_dropout_cast = x.to(A) * dropout_multiplier, bit for bit: the 8-column groups with 16-byte packs
    (K % 8 == 0, aligned rows), the groups element by element (ragged K, padded rows), and the
    per-element kernel (x with a column stride other than 1)."""
    M = 19
    base = torch.randn(M, 2 * K_cols + 8).to(x_dtype)
    x = {"rows": base[:, :K_cols].contiguous(), "padded": base[:, 3:3 + K_cols],
         "strided": base[:, : 2 * K_cols : 2]}[layout]
    seed = torch.tensor(23)
    drop = K.Dropout(q, seed) if q > 0 else None
    got = K.lora_dropout_cast(x, out_dtype, drop)
    want = x.to(out_dtype) * (dropout_multiplier(seed, x.to(out_dtype), q) if q > 0 else 1)
    assert got.dtype == out_dtype and torch.equal(got, want)


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
    assert "transpeft_act_bwd_lora" in calls  # the one-pass backward (the tiny models' I is a multiple of 8)


def _one_pass_case(M, inter, r, dtype, a_dtype, activation, splits=None, out=None, q=0.2, gate_up_rank=None):
    """act_bwd_lora on random inputs, with what it should equal: its result (ActBwdLoraGrads), the
    reference dg, du (torch, in dtype, on the same rounded LoRA term), their float64 versions, and dA in
    float64. With ``gate_up_rank`` it is also given S_g, S_u of that rank (scalings 0.75, 1.25), kept in
    ``_one_pass_case.gate_up`` for ``_db_exact``."""
    g, u, dh_base = (torch.randn(M, inter).to(dtype) for _ in range(3))
    A, t = (torch.randn(r, inter) * 0.3).to(a_dtype), torch.randn(M, r).to(a_dtype)
    seed_m, seed_d = torch.tensor(5), torch.tensor(9)
    mask, drop = MaskSpec(0.1, True), K.Dropout(q, seed_d)
    gate_up = None
    if gate_up_rank is not None:
        gate_up = (torch.randn(M, gate_up_rank).to(a_dtype), 0.75, torch.randn(M, gate_up_rank).to(a_dtype), 1.25)
    got = K.act_bwd_lora(dh_base, g, u, activation.value, 0.1, True, seed_m, t, A, 0.5, drop, out=out, splits=splits,
                         gate_up=gate_up)
    _one_pass_case.gate_up = gate_up
    h = K.masked_gated_act_fwd(g, u, activation.value, 0.1, True, seed_m)
    keep_d = dropout_multiplier(seed_d, h.to(a_dtype), q)
    xd = h.to(a_dtype) * keep_d  # exactly what the kernel rebuilds in registers
    term = ((t.float() @ A.float()).to(a_dtype) * 0.5 * keep_d).to(dtype)
    want = backends.TORCH.masked_act_bwd(dh_base + term, g, u, activation, mask, seed_m)
    term64 = (t.double() @ A.double()) * 0.5 * keep_d.double()
    exact = backends.TORCH.masked_act_bwd(dh_base.double() + term64, g.double(), u.double(), activation, mask, seed_m)
    dA64 = (t.double().t() @ xd.double()) * 0.5
    return got, want, exact, dA64


def _tf32x3(a_dtype, depth):
    return depth if a_dtype == torch.float32 else 0


@pytest.mark.parametrize("dtype,a_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float16), (torch.float16, torch.float32),
                                           (torch.float32, torch.float32)])
@pytest.mark.parametrize("activation", list(R.Activation))
def test_one_pass_backward_against_float64(dtype, a_dtype, activation, calls):
    """dg, du within the reference's budget (the LoRA term's rank-long sum on the tensor cores: tf32x3
    with fp32 adapters); dA_d within the rounding of its M-long sum; on a ragged shape (45 rows: a partial
    32-row step; 72 columns: a partial 64-column block) split over two row groups."""
    M, inter, r = 45, 72, 5
    got, want, exact, dA64 = _one_pass_case(M, inter, r, dtype, a_dtype, activation, splits=2)
    dg, du, dA = got.dg, got.du, got.dA_d
    assert calls == ["transpeft_act_bwd_lora", "transpeft_masked_gated_act_fwd"]
    for name, a, b, e in zip(("dg", "du"), (dg, du), want, exact):
        assert_within_budget(a, b, e, dtype, r + 16, name, tf32x3_depth=_tf32x3(a_dtype, r))
    assert dA.dtype == a_dtype
    assert_close_to_exact(dA, dA64, a_dtype, M, "dA_d", tf32x3_depth=_tf32x3(a_dtype, M))


@pytest.mark.parametrize("r", [1, 16, 17, 40, 64])
def test_one_pass_backward_every_rank_tile(r):
    """Ranks padded to the 16, 32 and 64 tiles (zero rows of A_d and columns of t_d must add nothing)."""
    M, inter = 70, 136
    got, want, exact, dA64 = _one_pass_case(M, inter, r, torch.bfloat16, torch.float32, R.Activation.SILU)
    dg, du, dA = got.dg, got.du, got.dA_d
    for name, a, b, e in zip(("dg", "du"), (dg, du), want, exact):
        assert_within_budget(a, b, e, torch.bfloat16, r + 16, name, tf32x3_depth=r)
    assert_close_to_exact(dA, dA64, torch.float32, M, "dA_d", tf32x3_depth=M)


def test_one_pass_backward_splits_change_only_the_summation_order():
    """Any split count gives dg, du bit for bit and dA_d up to fp32 summation order; into the halves of
    one (M, 2I) buffer (the fused gate_up layout) as into fresh tensors."""
    M, inter, r = 100, 64, 8
    torch.manual_seed(3)
    one, *_ = _one_pass_case(M, inter, r, torch.bfloat16, torch.float32, R.Activation.GELU, splits=1)
    for splits in (2, 4, 50):
        torch.manual_seed(3)
        buf = torch.empty(M, 2 * inter, dtype=torch.bfloat16)
        got, _, _, dA64 = _one_pass_case(M, inter, r, torch.bfloat16, torch.float32, R.Activation.GELU,
                                         splits=splits, out=(buf[:, :inter], buf[:, inter:]))
        dg, du, dA = got.dg, got.du, got.dA_d
        assert torch.equal(dg, one.dg) and torch.equal(du, one.du)
        assert torch.equal(buf[:, :inter], one.dg) and torch.equal(buf[:, inter:], one.du)
        assert_close_to_exact(dA, dA64, torch.float32, M, "dA_d", tf32x3_depth=M)


def _db_exact(got, gate_up, a_dtype):
    """dB_g, dB_u in float64 from the dg, du the pass returned: s cast_A(dg)^T S (what the token sums read)."""
    sg, scale_g, su, scale_u = gate_up
    return (scale_g * (got.dg.to(a_dtype).double().t() @ sg.double()),
            scale_u * (got.du.to(a_dtype).double().t() @ su.double()))


@pytest.mark.parametrize("dtype,a_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("r,r_gu", [(5, 5), (16, 3), (2, 17), (32, 32)])
def test_one_pass_backward_gate_up_db_against_float64(dtype, a_dtype, r, r_gu, calls):
    """The gate/up dB from the same pass: within the rounding of the M-long sum against float64, in A_d's
    dtype, (I, r) contiguous; on a ragged shape split over three row groups, with the down and gate/up
    ranks in different tiles; dg, du and dA_d the same bits as without it."""
    M, inter = 77, 136
    torch.manual_seed(4)
    got, *_ = _one_pass_case(M, inter, r, dtype, a_dtype, R.Activation.SILU, splits=3, gate_up_rank=r_gu)
    gate_up = _one_pass_case.gate_up
    torch.manual_seed(4)
    plain, *_ = _one_pass_case(M, inter, r, dtype, a_dtype, R.Activation.SILU, splits=3)
    assert calls.count("transpeft_act_bwd_lora") == 2
    assert torch.equal(got.dg, plain.dg) and torch.equal(got.du, plain.du) and torch.equal(got.dA_d, plain.dA_d)
    assert plain.dB_g is None and plain.dB_u is None
    for name, db, exact in zip(("dB_g", "dB_u"), (got.dB_g, got.dB_u), _db_exact(got, gate_up, a_dtype)):
        assert db.dtype == a_dtype and db.shape == (inter, r_gu) and db.is_contiguous(), name
        assert_close_to_exact(db, exact, a_dtype, M, name, tf32x3_depth=_tf32x3(a_dtype, M))


def test_one_pass_backward_gate_up_db_splits_change_only_the_summation_order():
    M, inter, r = 100, 64, 8
    results = []
    for splits in (1, 2, 4):
        torch.manual_seed(5)
        got, *_ = _one_pass_case(M, inter, r, torch.bfloat16, torch.float32, R.Activation.GELU_TANH, splits=splits,
                                 gate_up_rank=8)
        results.append(got)
        for name, db, exact in zip(("dB_g", "dB_u"), (got.dB_g, got.dB_u),
                                   _db_exact(got, _one_pass_case.gate_up, torch.float32)):
            assert_close_to_exact(db, exact, torch.float32, M, name, tf32x3_depth=M)
    assert all(torch.equal(r.dg, results[0].dg) and torch.equal(r.du, results[0].du) for r in results)


def test_one_pass_backward_gate_up_db_refuses_what_it_does_not_take():
    M, inter, r = 40, 64, 8
    g = torch.randn(M, inter).bfloat16()
    t, A = torch.randn(M, r), torch.randn(r, inter)
    args = ("silu", 0.0, False, None)
    s = torch.randn(M, 8)
    with pytest.raises(ValueError, match="S_g"):
        K.act_bwd_lora(g, g, g, *args, t, A, 1.0, gate_up=(torch.randn(M, 33), 1.0, torch.randn(M, 33), 1.0))
    with pytest.raises(ValueError, match="S_u"):
        K.act_bwd_lora(g, g, g, *args, t, A, 1.0, gate_up=(s, 1.0, torch.randn(M, 4), 1.0))
    with pytest.raises(ValueError, match="S_g"):  # not A_d's dtype
        K.act_bwd_lora(g, g, g, *args, t, A, 1.0, gate_up=(s.bfloat16(), 1.0, s.bfloat16(), 1.0))
    with pytest.raises(ValueError, match="down rank"):
        K.act_bwd_lora(g, g, g, *args, torch.randn(M, 40), torch.randn(40, inter), 1.0, gate_up=(s, 1.0, s, 1.0))
    with pytest.raises(ValueError, match="16-bit activations"):
        K.act_bwd_lora(g.float(), g.float(), g.float(), *args, t, A, 1.0, gate_up=(s, 1.0, s, 1.0))


def test_one_pass_backward_refuses_what_it_does_not_take():
    M, inter = 4, 16
    g = torch.randn(M, inter).bfloat16()
    t, A = torch.randn(M, 2), torch.randn(2, inter)
    args = ("silu", 0.0, False, None)
    with pytest.raises(ValueError, match="divisible by 8"):
        K.act_bwd_lora(g[:, :12], g[:, :12], g[:, :12], *args, t, A[:, :12], 1.0)
    with pytest.raises(ValueError, match="r <= 64"):
        K.act_bwd_lora(g, g, g, *args, torch.randn(M, 65), torch.randn(65, inter), 1.0)
    with pytest.raises(ValueError, match="splits: expected a positive count"):
        K.act_bwd_lora(g, g, g, *args, t, A, 1.0, splits=0)
    # rows 20 elements apart: not 16-byte aligned, refused by the library itself (the backend checks first)
    wide = torch.randn(M, 20).bfloat16()[:, :inter]
    assert not K.act_bwd_lora_supported(wide)
    with pytest.raises(RuntimeError, match="transpeft_act_bwd_lora failed"):
        K.act_bwd_lora(wide, wide, wide, *args, t, A, 1.0)


@pytest.mark.parametrize("dtype,a_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("activation", list(R.Activation))
@pytest.mark.parametrize("M,inter,r", [(45, 72, 5), (70, 136, 40), (33, 64, 64), (3, 16, 1), (40, 264, 16)])
def test_forward_down_shrink_on_tensor_cores_against_float64(dtype, a_dtype, activation, M, inter, r):
    """With I % 8 == 0 and aligned rows the forward runs the tensor-core kernel (act_lora.cu): h' bit for
    bit the plain masked activation's, S_d = dropout(cast_A(h')) A_d^T within the rounding of its
    I-long sum (tf32x3 products with fp32 adapters). Ragged: partial 32-row blocks and 64-column steps;
    I = 264 splits its columns in two (192 + 72), fp32 partials summed by the wrapper."""
    g, u = torch.randn(M, inter).to(dtype), torch.randn(M, inter).to(dtype)
    A = (torch.randn(r, inter) * 0.3).to(a_dtype)
    seed_m, seed_d = torch.tensor(21), torch.tensor(8)
    h, s = K.masked_gated_act_fwd(g, u, activation.value, 0.1, True, seed_m, down_a=A, down_drop=K.Dropout(0.1, seed_d))
    assert torch.equal(h, K.masked_gated_act_fwd(g, u, activation.value, 0.1, True, seed_m))
    xd = h.to(a_dtype) * dropout_multiplier(seed_d, h.to(a_dtype), 0.1)
    assert s.dtype == a_dtype and s.shape == (M, r)
    assert_close_to_exact(s, xd.double() @ A.double().t(), a_dtype, inter, "S_d",
                          tf32x3_depth=_tf32x3(a_dtype, inter))


def _gate_up_case(M, inter, r, r_gu, dtype, a_dtype, layout="split"):
    """g, u (M, I), A_d, the GateUpLora (S in a_dtype, B as the fused layout's halves of one (2I, r) B or two
    B's) and the seeds of a forward with the gate/up expands."""
    g, u = torch.randn(M, inter).to(dtype), torch.randn(M, inter).to(dtype)
    A = (torch.randn(r, inter) * 0.3).to(a_dtype)
    sg = torch.randn(M, r_gu).to(a_dtype)
    if layout == "fused":  # one S, B_g and B_u the halves of one B
        b_g, b_u = (torch.randn(2 * inter, r_gu) * 0.5).to(a_dtype).chunk(2)
        gate_up = K.GateUpLora(sg, b_g, 0.5, sg, b_u, 0.5)
    else:
        gate_up = K.GateUpLora(sg, (torch.randn(inter, r_gu) * 0.5).to(a_dtype), 0.5,
                               torch.randn(M, r_gu).to(a_dtype), (torch.randn(inter, r_gu) * 0.5).to(a_dtype), 2.0)
    return g, u, A, gate_up


@pytest.mark.parametrize("dtype,a_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float16), (torch.float16, torch.float32),
                                           (torch.float32, torch.float32)])
@pytest.mark.parametrize("M,inter,r,r_gu,layout", [(45, 72, 5, 16, "split"), (70, 264, 16, 8, "split"),
                                                   (33, 64, 2, 32, "fused"), (40, 136, 32, 24, "split"),
                                                   (3, 16, 1, 8, "fused"), (50, 200, 40, 64, "split"),
                                                   (35, 136, 64, 40, "fused")])
def test_forward_gate_up_expands_give_the_bits_of_the_separate_expands(dtype, a_dtype, M, inter, r, r_gu, layout, calls):
    """The gate/up expands inside the tensor-core forward: g and u written in place with the same bits as
    two lora_expand_ passes (the same mma; ranks in different tiles pad with zeros that add nothing), and
    h', S_d the same bits as the forward over those; g within its rounding budget against float64. Ragged:
    partial 32-row blocks and 64-column steps; I = 264 splits the columns in two. Rank tile 64 (16-bit
    adapters only: B_g and B_u take turns in one buffer; fp32 adapters are refused there)."""
    if a_dtype == torch.float32 and max(r, r_gu) > K.MAX_GATE_UP_RANK[torch.float32]:
        pytest.skip("fp32 adapters: gate/up expands up to rank 32 (refusal tested below)")
    torch.manual_seed(6)
    g0, u0, A, gu = _gate_up_case(M, inter, r, r_gu, dtype, a_dtype, layout)
    seed_m, drop = torch.tensor(21), K.Dropout(0.1, torch.tensor(8))
    g1, u1 = g0.clone(), u0.clone()
    K.lora_expand_(g1, gu.s_g, gu.b_g, gu.scaling_g)
    K.lora_expand_(u1, gu.s_u, gu.b_u, gu.scaling_u)
    h1, s1 = K.masked_gated_act_fwd(g1, u1, "gelu_tanh", 0.1, True, seed_m, down_a=A, down_drop=drop)
    calls.clear()
    g2, u2 = g0.clone(), u0.clone()
    h2, s2 = K.masked_gated_act_fwd(g2, u2, "gelu_tanh", 0.1, True, seed_m, down_a=A, down_drop=drop, gate_up=gu)
    assert calls == ["transpeft_masked_gated_act_fwd"]
    for name, a, b in (("g", g2, g1), ("u", u2, u1), ("h", h2, h1), ("S_d", s2, s1)):
        assert torch.equal(a, b), name
    term = (gu.s_g.double() @ gu.b_g.double().t()) * gu.scaling_g
    exact = g0.double() + term
    scale = max(g0.double().abs().max().item(), term.abs().max().item())
    allowed = floor(torch.float32, r_gu, scale, roundings=0, tf32x3_depth=_tf32x3(a_dtype, r_gu)) \
        + (2 * UNIT_ROUNDOFF[a_dtype] + UNIT_ROUNDOFF[dtype]) * scale  # TA(z), TA(. * s), T(g + term)
    err = (g2.double() - exact).abs().max().item()
    assert err <= allowed, (err, allowed)


def test_forward_gate_up_expands_refuse_what_they_do_not_take():
    M, inter = 40, 64
    g, u, A, gu = _gate_up_case(M, inter, 8, 8, torch.bfloat16, torch.float32)
    args = ("silu", 0.0, False, None)
    with pytest.raises(ValueError, match="needs down_a"):
        K.masked_gated_act_fwd(g, u, *args, gate_up=gu)
    with pytest.raises(ValueError, match="down rank <= 32 with torch.float32 adapters"):
        K.masked_gated_act_fwd(g, u, *args, down_a=torch.randn(40, inter), gate_up=gu)
    wide = K.GateUpLora(torch.randn(M, 33), torch.randn(inter, 33), 1.0, torch.randn(M, 33), torch.randn(inter, 33), 1.0)
    with pytest.raises(ValueError, match="gate_up S_g"):
        K.masked_gated_act_fwd(g, u, *args, down_a=A, gate_up=wide)
    wider = K.GateUpLora(*(t.bfloat16() if isinstance(t, torch.Tensor) else t for t in (
        torch.randn(M, 65), torch.randn(inter, 65), 1.0, torch.randn(M, 65), torch.randn(inter, 65), 1.0)))
    with pytest.raises(ValueError, match="gate_up S_g: expected .* r <= 64"):
        K.masked_gated_act_fwd(g, u, *args, down_a=A.bfloat16(), gate_up=wider)
    with pytest.raises(ValueError, match="gate_up B_u"):  # not A_d's dtype
        K.masked_gated_act_fwd(g, u, *args, down_a=A, gate_up=K.GateUpLora(gu.s_g, gu.b_g, 1.0, gu.s_u, gu.b_u.bfloat16(), 1.0))
    with pytest.raises(ValueError, match="gate_up B_g"):  # strided columns: the kernel reads unit-stride rows
        K.masked_gated_act_fwd(g, u, *args, down_a=A, gate_up=K.GateUpLora(gu.s_g, gu.b_g.t().contiguous().t(), 1.0,
                                                                              gu.s_u, gu.b_u, 1.0))
    # written in place, so never copied: rows 68 elements apart (not 16-byte aligned) are refused
    pad = torch.randn(M, inter + 4).bfloat16()[:, :inter]
    with pytest.raises(ValueError, match="written in place"):
        K.masked_gated_act_fwd(pad, u, *args, down_a=A, gate_up=gu)
    assert not K.gate_up_supported(g.t().contiguous().t(), u)
    # B's rows move 8 ranks per 16-byte load: other ranks and unaligned B rows keep the separate expands
    odd = K.GateUpLora(torch.randn(M, 12), torch.randn(inter, 12), 1.0, torch.randn(M, 12), torch.randn(inter, 12), 1.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        K.masked_gated_act_fwd(g, u, *args, down_a=A, gate_up=odd)
    assert not K.gate_up_supported(g, u, odd)
    shifted = torch.randn(inter * 8 + 1)[1:].view(inter, 8)  # 4 bytes past a 16-byte boundary
    wide_rows = torch.randn(inter, 12)[:, :8]  # rows 48 bytes apart: aligned bytes, but not 8 elements apart
    for b in (shifted, wide_rows):
        with pytest.raises(ValueError, match="gate_up B_u: expected 16-byte aligned rows"):
            K.masked_gated_act_fwd(g, u, *args, down_a=A, gate_up=K.GateUpLora(gu.s_g, gu.b_g, 1.0, gu.s_u, b, 1.0))
        assert not K.gate_up_supported(g, u, K.GateUpLora(gu.s_g, gu.b_g, 1.0, gu.s_u, b, 1.0))
    assert K.gate_up_supported(g, u, gu)
    with pytest.raises(ValueError, match="gate_up S_g: expected device"):
        K.masked_gated_act_fwd(g, u, *args, down_a=A, gate_up=K.GateUpLora(gu.s_g.to("meta"), gu.b_g, 1.0, gu.s_u,
                                                                              gu.b_u, 1.0))


@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_gate_up", [False, True])
def test_forward_takes_an_a_d_whose_rows_are_not_aligned(a_dtype, with_gate_up):
    """A_d at an offset that is not 16-byte aligned (a view), or with rows a stride apart that is not a
    multiple of 8: the tensor-core forward, whose column loop loads A_d in 16-byte groups only, gets an
    aligned copy; the same bits as with an aligned A_d (I = 256: the columns split, S_d as partials)."""
    M, inter, r = 40, 256, 8
    g, u, A, gu = _gate_up_case(M, inter, r, 8, torch.bfloat16, a_dtype)
    args = ("silu", 0.1, True, torch.tensor(4))
    shifted = torch.zeros(r * inter + 1, dtype=a_dtype)[1:].view(r, inter)
    padded = torch.zeros(r, inter + 4, dtype=a_dtype)[:, :inter]
    want = None
    for a in (A, shifted.copy_(A), padded.copy_(A)):
        g1, u1 = g.clone(), u.clone()
        got = K.masked_gated_act_fwd(g1, u1, *args, down_a=a, gate_up=gu if with_gate_up else None)
        got = (*got, g1, u1)
        if want is None:
            want = got
        for x, y in zip(got, want, strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.FUSED_GATE_UP])
@pytest.mark.parametrize("a_dtype,rank", [(torch.float32, 8), (torch.bfloat16, 8), (torch.float32, 40),
                                          (torch.bfloat16, 40), (torch.bfloat16, 12)])
def test_mlp_forward_takes_the_gate_up_expands_into_the_activation_pass(backend, calls, monkeypatch, layout, a_dtype,
                                                                       rank):
    """The MLP's forward adds the gate/up expands inside the activation pass (one lora_expand_ left: the
    down projection's) where every projection has LoRA of one dtype and rank <= 32; output and every
    gradient bit for bit those of the separate expands. Rank 40 keeps the separate expands with fp32 adapters
    and takes the fused ones with bf16 adapters (rank tile 64); rank 12 keeps them (B's rows are staged 8
    ranks per 16-byte load). I = 264: the
    forward splits its columns and the shrinks over I their K range (both in two on the CPU)."""
    w = test_ops.make_mlp(16, 264, layout, torch.bfloat16, adapter_dtype=a_dtype, rank=rank, dropout=0.1)

    def forward_and_grads():
        torch.manual_seed(0)
        x = torch.randn(70, 16, dtype=torch.bfloat16, requires_grad=True)
        y = ops.masked_gated_mlp(x, w, R.Activation.SILU, MaskSpec(0.2), torch.tensor(3), backend)
        n_expand = calls.count("transpeft_lora_expand")
        return n_expand, (y, *torch.autograd.grad(y, test_ops.leaves(x, w), torch.randn_like(y)))

    n_fused, fused = forward_and_grads()
    monkeypatch.setattr(cuda_backend.CudaBackend, "_fuses_gate_up_expands", lambda self, w: False)
    calls.clear()
    n_separate, separate = forward_and_grads()
    assert n_separate == 1 + len(w.inputs)
    assert n_fused == (1 if rank <= K.MAX_GATE_UP_RANK[a_dtype] and rank % K.GATE_UP_RANK_STEP == 0 else n_separate)
    for i, (a, b) in enumerate(zip(fused, separate, strict=True)):
        assert torch.equal(a, b), f"output {i}"


@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.FUSED_GATE_UP])
def test_mlp_forward_gate_up_expands_take_a_strided_b(backend, calls, monkeypatch, layout):
    """A LoRA B with strided columns (a transposed view; lora_expand_ takes any strides) still takes the fused
    forward (the kernel reads B's rows with unit stride: the backend passes a copy), the same bits as the
    separate expands."""
    w = test_ops.make_mlp(16, 64, layout, torch.bfloat16, adapter_dtype=torch.float32, rank=8, dropout=0.1)
    inputs = tuple(lin.with_tensors(lin.weight, lin.bias, lin.lora.A, lin.lora.B.t().contiguous().t())
                   for lin in w.inputs)
    assert all(lin.lora.B.stride(1) != 1 for lin in inputs)
    w = GatedMLPWeights(inputs, w.down)
    x = torch.randn(40, 16, dtype=torch.bfloat16)
    fused = ops.masked_gated_mlp(x, w, R.Activation.SILU, MaskSpec(0.2), torch.tensor(3), backend)
    assert calls.count("transpeft_lora_expand") == 1
    monkeypatch.setattr(cuda_backend.CudaBackend, "_fuses_gate_up_expands", lambda self, w: False)
    assert torch.equal(fused, ops.masked_gated_mlp(x, w, R.Activation.SILU, MaskSpec(0.2), torch.tensor(3), backend))


@pytest.mark.parametrize("x_dtype,l_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32)])
@pytest.mark.parametrize("M,N,r,q", [(45, 72, 5, 0.0), (70, 100, 16, 0.1), (33, 136, 40, 0.2), (3, 5, 64, 0.0)])
def test_token_reduce_against_float64(x_dtype, l_dtype, M, N, r, q, calls):
    """s l^T dropout_q(cast_A(x)) within the rounding of its M-long sum (tf32x3 with fp32 adapters), the
    mask bit for bit the reference's; ragged M (partial 32-row steps), N (partial 64-column tiles; N % 8
    != 0 takes the unpacked load) and rank tiles 16, 64."""
    l, x = torch.randn(M, r).to(l_dtype), torch.randn(M, N).to(x_dtype)
    seed = torch.tensor(17)
    drop = K.Dropout(q, seed) if q > 0 else None
    got = K.lora_token_reduce(l, x, 0.5, drop, splits=2)
    assert calls == ["transpeft_lora_token_reduce"] and got.dtype == l_dtype and got.shape == (r, N)
    xd = x.to(l_dtype) * (dropout_multiplier(seed, x.to(l_dtype), q) if q > 0 else 1)
    exact = (l.double().t() @ xd.double()) * 0.5
    assert_close_to_exact(got, exact, l_dtype, M, "token_reduce", tf32x3_depth=_tf32x3(l_dtype, M))


def test_token_reduce_unaligned_rows_and_any_split_count():
    """Rows 20 elements apart (not 16-byte aligned: the unpacked load) give the packed result; splits change
    only the fp32 summation order."""
    M, N, r = 100, 16, 8
    l, wide = torch.randn(M, r), torch.randn(M, 20).bfloat16()
    x = wide[:, :N]
    ref = K.lora_token_reduce(l, x.contiguous(), 2.0, splits=1)
    exact = (l.double().t() @ x.double()) * 2.0
    for splits in (1, 3, 50):
        got = K.lora_token_reduce(l, x, 2.0, splits=splits)
        assert_close_to_exact(got, exact, torch.float32, M, "token_reduce", tf32x3_depth=M)
        assert_close_to_exact(got, ref.double(), torch.float32, 2 * M, "token_reduce", tf32x3_depth=2 * M)


def test_token_reduce_refuses_what_it_does_not_take():
    x = torch.randn(4, 8).bfloat16()
    with pytest.raises(ValueError, match="R <= 64"):
        K.lora_token_reduce(torch.randn(4, 65), x, 1.0)
    with pytest.raises(ValueError, match="16-bit adapter dtype must be x's"):
        K.lora_token_reduce(torch.randn(4, 2).half(), x, 1.0)
    with pytest.raises(ValueError, match="splits: expected a positive count"):
        K.lora_token_reduce(torch.randn(4, 2), x, 1.0, splits=0)


@pytest.mark.parametrize("y_dtype,l_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.float32, torch.float32),
                                             (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("M,N,r,pad", [(45, 72, 5, 0), (70, 136, 40, 0), (33, 64, 64, 0), (300, 64, 8, 0),
                                       (37, 52, 16, 0), (40, 48, 8, 4)])
def test_expand_against_float64(y_dtype, l_dtype, grad, M, N, r, pad, calls):
    """y += s D(S b^T) in place, with the reference's roundings: within the rounding of the output and
    the adapter-dtype term (z's rank-long sum tf32x3 with fp32 adapters). N % 8 == 0 with aligned rows
    runs the tensor-core expand (300 rows: a block's 128-row span and two more); N = 52 and rows padded
    to 52 elements (not 16-byte aligned) the earlier per-column kernel. b is a transposed view (strides (1, N)), as for dX = ... + s D(t A)."""
    y0 = torch.randn(M, N + pad).to(y_dtype)
    y = y0[:, :N]
    S, A = torch.randn(M, r).to(l_dtype), (torch.randn(r, N) * 0.5).to(l_dtype)
    seed = torch.tensor(31)
    drop = K.Dropout(0.2, seed) if grad else None
    want_base = y.double().clone()
    got = K.lora_expand_(y, S, A.t(), 0.75, grad=grad, drop=drop)
    assert got.data_ptr() == y.data_ptr() and calls == ["transpeft_lora_expand"]
    term = (S.double() @ A.double()) * 0.75
    if grad:
        term = term * dropout_multiplier(seed, torch.empty(M, N, dtype=l_dtype), 0.2).double()
    exact = want_base + term
    scale = max(want_base.abs().max().item(), term.abs().max().item())
    # the rank-long fp32 sum (tf32x3 products with fp32 adapters), then the roundings of the chain:
    # TL(z), TL(. * s) [, TL(. * d), T(term)], T(y + term)
    allowed = floor(torch.float32, r, scale, roundings=0, tf32x3_depth=_tf32x3(l_dtype, r)) \
        + ((3 if grad else 2) * UNIT_ROUNDOFF[l_dtype] + (2 if grad else 1) * UNIT_ROUNDOFF[y_dtype]) * scale
    err = (got.double() - exact).abs().max().item()
    assert err <= allowed, (err, allowed)


@pytest.mark.parametrize("x_dtype,a_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.float32, torch.float32),
                                             (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("M,width,r,q,layout", [(45, 72, 5, 0.0, "rows"), (70, 136, 40, 0.1, "rows"),
                                            (20, 100, 64, 0.2, "rows"), (33, 64, 16, 0.0, "b_transposed"),
                                            (17, 40, 8, 0.1, "padded"), (9, 24, 3, 0.0, "strided")])
def test_shrink_against_float64(x_dtype, a_dtype, M, width, r, q, layout, calls):
    """S = dropout_q(cast_A(x)) a^T within the rounding of its K-long sum (tf32x3 with fp32 adapters),
    the mask bit for bit the reference's. Tensor-core shrink: rows (64-row blocks, partial 64-column
    steps; K of 4 steps or more split in two here), K % 8 != 0 (the unpacked load), a given as B^T's
    transposed view (t = dY B), rows padded to 40 + 4 elements (unaligned); x with column stride 2: the
    earlier kernel."""
    x = torch.randn(M, width + (4 if layout == "padded" else 0)).to(x_dtype)[:, :width]
    if layout == "strided":
        x = torch.randn(M, 2 * width).to(x_dtype)[:, ::2]
    a = (torch.randn(width, r).to(a_dtype).t() if layout == "b_transposed" else torch.randn(r, width).to(a_dtype))
    seed = torch.tensor(44)
    drop = K.Dropout(q, seed) if q > 0 else None
    got = K.lora_shrink(x, a, drop)
    assert calls == ["transpeft_lora_shrink"] and got.dtype == a_dtype and got.shape == (M, r)
    xd = x.to(a_dtype) * (dropout_multiplier(seed, x.to(a_dtype), q) if q > 0 else 1)
    assert_close_to_exact(got, xd.double() @ a.double().t(), a_dtype, width, "S", tf32x3_depth=_tf32x3(a_dtype, width))


@pytest.mark.parametrize("q", [0.0, 0.2])
def test_shrink_splits_change_only_the_summation_order(calls, q):
    """Any split of K (fp32 partials summed by the wrapper in a fixed order) within the rounding of the
    K-long sum, with dropout too (a bf16 x under fp32 adapters: the mask selects and every partial takes
    the dropout's scale); x with strided columns takes the earlier kernel, unsplit whatever the count; a
    count below 1 is refused. 150 rows: two blocks of 64 and a partial third."""
    M, width, r = 150, 520, 24
    x, a = torch.randn(M, width).bfloat16(), torch.randn(r, width)
    seed = torch.tensor(45)
    drop = K.Dropout(q, seed) if q > 0 else None
    xd = x.float() * (dropout_multiplier(seed, x.float(), q) if q > 0 else 1)
    exact = xd.double() @ a.double().t()
    for splits in (1, 2, 3, 9, 100):
        got = K.lora_shrink(x, a, drop, splits=splits)
        assert_close_to_exact(got, exact, torch.float32, width, f"S, {splits} splits", tf32x3_depth=width)
    assert calls == ["transpeft_lora_shrink"] * 5
    strided = torch.randn(M, 2 * width).bfloat16()[:, ::2]
    assert_close_to_exact(K.lora_shrink(strided, a, splits=4), strided.double() @ a.double().t(), torch.float32,
                          width, "S, strided x")
    with pytest.raises(ValueError, match="splits: expected a positive count"):
        K.lora_shrink(x, a, splits=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_alpha_mm_is_the_scaled_product_with_one_rounding(dtype):
    """cuda_backend._alpha_mm (the ATen dA / dB of the cuda backend): alpha (a @ b) within one rounding of
    the float64 product for a depth-k sum, from a transposed operand too; k = 0 gives zeros, m = 0 an empty
    result. Runs the same ATen call on any device (no kernel of ours)."""
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(37, 19, generator=gen).to(dtype), torch.randn(37, 23, generator=gen).to(dtype)
    got = cuda_backend._alpha_mm(a.t(), b, 0.375)
    assert got.dtype == dtype and got.shape == (19, 23)
    assert_close_to_exact(got, 0.375 * (a.t().double() @ b.double()), dtype, 37, "alpha_mm")
    assert torch.equal(cuda_backend._alpha_mm(a[:0].t(), b[:0], 2.0), torch.zeros(19, 23, dtype=dtype))
    assert cuda_backend._alpha_mm(a[:, :0].t(), b, 2.0).shape == (0, 23)
