"""fp32 adapters' LoRA dots under torch's "high" fp32 matmul precision: one tf32 product per dot instead
of tf32x3 (kernels/triton/_common.fp32_lora_precision), interpreter on CPU, compiled on a GPU.

The float64 budgets (budget.TF32_ROUNDOFF) hold for tf32x3 too, so they cannot tell the two apart. What
does: a single tf32 product reads each fp32 operand with 10 mantissa bits, so it gives the same bits for
an operand and for that operand already truncated to 10 bits (``tf32``), and tf32x3 does not. Each test
runs a kernel on raw and on truncated fp32 LoRA operands (16-bit operands are exact in tf32 either way)
and asserts the same bits under "high" and different ones under "highest". Compiled on a GPU this also
checks what the kernels assume of the hardware (the interpreter truncates by hand): that a tf32 MMA reads
an fp32 register's top 19 bits and ignores the rest (benchmarks/gpu_triton_check.py runs this file)."""
import pytest
import torch

pytest.importorskip("triton")

from budget import TF32_ROUNDOFF, assert_close_to_exact  # noqa: E402
from conftest import NEW_FP32_PRECISION_API  # noqa: E402
from test_ops import assert_matches, make_linear, make_mlp, run  # noqa: E402
from transpeft_kernels import ops, reference as R  # noqa: E402
from transpeft_kernels.kernels import triton as K  # noqa: E402
from transpeft_kernels.kernels.env import restore_fp32_precision  # noqa: E402
from transpeft_kernels.kernels.triton import plans  # noqa: E402
from transpeft_kernels.kernels.triton._common import FP32, TF32, BF16, fp32_lora_precision, lora_code  # noqa: E402
from transpeft_kernels.specs import Layout, LinearWeights, LoraWeights, MaskSpec  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKEND = ops.resolve("triton", DEV)


def tf32(t):
    """An fp32 tensor's values truncated to tf32 (the low 13 mantissa bits cleared, as the MMA reads them);
    other dtypes as they are."""
    if t is None or t.dtype != torch.float32:
        return t
    return (t.contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32).reshape(t.shape)


def same_bits_only_under_tf32(fp32_matmul, run_kernel, raw, truncated):
    """``run_kernel(operands)`` gives a tuple of tensors: equal for raw and truncated fp32 operands under
    "high" (one tf32 product), not all equal under "highest" (tf32x3 reads the low bits)."""
    fp32_matmul("high")
    got = run_kernel(raw)
    assert all(torch.equal(a, b) for a, b in zip(got, run_kernel(truncated)))
    fp32_matmul("highest")
    assert not all(torch.equal(a, b) for a, b in zip(run_kernel(raw), run_kernel(truncated)))
    return got


SETTINGS = [
    ("torch default", lambda: None, "tf32x3"),
    ('set_float32_matmul_precision("high")', lambda: torch.set_float32_matmul_precision("high"), "tf32"),
    ('set_float32_matmul_precision("medium")', lambda: torch.set_float32_matmul_precision("medium"), "tf32"),
    ("cuda.matmul.allow_tf32 = True", lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True), "tf32"),
]
if NEW_FP32_PRECISION_API:
    SETTINGS += [
        ('backends.fp32_precision = "tf32"', lambda: setattr(torch.backends, "fp32_precision", "tf32"), "tf32"),
        ('cuda.matmul.fp32_precision = "tf32"', lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), "tf32"),
        ('"tf32" overall, "ieee" for CUDA matmuls', lambda: (setattr(torch.backends, "fp32_precision", "tf32"),
                                                            setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")), "tf32x3"),
    ]


@pytest.mark.parametrize("reader", ["fast getter", "attribute"])
@pytest.mark.parametrize("what,setting,want", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_precision_follows_torch(fp32_matmul, what, setting, want, reader, monkeypatch):
    from transpeft_kernels.kernels import env

    env.cuda_fp32_matmul_is_tf32()  # finds the fast getter where torch has one
    if reader == "attribute":
        monkeypatch.setattr(env, "_FP32_PRECISION_GETTER", None)
    elif env._FP32_PRECISION_GETTER is None:
        pytest.skip("this torch has no fast getter")
    restore_fp32_precision()  # torch's defaults
    setting()
    x32, x16 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bfloat16)
    assert fp32_lora_precision() == want
    assert lora_code(x32, "a") == (TF32 if want == "tf32" else FP32)
    assert lora_code(x16, "a") == BF16  # 16-bit adapters: their own dtype's dots whatever the setting
    assert plans.tuning_state()[-1] == want  # launch plans key on it


@pytest.mark.parametrize("what,setting,want", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_settings_are_restored_whole(fp32_matmul, what, setting, want):
    """cuda_fp32_matmul (the benchmark's and the model's TF32 cases) inside any user setting, and the test
    fixture: afterwards the setting is back as it was, and torch's older getters answer (a state where
    the two APIs disagree makes them raise, and with them every cuBLAS call)."""
    from transpeft_kernels.kernels.env import cuda_fp32_matmul, cuda_fp32_matmul_is_tf32, save_fp32_precision

    restore_fp32_precision()  # torch's defaults
    setting()
    before = save_fp32_precision()
    for mode in ("ieee", "tf32"):
        with cuda_fp32_matmul(mode):
            assert cuda_fp32_matmul_is_tf32() == (mode == "tf32")
            torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32  # noqa: B018 (must not raise)
        assert save_fp32_precision() == before and fp32_lora_precision() == want
    fp32_matmul("high")  # what the fixture restores afterwards: checked by the next test's getters


@pytest.mark.skipif(not NEW_FP32_PRECISION_API, reason="the newer API's inheritance (torch >= 2.9)")
def test_restoring_keeps_inherited_values_inherited(fp32_matmul):
    """After transformers' ``tf32=True`` (the generic value "tf32") a pass through cuda_fp32_matmul must
    not pin CUDA's matmuls to "tf32": a later generic "ieee" still reaches them."""
    from transpeft_kernels.kernels.env import cuda_fp32_matmul, cuda_fp32_matmul_is_tf32

    restore_fp32_precision()  # torch's defaults
    torch.backends.fp32_precision = "tf32"
    with cuda_fp32_matmul("ieee"):
        assert not cuda_fp32_matmul_is_tf32()
    assert cuda_fp32_matmul_is_tf32()
    torch.backends.fp32_precision = "ieee"
    assert not cuda_fp32_matmul_is_tf32() and fp32_lora_precision() == "tf32x3"


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_lora_shrink(fp32_matmul, x_dtype):
    M, Kd, r = 45, 77, 16
    x = torch.randn(M, Kd, device=DEV).to(x_dtype)
    A = torch.randn(r, Kd, device=DEV)
    s, = same_bits_only_under_tf32(fp32_matmul, lambda o: (K.lora_shrink(o[0], o[1], 0.0, None),), (x, A), (tf32(x), tf32(A)))
    exact = x.double().cpu() @ A.double().cpu().t()
    assert_close_to_exact(s.cpu(), exact, torch.float32, Kd, roundings=1, min_scale=1.0, tf32x3_depth=Kd,
                          product_roundoff=TF32_ROUNDOFF)
    # with dropout: the kept x / (1 - q) are products formed in the kernel, so only the budget applies
    fp32_matmul("high")
    key = torch.tensor(3)
    s = K.lora_shrink(x, A, 0.2, key)
    xd = x.double().cpu() * R.keep_mask(key, M, Kd, 0.2).double() / 0.8
    assert_close_to_exact(s.cpu(), xd @ A.double().cpu().t(), torch.float32, Kd, roundings=2, min_scale=1.0,
                          tf32x3_depth=Kd, product_roundoff=TF32_ROUNDOFF)


@pytest.mark.parametrize("p_dtype,q_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32)])
def test_token_reduce(fp32_matmul, p_dtype, q_dtype):
    """dA = s t^T x (fp32 t, 16-bit x), dB^T = s dY^T S (16-bit dY, fp32 S), both fp32; split over tokens."""
    T, A, B = 75, 5, 53
    p = torch.randn(T, A, device=DEV).to(p_dtype)
    q = torch.randn(T, B, device=DEV).to(q_dtype)
    out, = same_bits_only_under_tf32(
        fp32_matmul, lambda o: (K.token_reduce(o[0], o[1], torch.float32, torch.float32, 0.5, splits=2)[0],),
        (p, q), (tf32(p), tf32(q)))
    exact = 0.5 * p.double().cpu().t() @ q.double().cpu()
    assert_close_to_exact(out.cpu(), exact, torch.float32, T, min_scale=1.0, tf32x3_depth=T, product_roundoff=TF32_ROUNDOFF)


def test_token_reduce_of_base_weights_is_not_a_tf32_product(fp32_matmul):
    """dW of an fp32 base is not a LoRA dot: not a single tf32 product under "high" (IEEE fp32 whatever
    the setting, as the Triton GEMMs' base products; its SASS has no tensor-core fp32 instruction)."""
    fp32_matmul("high")
    p, q = torch.randn(40, 24, device=DEV), torch.randn(40, 16, device=DEV)
    dw, _ = K.token_reduce(p, q, torch.float32, torch.float32, lora=False)
    assert not torch.equal(dw, K.token_reduce(tf32(p), tf32(q), torch.float32, torch.float32, lora=False)[0])


def test_lora_expand_into_and_add(fp32_matmul):
    M, N, r = 37, 53, 16
    s, b = torch.randn(M, r, device=DEV), torch.randn(N, r, device=DEV) / 4
    y0 = torch.randn(M, N, device=DEV).to(torch.bfloat16)

    def expands(o):
        into = K.lora_expand_into(torch.empty_like(y0), (K.LoraTerm(o[0], o[1], 0.5),))
        return into, K.lora_expand_add(y0.clone(), o[0], o[1], 0.5, 0.0, None)

    into, added = same_bits_only_under_tf32(fp32_matmul, expands, (s, b), (tf32(s), tf32(b)))
    term = 0.5 * s.double().cpu() @ b.double().cpu().t()
    assert_close_to_exact(into.cpu(), term, torch.bfloat16, r, min_scale=1.0, tf32x3_depth=r, product_roundoff=TF32_ROUNDOFF)
    assert_close_to_exact(added.cpu(), y0.double().cpu() + term, torch.bfloat16, r, roundings=2, min_scale=1.0,
                          tf32x3_depth=r, product_roundoff=TF32_ROUNDOFF)


def test_gate_up_lora_act(fp32_matmul):
    M, I, r = 37, 70, 16
    gu = torch.randn(M, 2 * I, device=DEV).to(torch.bfloat16)
    sides = [(torch.randn(M, r, device=DEV), torch.randn(I, r, device=DEV) / 4) for _ in range(2)]
    key = torch.tensor(5)

    def gate_up(o):
        g, u = gu[:, :I].clone(), gu[:, I:].clone()
        h = K.gate_up_lora_act(g, u, K.ExpandSide(o[0], o[1], 1.25), K.ExpandSide(o[2], o[3], 1.25), "silu", 0.1,
                               False, key)
        return g, u, h

    flat = [t for side in sides for t in side]
    same_bits_only_under_tf32(fp32_matmul, gate_up, flat, [tf32(t) for t in flat])


def test_act_bwd_lora(fp32_matmul):
    """The gate/up dB (fp32 S against 16-bit dg, du) and the down dA_d (fp32 t_d against 16-bit h')."""
    M, I, r = 37, 100, 16
    g, u, dh = (torch.randn(M, I, device=DEV).to(torch.bfloat16) for _ in range(3))
    sg, su, td = (torch.randn(M, r, device=DEV) for _ in range(3))
    key = torch.tensor(321)

    def one_pass(o):
        res = K.act_bwd_lora(dh, g, u, "silu", 0.1, False, key, gate=K.LoraSide(o[0], 1.5), up=K.LoraSide(o[1], 1.5),
                             down=K.DownLora(o[2], 0.75), splits=2)
        return res.dg, res.du, res.dB_g, res.dB_u, res.dA_d

    res = same_bits_only_under_tf32(fp32_matmul, one_pass, (sg, su, td), (tf32(sg), tf32(su), tf32(td)))
    dg = res[0].double().cpu()
    assert_close_to_exact(res[2].cpu(), 1.5 * dg.t() @ sg.double().cpu(), torch.float32, M, min_scale=1.0,
                          tf32x3_depth=M, product_roundoff=TF32_ROUNDOFF)


def test_gemm_lora_expand(fp32_matmul):
    """The Triton GEMM (TRANSPEFT_TRITON_BASE_GEMM=triton): the LoRA rank steps in tf32, the bf16 base as is."""
    M, Kd, N, r = 45, 77, 53, 16
    x, w = torch.randn(M, Kd, device=DEV).to(torch.bfloat16), torch.randn(N, Kd, device=DEV).to(torch.bfloat16)
    s, b = torch.randn(M, r, device=DEV), torch.randn(N, r, device=DEV) / 4
    same_bits_only_under_tf32(fp32_matmul, lambda o: (K.gemm_lora_expand(x, w, None, o[0], o[1], 0.5),),
                              (s, b), (tf32(s), tf32(b)))


def _truncated_adapters(weights):
    """The same weights with every fp32 adapter matrix truncated to tf32 (fresh leaves)."""
    def lin(p):
        if p.lora is None:
            return p
        lo = p.lora
        return LinearWeights(p.weight, p.bias, LoraWeights(tf32(lo.A.detach()).requires_grad_(), tf32(lo.B.detach()).requires_grad_(),
                                                           lo.scaling, lo.dropout))
    if isinstance(weights, LinearWeights):
        return lin(weights)
    return type(weights)(tuple(lin(p) for p in weights.inputs), lin(weights.down))


@pytest.mark.usefixtures("on_accelerator")  # op tensors on the GPU when there is one (compiled kernels)
@pytest.mark.parametrize("base_gemm", ["cublas", "triton"])
@pytest.mark.parametrize("op", ["lora_linear", "gated_mlp"])
def test_ops_follow_the_precision(fp32_matmul, op, base_gemm, monkeypatch):
    """Under "high", PEFT's fp32 adapters over a bf16 base: the output and every gradient the same bits
    for raw and truncated adapters, where an adapter matrix is a dot operand (the shrink with A, the
    expands with B and, in dX, with A: one tf32 MMA each), and within the tf32 budget against the float64
    reference. dA and dB multiply S, t and gradients, which are the same bits either way: that their dots
    are single tf32 products too is checked at the kernel level above and, for the ops' launches, by
    test_perf_model.test_lora_dots_where_torch_allows_tf32 (one tf32 product per multiply-add)."""
    from transpeft_kernels.ops.triton_backend import BASE_GEMM_ENV

    monkeypatch.setenv(BASE_GEMM_ENV, base_gemm)
    seed, mask = torch.tensor(6), MaskSpec(0.2, rescale=True)
    if op == "lora_linear":
        w = make_linear(24, 29, torch.bfloat16, adapter_dtype=torch.float32, rank=8)
        fn = lambda x, w: ops.lora_linear(x, w, seed, BACKEND)  # noqa: E731
        ref = lambda x, w: R.lora_linear(x, w, seed)  # noqa: E731
    else:
        w = make_mlp(20, 36, Layout.SPLIT, torch.bfloat16, adapter_dtype=torch.float32, rank=8)
        fn = lambda x, w: ops.masked_gated_mlp(x, w, R.Activation.SILU, mask, seed, BACKEND)  # noqa: E731
        ref = lambda x, w: R.gated_mlp(x, w, R.Activation.SILU, mask, seed)  # noqa: E731
    x = torch.randn(2, 7, w.weight.shape[1] if op == "lora_linear" else 20, dtype=torch.bfloat16, requires_grad=True)
    wt = _truncated_adapters(w)
    dy = torch.randn_like(ref(x, w))

    def outputs(weights):
        y, grads = run(fn, x, weights, dy)
        return (y, *(g for g in grads if g is not None))

    fp32_matmul("high")
    assert all(torch.equal(a, b) for a, b in zip(outputs(w), outputs(wt)))
    assert_matches(fn, ref, x, w, torch.bfloat16, tf32x3=True, product_roundoff=TF32_ROUNDOFF)
    fp32_matmul("highest")
    assert not all(torch.equal(a, b) for a, b in zip(outputs(w), outputs(wt)))
