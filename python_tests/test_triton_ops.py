"""What is particular to the "triton" backend (interpreter on CPU; compiled on a GPU). The op-level
numerics against the reference run for every backend in test_ops.py."""
import contextlib

import pytest
import torch

pytest.importorskip("triton")

from budget import assert_within_budget  # noqa: E402
from helpers import pretend_triton_arch  # noqa: E402
from test_ops import CASES as OPS_CASES, assert_matches, leaves, make_linear, make_mlp, to64  # noqa: E402
from transpeft_kernels import ops, reference as R  # noqa: E402
from transpeft_kernels.ops.triton_backend import TritonBackend  # noqa: E402
from transpeft_kernels.specs import GatedMLPWeights, Layout, LinearWeights, MaskSpec  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKEND = ops.resolve("triton", DEV)
pytestmark = pytest.mark.usefixtures("on_accelerator")  # op tensors on the GPU when there is one


def test_resolve_gives_the_triton_backend():
    assert isinstance(BACKEND, TritonBackend)
    # "auto" never picks the (slow) interpreter for CPU tensors
    assert ops.resolve("auto", torch.device("cpu")).name == "torch"
    assert ops.resolve("auto", torch.device("cuda")).name == "triton"


# ---- lora_linear ---------------------------------------------------------------------------------
def test_lora_linear_noncontiguous_input_and_no_lora():
    lin = make_linear(16, 21, torch.float32, rank=5, dropout=0.3, bias=True)
    x = torch.randn(16, 10).t().requires_grad_()  # (10, 16), column-major
    seed = torch.tensor(5)
    assert_matches(lambda x, w: ops.lora_linear(x, w, seed, BACKEND), lambda x, w: R.lora_linear(x, w, seed), x, lin, torch.float32)
    plain = make_linear(16, 8, torch.float32, lora=False, bias=True, train_base=True)
    assert_matches(lambda x, w: ops.lora_linear(x, w, None, BACKEND), lambda x, w: R.lora_linear(x, w), x, plain, torch.float32)


def test_lora_linear_dropout_pattern_matches_reference():
    # The dropped input regenerated in backward (dA) equals the forward's: with B = identity and
    # dy = ones, dA = s * t^T dropout(x) has the reference's exact zero columns per rank row.
    lin = make_linear(12, 6, torch.float32, rank=6, dropout=0.5)
    seed = torch.tensor(123)
    x = (1 + torch.rand(4, 12)).requires_grad_()
    ours = ops.lora_linear(x, lin, seed, BACKEND)
    ref = R.lora_linear(x, lin, seed)
    lin64 = to64(lin)
    exact = R.lora_linear(x.detach().double(), lin64, seed)
    # fp32 adapters: the shrink's 12 and the expand's 6 products are tf32x3 (budget.py)
    assert_within_budget(ours, ref, exact, torch.float32, 12 + 6 + 16, "y", tf32x3_depth=12 + 6)
    ga = torch.autograd.grad(ours.sum(), lin.lora.A)[0]
    gr = torch.autograd.grad(ref.sum(), lin.lora.A)[0]
    g64 = torch.autograd.grad(exact.sum(), lin64.lora.A)[0]
    assert torch.equal(ga == 0, g64 == 0)  # the same dropped columns per rank row
    assert_within_budget(ga, gr, g64, torch.float32, 4 + 6 + 16, "dA", tf32x3_depth=4 + 6)


# ---- masked gated MLP ----------------------------------------------------------------------------
def test_masked_gated_act_mask_bit_equal_and_matches_torch_backend():
    g, u = torch.randn(30, 57, requires_grad=True), torch.randn(30, 57, requires_grad=True)
    seed, mask = torch.tensor(12), MaskSpec(0.3)
    h = ops.masked_gated_act(g, u, R.Activation.SILU, mask, seed, BACKEND)
    h_ref = ops.masked_gated_act(g, u, R.Activation.SILU, mask, seed, ops.resolve("torch", DEV))
    assert torch.equal(h == 0, h_ref == 0)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    h64 = R.knowledge_mask(R.act(g64, R.Activation.SILU) * u64, mask, seed)
    assert_within_budget(h, h_ref, h64, torch.float32, 16, "h")
    dh = torch.randn_like(h)
    grads = zip(("dg", "du"), torch.autograd.grad(h, (g, u), dh), torch.autograd.grad(h_ref, (g, u), dh),
                torch.autograd.grad(h64, (g64, u64), dh.double()))
    for name, a, b, e in grads:
        assert_within_budget(a, b, e, torch.float32, 16, name)


def test_second_backward_gives_the_same_gradients_and_inputs_are_untouched():
    w = make_mlp(16, 24, Layout.FUSED_GATE_UP, torch.float32, dropout=0.1, bias=True)
    x = torch.randn(5, 16, requires_grad=True)
    y = ops.masked_gated_mlp(x, w, R.Activation.SILU, MaskSpec(0.2), torch.tensor(3), BACKEND)
    dy = torch.randn_like(y)
    dy_copy = dy.clone()
    first = torch.autograd.grad(y, leaves(x, w), dy, retain_graph=True)
    second = torch.autograd.grad(y, leaves(x, w), dy)
    assert torch.equal(dy, dy_copy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _with_lora_on(w, on):
    """The MLP weights with LoRA kept only on the projections flagged in ``on`` (projections order)."""
    from transpeft_kernels.specs import GatedMLPWeights, LinearWeights

    lins = [p if keep else LinearWeights(p.weight, p.bias) for p, keep in zip(w.projections, on)]
    return GatedMLPWeights(tuple(lins[:-1]), lins[-1])


MLP_BWD_CASES = [  # layout, LoRA on (gate, up, down) or (gate_up, down), rank, one pass expected
    (Layout.SPLIT, (True, False, True), 5, True),
    (Layout.SPLIT, (False, True, False), 40, True),     # rank > 32: t left to lora_shrink
    (Layout.SPLIT, (False, False, True), 8, True),
    (Layout.SPLIT, (False, False, False), 8, True),
    (Layout.FUSED_GATE_UP, (True, False), 3, True),
    (Layout.FUSED_GATE_UP, (False, True), 64, True),
    (Layout.SPLIT, (True, True, True), 65, False),      # rank above the pass's accumulators
]


@pytest.fixture
def one_pass(monkeypatch):
    from transpeft_kernels.ops.triton_backend import ONE_PASS_ENV

    monkeypatch.setenv(ONE_PASS_ENV, "1")


@pytest.mark.parametrize("layout,on,rank,one_pass", MLP_BWD_CASES)
def test_masked_gated_mlp_backward_in_one_pass(layout, on, rank, one_pass, monkeypatch):
    """With the one pass on, the backward runs act_bwd_lora (never the separate activation backward)
    whatever subset of projections has LoRA, and matches the reference and float64; above the pass's
    rank it falls back."""
    from transpeft_kernels.ops.triton_backend import ONE_PASS_ENV

    monkeypatch.setenv(ONE_PASS_ENV, "1")
    calls = {"one_pass": 0, "act_bwd": 0}
    for name, key in (("act_bwd_lora", "one_pass"), ("masked_gated_act_bwd", "act_bwd")):
        real = getattr(BACKEND._k, name)
        monkeypatch.setattr(BACKEND._k, name, lambda *a, _r=real, _k=key, **kw: calls.__setitem__(_k, calls[_k] + 1) or _r(*a, **kw))
    w = _with_lora_on(make_mlp(20, 44, layout, torch.bfloat16, adapter_dtype=torch.float32, rank=rank, dropout=0.1), on)
    x = torch.randn(2, 9, 20, dtype=torch.bfloat16, requires_grad=True)
    seed, mask = torch.tensor(8), MaskSpec(0.2, rescale=True)
    assert_matches(lambda x, w: ops.masked_gated_mlp(x, w, R.Activation.GELU, mask, seed, BACKEND),
                   lambda x, w: R.gated_mlp(x, w, R.Activation.GELU, mask, seed), x, w, torch.bfloat16)
    assert calls == ({"one_pass": 1, "act_bwd": 0} if one_pass else {"one_pass": 0, "act_bwd": 1})


@pytest.mark.usefixtures("one_pass")
@pytest.mark.parametrize("layout,activation,mask", OPS_CASES)
def test_masked_gated_mlp_one_pass_matches_reference(layout, activation, mask):
    w = make_mlp(24, 40, layout, torch.float32, rank=3, dropout=0.1, bias=True)
    x = torch.randn(2, 9, 24, requires_grad=True)
    seed = torch.tensor(2024)
    assert_matches(lambda x, w: ops.masked_gated_mlp(x, w, activation, mask, seed, BACKEND),
                   lambda x, w: R.gated_mlp(x, w, activation, mask, seed), x, w, torch.float32)


@pytest.mark.usefixtures("one_pass")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, None])
@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.FUSED_GATE_UP])
def test_masked_gated_mlp_one_pass_low_precision(dtype, adapter_dtype, layout):
    w = make_mlp(40, 72, layout, dtype, adapter_dtype=adapter_dtype, rank=8, dropout=0.05)
    x = torch.randn(3, 11, 40, dtype=dtype, requires_grad=True)
    seed, mask = torch.tensor(5), MaskSpec(0.1)
    assert_matches(lambda x, w: ops.masked_gated_mlp(x, w, R.Activation.SILU, mask, seed, BACKEND),
                   lambda x, w: R.gated_mlp(x, w, R.Activation.SILU, mask, seed), x, w, dtype)


@pytest.mark.parametrize("setting,used", [(None, True), ("1", True), ("0", False)])
def test_one_pass_is_on_by_default_and_0_turns_it_off(setting, used, monkeypatch):
    from transpeft_kernels.ops.triton_backend import ONE_PASS_ENV

    if setting is None:
        monkeypatch.delenv(ONE_PASS_ENV, raising=False)
    else:
        monkeypatch.setenv(ONE_PASS_ENV, setting)
    calls = []
    real = BACKEND._k.act_bwd_lora
    monkeypatch.setattr(BACKEND._k, "act_bwd_lora", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    w = make_mlp(16, 24, Layout.SPLIT, torch.float32, rank=4, dropout=0.1)
    x = torch.randn(7, 16, requires_grad=True)
    seed, mask = torch.tensor(1), MaskSpec(0.1)
    assert_matches(lambda x, w: ops.masked_gated_mlp(x, w, R.Activation.SILU, mask, seed, BACKEND),
                   lambda x, w: R.gated_mlp(x, w, R.Activation.SILU, mask, seed), x, w, torch.float32)
    assert bool(calls) == used


@pytest.mark.usefixtures("one_pass")
@pytest.mark.parametrize("adapter_dtype,ranks,setting,base,arch,folded", [
    (None, (8, 8, 8), None, "cublas", None, True), (None, (32, 32, 32), None, "cublas", "sm_80", True),
    (None, (8, 8, 8), "0", "cublas", None, False), (None, (40, 40, 40), None, "cublas", "sm_80", False),
    (None, (64, 64, 16), None, "cublas", "sm_80", False), (None, (64, 64, 16), None, "cublas", "sm_90", True),
    (None, (40, 40, 40), None, "cublas", "sm_90", True), (torch.float32, (8, 8, 8), None, "cublas", None, False),
    (None, (8, 8, 8), None, "triton", None, False)])
def test_dh_fold_for_16_bit_adapters_up_to_the_arch_rank(adapter_dtype, ranks, setting, base, arch, folded,
                                                         monkeypatch):
    """The down LoRA's term of dh' goes into the one pass (act_bwd_lora's down.a) with 16-bit adapters whose
    ranks (gate, up and down) are all within the architecture's FOLD_MAX_RANK (32 on sm_80, 64 on sm_90 and
    in the interpreter; ``arch``: a pretend one, its default configs run in the interpreter) and cuBLAS
    base GEMMs, unless TRANSPEFT_TRITON_FOLD_DH=0; folded, no expand writes it. Either way the reference's
    gradients."""
    with pretend_triton_arch(arch) if arch is not None else contextlib.nullcontext():
        _check_dh_fold(adapter_dtype, ranks, setting, base, folded, monkeypatch)


def _check_dh_fold(adapter_dtype, ranks, setting, base, folded, monkeypatch):
    from transpeft_kernels.ops.triton_backend import BASE_GEMM_ENV, FOLD_DH_ENV

    if setting is None:
        monkeypatch.delenv(FOLD_DH_ENV, raising=False)
    else:
        monkeypatch.setenv(FOLD_DH_ENV, setting)
    monkeypatch.setenv(BASE_GEMM_ENV, base)
    downs, expands = [], []
    real, real_into = BACKEND._k.act_bwd_lora, BACKEND._k.lora_expand_into
    monkeypatch.setattr(BACKEND._k, "act_bwd_lora", lambda *a, **kw: downs.append(kw["down"]) or real(*a, **kw))
    monkeypatch.setattr(BACKEND._k, "lora_expand_into",
                        lambda out, terms, *a, **kw: expands.append(out.shape) or real_into(out, terms, *a, **kw))
    lins = [make_linear(n_in, n_out, torch.bfloat16, adapter_dtype=adapter_dtype, rank=r, dropout=0.1)
            for (n_in, n_out), r in zip(((24, 40), (24, 40), (40, 24)), ranks)]
    w = GatedMLPWeights(tuple(lins[:2]), lins[2])
    x = torch.randn(3, 7, 24, dtype=torch.bfloat16, requires_grad=True)
    seed, mask = torch.tensor(12), MaskSpec(0.1)
    assert_matches(lambda x, w: ops.masked_gated_mlp(x, w, R.Activation.SILU, mask, seed, BACKEND),
                   lambda x, w: R.gated_mlp(x, w, R.Activation.SILU, mask, seed), x, w, torch.bfloat16)
    assert len(downs) == 1 and (downs[0].a is not None) == folded
    if base == "cublas":  # dh' (M, I) written by an expand exactly where it is not folded
        assert ((21, 40) in expands) == (not folded)


@pytest.mark.usefixtures("one_pass")
def test_masked_gated_mlp_trainable_down_base_falls_back_to_the_unfused_backward(monkeypatch):
    calls = []
    real = BACKEND._k.act_bwd_lora
    monkeypatch.setattr(BACKEND._k, "act_bwd_lora", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    w = make_mlp(16, 24, Layout.SPLIT, torch.float32, rank=4, bias=True, train_base=True)
    x = torch.randn(7, 16, requires_grad=True)
    seed, mask = torch.tensor(2), MaskSpec(0.3)
    assert_matches(lambda x, w: ops.masked_gated_mlp(x, w, R.Activation.SILU, mask, seed, BACKEND),
                   lambda x, w: R.gated_mlp(x, w, R.Activation.SILU, mask, seed), x, w, torch.float32)
    assert not calls  # dW_d needs h', which the one pass never writes


@pytest.mark.parametrize("base_gemm", ["cublas", "triton"])
@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.FUSED_GATE_UP])
def test_both_base_gemm_modes_match_reference(base_gemm, layout, monkeypatch):
    """The MLP (bias, dropout, mask, LoRA on every projection, a trainable base: dW, db too) and a LoRA
    linear with either base-GEMM mode, against the reference and float64."""
    from transpeft_kernels.ops.triton_backend import BASE_GEMM_ENV

    monkeypatch.setenv(BASE_GEMM_ENV, base_gemm)
    seed, mask = torch.tensor(6), MaskSpec(0.2, rescale=True)
    for train_base in (False, True):
        w = make_mlp(20, 36, layout, torch.bfloat16, adapter_dtype=torch.float32, rank=4, dropout=0.1, bias=True,
                     train_base=train_base)
        x = torch.randn(2, 7, 20, dtype=torch.bfloat16, requires_grad=True)
        assert_matches(lambda x, w: ops.masked_gated_mlp(x, w, R.Activation.SILU, mask, seed, BACKEND),
                       lambda x, w: R.gated_mlp(x, w, R.Activation.SILU, mask, seed), x, w, torch.bfloat16)
    lin = make_linear(24, 29, torch.float32, rank=6, dropout=0.2, bias=True, train_base=True)
    x = torch.randn(11, 24, requires_grad=True)
    assert_matches(lambda x, w: ops.lora_linear(x, w, seed, BACKEND), lambda x, w: R.lora_linear(x, w, seed),
                   x, lin, torch.float32)


@pytest.mark.usefixtures("one_pass")
@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.FUSED_GATE_UP])
def test_cublas_mode_writes_lora_terms_as_the_gemm_c_operand(layout, monkeypatch):
    """cuBLAS mode: every LoRA term reaches y, dh' and dX as the C operand of an addmm_ (lora_expand_into),
    never as a read-modify-write pass (lora_expand_add); the gate and up dX terms of the split layout in
    one launch with two terms; the bias in the forward's C; results against the reference and float64."""
    from transpeft_kernels.ops.triton_backend import BASE_GEMM_ENV

    monkeypatch.setenv(BASE_GEMM_ENV, "cublas")
    calls = []
    real_into = BACKEND._k.lora_expand_into
    monkeypatch.setattr(BACKEND._k, "lora_expand_into", lambda out, terms, bias=None: calls.append(
        (len(terms), bias is not None)) or real_into(out, terms, bias))
    monkeypatch.setattr(BACKEND._k, "lora_expand_add", lambda *a, **kw: pytest.fail("a read-modify-write expand"))
    w = make_mlp(20, 36, layout, torch.bfloat16, adapter_dtype=torch.float32, rank=4, dropout=0.1, bias=True)
    x = torch.randn(2, 7, 20, dtype=torch.bfloat16, requires_grad=True)
    seed, mask = torch.tensor(3), MaskSpec(0.2)
    assert_matches(lambda x, w: ops.masked_gated_mlp(x, w, R.Activation.SILU, mask, seed, BACKEND),
                   lambda x, w: R.gated_mlp(x, w, R.Activation.SILU, mask, seed), x, w, torch.bfloat16)
    # per fwd+bwd: the down forward (bias), dh', and dX (gate + up as two terms, or the fused projection)
    n_in = 2 if layout is Layout.SPLIT else 1
    assert calls and calls[:3] == [(1, True), (1, False), (n_in, False)], calls
    calls.clear()
    lin = make_linear(24, 29, torch.float32, rank=6, dropout=0.2, bias=True)
    xl = torch.randn(11, 24, requires_grad=True)
    assert_matches(lambda x, w: ops.lora_linear(x, w, seed, BACKEND), lambda x, w: R.lora_linear(x, w, seed),
                   xl, lin, torch.float32)
    assert calls[:2] == [(1, True), (1, False)], calls


@pytest.mark.usefixtures("one_pass")
def test_cublas_mode_mixed_adapter_dtypes_and_a_strided_bias(monkeypatch):
    """The gate/up dX terms in two adapter dtypes (they cannot share one expand launch: the chain of
    addmm_ and lora_expand_add instead), and a LoRA linear whose bias is a strided view: against the
    reference and float64."""
    from transpeft_kernels.ops.triton_backend import BASE_GEMM_ENV
    from transpeft_kernels.specs import GatedMLPWeights

    monkeypatch.setenv(BASE_GEMM_ENV, "cublas")
    w = make_mlp(20, 36, Layout.SPLIT, torch.bfloat16, adapter_dtype=torch.float32, rank=4, dropout=0.1)
    up = w.inputs[1]
    up = up.with_tensors(up.weight, up.bias, *(t.detach().to(torch.bfloat16).requires_grad_() for t in (up.lora.A, up.lora.B)))
    w = GatedMLPWeights((w.inputs[0], up), w.down)
    x = torch.randn(2, 7, 20, dtype=torch.bfloat16, requires_grad=True)
    seed, mask = torch.tensor(4), MaskSpec(0.2)
    calls = []
    real = BACKEND._k.lora_expand_add
    monkeypatch.setattr(BACKEND._k, "lora_expand_add", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert_matches(lambda x, w: ops.masked_gated_mlp(x, w, R.Activation.SILU, mask, seed, BACKEND),
                   lambda x, w: R.gated_mlp(x, w, R.Activation.SILU, mask, seed), x, w, torch.bfloat16)
    assert calls  # the second dtype's term, added after the first's C-operand product
    lin = make_linear(24, 29, torch.float32, rank=6, dropout=0.2)
    bias = torch.randn(29, 2)[:, 0]  # stride 2
    lin = LinearWeights(lin.weight, bias, lin.lora)
    xl = torch.randn(11, 24, requires_grad=True)
    assert_matches(lambda x, w: ops.lora_linear(x, w, seed, BACKEND), lambda x, w: R.lora_linear(x, w, seed),
                   xl, lin, torch.float32)


def test_base_gemm_setting_is_checked(monkeypatch):
    from transpeft_kernels.ops.triton_backend import BASE_GEMM_ENV, base_gemm

    monkeypatch.setenv(BASE_GEMM_ENV, "cutlass")
    with pytest.raises(ValueError, match="TRANSPEFT_TRITON_BASE_GEMM.*cublas, triton"):
        base_gemm()


# ---- patched tiny models: "triton" == "torch" ------------------------------------------------------
@pytest.mark.parametrize("base_gemm", ["cublas", "triton"])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_patched_model_triton_matches_torch(family, base_gemm, monkeypatch):
    import transpeft_kernels as tpk
    from helpers import assert_same_training_step, batch, lora_model, twin
    from transpeft_kernels.ops.triton_backend import BASE_GEMM_ENV

    monkeypatch.setenv(BASE_GEMM_ENV, base_gemm)
    # the MLP forward must run the masked activation fused: the LoRA expands and the activation in one
    # pass over the cuBLAS gate/up output, or the gate/up GEMM with them in its epilogue (phi3: fused layout)
    launches = []
    if base_gemm == "cublas":
        kernel = BACKEND._k.gate_up_lora_act
        monkeypatch.setattr(BACKEND._k, "gate_up_lora_act", lambda g, u, *a, **kw: launches.append(
            g.data_ptr() + g.shape[1] * g.element_size() == u.data_ptr()) or kernel(g, u, *a, **kw))
    else:
        kernel = BACKEND._k.gate_up_act
        monkeypatch.setattr(BACKEND._k, "gate_up_act",
                            lambda x, gate, up, *a, **kw: launches.append(up is None) or kernel(x, gate, up, *a, **kw))
    torch.set_default_device("cpu")  # models are built on CPU, then moved
    model = lora_model(family, lora_dropout=0.1).to(DEV)
    other = twin(model)
    tpk.patch(model, masking=0.2, dropping=0.3, backend="triton")
    tpk.patch(other, masking=0.2, dropping=0.3, backend="torch")
    for step_seed in (0, 1):  # two seeds: different dropping decisions and masks
        ids = batch(step_seed).to(DEV)
        assert_same_training_step(model, other, ids, seed=step_seed)
    assert launches and all(fused == (family == "phi3") for fused in launches)
