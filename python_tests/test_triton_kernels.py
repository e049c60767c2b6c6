"""Triton kernels one by one (interpreter on CPU; compiled on a GPU) against the reference and float64.

Each kernel is checked for: values against a float64 evaluation of the spec, ragged sizes (not
multiples of any tile, a single row), strided inputs, every I/O dtype, masks bit-equal to
reference.keep_mask, and sentinel-padded outputs (the interpreter does not detect out-of-bounds
writes, so outputs are written into views of a larger sentinel-filled buffer and the border is checked).
"""
import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from budget import assert_close_to_exact  # noqa: E402
from helpers import assert_act_at_extremes, pretend_triton_arch  # noqa: E402
from transpeft_kernels.kernels import triton as K  # noqa: E402  (conftest chose the interpreter first)
from transpeft_kernels.kernels.triton._common import philox_keep  # noqa: E402
from transpeft_kernels.reference import philox as P  # noqa: E402
from transpeft_kernels.reference.activations import Activation, act, act_grad  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SENTINEL = 1234.5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |err| allowed against float64, relative to the result's magnitude (one rounding of the output
# plus operands rounded to the dtype)


def seed(v):
    return torch.tensor(v, dtype=torch.int64)


def padded(shape, dtype, pad=(2, 3)):
    """(view of shape, buffer): the view sits inside a sentinel-filled buffer with a wider row stride."""
    buf = torch.full((shape[0] + 2 * pad[0], shape[1] + 2 * pad[1]), SENTINEL, dtype=dtype, device=DEV)
    return buf[pad[0]:pad[0] + shape[0], pad[1]:pad[1] + shape[1]], buf


def assert_border_intact(buf, pad=(2, 3)):
    inner = torch.zeros_like(buf, dtype=torch.bool)
    inner[pad[0]:buf.shape[0] - pad[0], pad[1]:buf.shape[1] - pad[1]] = True
    assert torch.all(buf[~inner] == SENTINEL), "kernel wrote outside its output"


def assert_close64(got, exact, dtype, depth=32, tf32x3_depth=0):
    """Against float64 within a pure rounding budget (budget.py): ``depth`` fp32 accumulations
    (``tf32x3_depth`` of them fed by the tf32x3 products of fp32 LoRA dots) and up to 4 roundings
    to ``dtype`` (inputs to a dot, an activation, a product, the store), relative to max(|exact|, 1)."""
    assert_close_to_exact(got.cpu(), exact.cpu(), dtype, depth, roundings=4, min_scale=1.0,
                          tf32x3_depth=tf32x3_depth)


def tf32x3_steps(dot_dtype, n):
    """The chain steps that run on tf32x3 products: the n products of an fp32 LoRA dot (budget.py)."""
    return n if dot_dtype == torch.float32 else 0


def strided(t):
    """The same values with a row stride wider than the row (not contiguous)."""
    buf = torch.empty(t.shape[0], t.shape[1] + 5, dtype=t.dtype, device=t.device)
    buf[:, : t.shape[1]] = t
    return buf[:, : t.shape[1]]


# ---- masked gated activation ----------------------------------------------------------------------
ACT_CASES = [(torch.float32, a, m) for a in Activation for m in (None, (0.3, False), (0.3, True))] + \
    [(dt, a, (0.2, True)) for dt in (torch.float16, torch.bfloat16) for a in Activation]


@pytest.mark.parametrize("dtype,activation,mask", ACT_CASES)
def test_masked_gated_act_forward_backward(dtype, activation, mask):
    M, I = 37, 70
    g = strided(torch.randn(M, I, device=DEV).to(dtype))
    u = torch.randn(M, I, device=DEV).to(dtype)
    dh = torch.randn(M, I, device=DEV).to(dtype)
    p, rescale = mask or (0.0, False)
    key = seed(321)
    h, hbuf = padded((M, I), dtype)
    K.masked_gated_act_fwd(g, u, activation.value, p, rescale, key if mask else None, out=h)
    dg, gbuf = padded((M, I), dtype)
    du, ubuf = padded((M, I), dtype)
    K.masked_gated_act_bwd(dh, g, u, activation.value, p, rescale, key if mask else None, out=(dg, du))
    for buf in (hbuf, gbuf, ubuf):
        assert_border_intact(buf)
    keep = P.keep_mask(key, M, I, p).double() if mask else torch.ones(M, I, dtype=torch.float64)
    c = 1.0 / (1.0 - p) if rescale else 1.0
    g64, u64, dh64 = g.double().cpu(), u.double().cpu(), dh.double().cpu()
    a64 = act(g64, activation)
    assert_close64(h, a64 * u64 * keep * c, dtype)
    assert_close64(dg, dh64 * keep * c * u64 * act_grad(g64, activation), dtype)
    assert_close64(du, dh64 * keep * c * a64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_gated_act_mask_is_bit_equal_to_reference(dtype):
    # act(g) * u is never zero for g, u in [1, 2): h == 0 exactly where the mask drops.
    M, I, p, key = 65, 129, 0.37, seed(2**40 + 11)
    g = (1 + torch.rand(M, I, device=DEV)).to(dtype)
    u = (1 + torch.rand(M, I, device=DEV)).to(dtype)
    h = K.masked_gated_act_fwd(g, u, "silu", p, False, key)
    dg, du = K.masked_gated_act_bwd(torch.ones_like(g), g, u, "silu", p, False, key)
    keep = P.keep_mask(key, M, I, p).to(DEV)
    assert torch.equal(h != 0, keep)
    assert torch.equal(dg != 0, keep) and torch.equal(du != 0, keep)


def test_masked_gated_act_single_row_and_empty():
    g, u = torch.randn(1, 5, device=DEV), torch.randn(1, 5, device=DEV)
    h = K.masked_gated_act_fwd(g, u, "gelu", 0.5, False, seed(3))
    assert torch.equal(h != 0, P.keep_mask(seed(3), 1, 5, 0.5).to(DEV) & (g != 0))
    assert K.masked_gated_act_fwd(g[:0], u[:0], "gelu", 0.5, False, seed(3)).shape == (0, 5)


def test_masked_gated_act_rejects_bad_arguments():
    g = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match="u"):
        K.masked_gated_act_fwd(g, torch.randn(4, 9, device=DEV), "silu", 0.0, False, None)
    with pytest.raises(ValueError, match="seed"):
        K.masked_gated_act_fwd(g, g, "silu", 0.1, False, None)
    with pytest.raises(TypeError, match="g"):
        K.masked_gated_act_fwd(g.double(), g.double(), "silu", 0.0, False, None)


@triton.jit(do_not_specialize=["threshold"])
def _keep_block(out_ptr, seed_ptr, row0, n_cols, threshold, R: tl.constexpr, C: tl.constexpr):
    rows = row0 + tl.arange(0, R)
    cols = tl.arange(0, C)
    keep = philox_keep(tl.load(seed_ptr), rows, 0, n_cols, threshold, C)
    tl.store(out_ptr + tl.arange(0, R)[:, None] * C + cols[None, :], keep.to(tl.int8))


def test_mask_offsets_past_2_31_are_int64():
    # Rows of a (2**28 + 9, 64) matrix: group offsets row * 8 + j // 8 pass 2**31, where int32 offsets
    # would wrap. Every kernel draws its mask through philox_keep, checked here at those rows.
    row0, I, key, p = 2**28 + 5, 64, seed(5), 0.5
    groups = torch.arange(row0, row0 + 4, dtype=torch.int64)[:, None] * (I // 8) + torch.arange(I // 8)[None, :]
    assert groups.min() > 2**31
    words = P.philox_randint4x(key, groups)
    lanes = torch.stack([(words[l // 2] >> (16 * (l % 2))) & 0xFFFF for l in range(8)], dim=-1).reshape(4, I)
    out = torch.zeros(4, I, dtype=torch.int8, device=DEV)
    _keep_block[(1,)](out, key.reshape(1).to(DEV), row0, I, P.keep_threshold(p), R=4, C=I)
    assert torch.equal(out.cpu().bool(), lanes >= P.keep_threshold(p))


# ---- LoRA shrink with fused dropout --------------------------------------------------------------
SHRINK_CASES = [
    (torch.float32, torch.float32, 1, 0.0), (torch.float32, torch.float32, 17, 0.25),
    (torch.bfloat16, torch.float32, 8, 0.1), (torch.bfloat16, torch.bfloat16, 64, 0.1),
    (torch.float16, torch.float32, 80, 0.05), (torch.float16, torch.float16, 3, 0.3),
    (torch.bfloat16, torch.float32, 256, 0.1),  # the largest supported rank
    (torch.bfloat16, torch.float32, 16, 0.0),  # 16-bit x under fp32 adapters: x exact in tf32, two MMAs
]


@pytest.mark.parametrize("dtype,adapter_dtype,rank,q", SHRINK_CASES)
def test_lora_shrink(dtype, adapter_dtype, rank, q):
    M, Kd = 45, 77
    x = torch.randn(Kd, M, device=DEV).to(dtype).t()  # column-major: not contiguous
    A = torch.randn(rank, Kd, device=DEV).to(adapter_dtype)
    key = seed(99)
    s, buf = padded((M, rank), adapter_dtype)
    K.lora_shrink(x, A, q, key if q else None, out=s)
    assert_border_intact(buf)
    xa = x.to(adapter_dtype).double().cpu()  # PEFT casts x to the adapter dtype first
    if q:
        xa = xa * P.keep_mask(key, M, Kd, q).double() / (1 - q)
    assert_close64(s, xa @ A.double().cpu().t(), adapter_dtype, tf32x3_depth=tf32x3_steps(adapter_dtype, Kd))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_shrink_dropout_mask_is_bit_equal_to_reference(dtype):
    # A = identity: S is the dropped input itself, zero exactly where the mask drops.
    M, Kd, q, key = 33, 48, 0.3, seed(7)
    x = (1 + torch.rand(M, Kd, device=DEV)).to(dtype)
    s = K.lora_shrink(x, torch.eye(Kd, device=DEV, dtype=dtype), q, key)
    assert torch.equal(s != 0, P.keep_mask(key, M, Kd, q).to(DEV))
    from transpeft_kernels.reference.lora import lora_dropout
    if dtype == torch.float32:
        # fp32 runs as tf32x3 on the tensor cores: one product x * 1 per output, within TF32X3_ROUNDOFF
        assert_close_to_exact(s, lora_dropout(x, q, key), dtype, 0, roundings=0, tf32x3_depth=1)
    else:
        torch.testing.assert_close(s, lora_dropout(x, q, key), atol=0, rtol=0)  # the same bits


# ---- base GEMM with the LoRA expand fused ---------------------------------------------------------
EXPAND_CASES = [
    (torch.float32, torch.float32, 1, True, 0.0), (torch.float32, torch.float32, 70, False, 0.2),
    (torch.bfloat16, torch.float32, 16, True, 0.0), (torch.bfloat16, torch.bfloat16, 5, True, 0.1),
    (torch.float16, torch.float32, 64, False, 0.0), (torch.float16, torch.float16, 9, True, 0.3),
    (torch.bfloat16, torch.float32, 256, True, 0.1),
]


@pytest.mark.parametrize("dtype,adapter_dtype,rank,bias,q", EXPAND_CASES)
@pytest.mark.parametrize("M", [1, 45])
def test_gemm_lora_expand(dtype, adapter_dtype, rank, bias, q, M):
    Kd, N = 77, 53
    x = strided(torch.randn(M, Kd, device=DEV).to(dtype))
    w = torch.randn(Kd, N, device=DEV).to(dtype).t()  # a transposed view, as the dX launch passes
    b = torch.randn(N, device=DEV).to(dtype) if bias else None
    s = torch.randn(M, rank, device=DEV).to(adapter_dtype)
    B = torch.randn(N, rank, device=DEV).to(adapter_dtype)
    key = seed(41)
    y, buf = padded((M, N), dtype)
    K.gemm_lora_expand(x, w, b, s, B, 0.5, q, key if q else None, out=y)
    assert_border_intact(buf)
    lora = s.double().cpu() @ B.double().cpu().t()
    if q:
        lora = lora * P.keep_mask(key, M, N, q).double() / (1 - q)
    exact = x.double().cpu() @ w.double().cpu().t() + 0.5 * lora
    if bias:
        exact = exact + b.double().cpu()
    assert_close64(y, exact, dtype, tf32x3_depth=tf32x3_steps(adapter_dtype, rank))


def test_gemm_without_lora_and_empty():
    x, w = torch.randn(19, 30, device=DEV), torch.randn(21, 30, device=DEV)
    assert_close64(K.gemm_lora_expand(x, w), x.double().cpu() @ w.double().cpu().t(), torch.float32)
    assert K.gemm_lora_expand(x[:0], w).shape == (0, 21)


def test_gemm_lora_expand_epilogue_mask_is_bit_equal_to_reference():
    # Zero base: y = s * D(S B^T); S, B > 0 so y == 0 exactly where the mask drops.
    M, N, Kd, r, q, key = 40, 70, 16, 4, 0.4, seed(2**33 + 1)
    y = K.gemm_lora_expand(torch.zeros(M, Kd, device=DEV), torch.zeros(N, Kd, device=DEV), None,
                           1 + torch.rand(M, r, device=DEV), 1 + torch.rand(N, r, device=DEV), 1.0, q, key)
    assert torch.equal(y != 0, P.keep_mask(key, M, N, q).to(DEV))


def test_gemm_lora_expand_rejects_bad_arguments():
    x, w = torch.randn(4, 8, device=DEV), torch.randn(6, 8, device=DEV)
    with pytest.raises(ValueError, match="w"):
        K.gemm_lora_expand(x, torch.randn(6, 7, device=DEV))
    with pytest.raises(TypeError, match="w"):
        K.gemm_lora_expand(x, w.half())
    with pytest.raises(ValueError, match="s, b"):
        K.gemm_lora_expand(x, w, None, torch.randn(4, 2, device=DEV), torch.randn(6, 3, device=DEV))
    with pytest.raises(ValueError, match="seed"):
        K.gemm_lora_expand(x, w, None, torch.randn(4, 2, device=DEV), torch.randn(6, 2, device=DEV), 1.0, 0.1)


# ---- token reductions (dW, db, dA, dB) -----------------------------------------------------------
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


# (p's dtype, q's dtype, dot dtype, ...): with fp32 dots, a 16-bit operand is exact in tf32 and skips its
# small-part product: p and q both (one MMA), q only (dA = t^T D(x) over a 16-bit base, its dropout
# scale applied to the sum), p only (dB = dY^T S)
@pytest.mark.parametrize("dtype,q_dtype,dot_dtype,q,splits,transpose", [
    (FP32, FP32, FP32, 0.0, 1, False), (FP32, FP32, FP32, 0.2, 3, True),
    (BF16, BF16, FP32, 0.1, 1, False), (BF16, BF16, BF16, 0.0, 2, False),
    (FP16, FP16, FP16, 0.3, 1, True), (FP16, FP16, FP32, 0.0, 4, False),
    (FP32, BF16, FP32, 0.1, 2, False), (FP32, FP16, FP32, 0.3, 1, True), (FP32, BF16, FP32, 0.0, 1, False),
    (BF16, FP32, FP32, 0.0, 3, False), (FP16, FP32, FP32, 0.0, 1, True),
])
def test_token_reduce(dtype, q_dtype, dot_dtype, q, splits, transpose):
    T, A, B = 75, 5, 53
    p = strided(torch.randn(T, A, device=DEV).to(dtype))
    qm = torch.randn(B, T, device=DEV).to(q_dtype).t()
    key = seed(12)
    shape = (B, A) if transpose else (A, B)
    out, buf = padded(shape, dot_dtype)
    _, colsum = K.token_reduce(p, qm, dot_dtype, dot_dtype, 0.5, q, key if q else None,
                               colsum_dtype=dtype, transpose_out=transpose, splits=splits, out=out)
    assert_border_intact(buf)
    qd = qm.to(dot_dtype).double().cpu()
    if q:
        qd = qd * P.keep_mask(key, T, B, q).double() / (1 - q)
    exact = 0.5 * p.to(dot_dtype).double().cpu().t() @ qd
    assert_close64(out, exact.t() if transpose else exact, dot_dtype, tf32x3_depth=tf32x3_steps(dot_dtype, T))
    assert_close64(colsum, p.double().cpu().sum(0), dtype)


def test_token_reduce_splits_agree_and_are_deterministic():
    p, q = torch.randn(200, 24, device=DEV), torch.randn(200, 40, device=DEV)
    one, _ = K.token_reduce(p, q, torch.float32, torch.float32, splits=1)
    for n in (2, 5):
        a, _ = K.token_reduce(p, q, torch.float32, torch.float32, splits=n)
        b, _ = K.token_reduce(p, q, torch.float32, torch.float32, splits=n)
        assert torch.equal(a, b)
        assert_close64(a, p.double().cpu().t() @ q.double().cpu(), torch.float32, depth=200, tf32x3_depth=200)


@pytest.mark.parametrize("activation", list(Activation))
def test_masked_act_at_extreme_inputs(activation):
    assert_act_at_extremes(
        lambda g, u: K.masked_gated_act_fwd(g.to(DEV), u.to(DEV), activation.value, 0.0, False, None),
        lambda dh, g, u: K.masked_gated_act_bwd(dh.to(DEV), g.to(DEV), u.to(DEV), activation.value, 0.0, False, None),
        activation)


# ---- one-pass activation backward with the LoRA partials (act_bwd_lora) ----------------------------
def _side(M, r, adt):
    return K.LoraSide(torch.randn(M, r, device=DEV).to(adt), 1.5)


ACT_BWD_LORA_CASES = [
    # dtype, adapter dtype, activation, mask, (r_g, r_u, r_d), q_d, shared S (fused layout), splits
    (torch.float32, torch.float32, Activation.SILU, (0.3, True), (5, 5, 3), 0.2, False, 1),
    (torch.bfloat16, torch.float32, Activation.GELU_TANH, (0.1, False), (16, 16, 16), 0.1, False, 3),
    (torch.bfloat16, torch.bfloat16, Activation.GELU, None, (8, 8, 8), 0.0, True, 2),
    (torch.float16, torch.float16, Activation.SILU, (0.2, True), (1, 0, 0), 0.0, False, 1),
    (torch.float16, torch.float32, Activation.SILU, None, (0, 0, 7), 0.3, False, 2),
    (torch.bfloat16, torch.bfloat16, Activation.SILU, (0.1, False), (4, 4, 0), 0.0, True, 1),
    (torch.float32, torch.float32, Activation.GELU, (0.1, True), (40, 40, 64), 0.05, True, 2),
    (torch.bfloat16, torch.float32, Activation.SILU, (0.1, False), (0, 33, 2), 0.1, False, 1),
    (torch.bfloat16, torch.bfloat16, Activation.GELU, (0.1, True), (64, 64, 64), 0.1, False, 2),
]


@pytest.mark.parametrize("dtype,adt,activation,mask,ranks,q,shared,splits", ACT_BWD_LORA_CASES)
def test_act_bwd_lora(dtype, adt, activation, mask, ranks, q, shared, splits):
    """dg, du bit-equal to masked_gated_act_bwd; dB and dA against float64 products of the same rounded
    operands (dg, du, h' in x's dtype, then the adapter's), with the masks of reference.keep_mask."""
    M, I = 37, 100  # I: not a multiple of any BLOCK_N, nor of the 8 columns of a Philox call
    rg, ru, rd = ranks
    g = strided(torch.randn(M, I, device=DEV).to(dtype))
    u = torch.randn(M, I, device=DEV).to(dtype)
    dh = strided(torch.randn(M, I, device=DEV).to(dtype))
    p, rescale = mask or (0.0, False)
    key, dkey = seed(321), seed(2**33 + 5)
    gate = _side(M, rg, adt) if rg else None
    up = (gate if shared else _side(M, ru, adt)) if ru else None
    down = K.DownLora(torch.randn(M, rd, device=DEV).to(adt), 0.75, q, dkey if q else None) if rd else None
    dg, gbuf = padded((M, I), dtype)
    du, ubuf = padded((M, I), dtype)
    r = K.act_bwd_lora(dh, g, u, activation.value, p, rescale, key if mask else None, gate=gate, up=up,
                       down=down, splits=splits, out=(dg, du))
    for buf in (gbuf, ubuf):
        assert_border_intact(buf)
    dg_ref, du_ref = K.masked_gated_act_bwd(dh, g, u, activation.value, p, rescale, key if mask else None)
    assert torch.equal(dg, dg_ref) and torch.equal(du, du_ref)
    f64 = lambda t: t.to(adt).double().cpu()  # noqa: E731  (operands as the kernel rounds them)
    steps = lambda n: tf32x3_steps(adt, n)  # noqa: E731
    for got, side, d in ((r.dB_g, gate, dg), (r.dB_u, up, du)):
        assert (got is None) == (side is None)
        if side is not None:
            assert got.dtype == adt
            assert_close64(got, 1.5 * f64(d).t() @ f64(side.s), adt, depth=M, tf32x3_depth=steps(M))
    if down is not None:
        h = K.masked_gated_act_fwd(g, u, activation.value, p, rescale, key if mask else None)
        hd = f64(h)
        if q:
            hd = (hd * P.keep_mask(dkey, M, I, q).double() * K.act_bwd_lora.__globals__["rounded_to"](1 / (1 - q), adt))
        assert_close64(r.dA_d, 0.75 * f64(down.t).t() @ hd, adt, depth=M, tf32x3_depth=steps(M))
    else:
        assert r.dA_d is None


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_act_bwd_lora_recomputes_the_forward_h_bit_for_bit(activation):
    """With t_d = the identity (fp32 adapters, scaling 1, no dropout) dA_d is h' exactly: an fp16 h'
    is its own tf32 split, so the tf32x3 dot adds nothing. So the h' the pass rebuilds equals
    masked_gated_act_fwd's bit for bit. (Sized to catch a formula off by an fp32 ulp: with the earlier
    gelu_tanh, whose gradient computed act(g) differently, building h' from it changed about 13 of
    these fp16 roundings.)"""
    M, I = 64, 3000 if activation == "gelu_tanh" else 600
    g, u = (3 * torch.randn(M, I, device=DEV)).half(), torch.randn(M, I, device=DEV).half()
    key = seed(9)
    r = K.act_bwd_lora(torch.randn_like(g), g, u, activation, 0.25, True, key,
                       down=K.DownLora(torch.eye(M, device=DEV), 1.0), splits=2)
    assert torch.equal(r.dA_d, K.masked_gated_act_fwd(g, u, activation, 0.25, True, key).float())


def test_act_bwd_lora_down_dropout_mask_is_bit_equal_to_reference():
    """dA_d with t_d = the identity is D_q(h'): zero exactly where the down LoRA's dropout drops (h' is
    never zero for g, u in [1, 2)), the kept values h' / (1 - q) up to the tf32x3 error."""
    M, I, q = 24, 77, 0.3
    g, u = (1 + torch.rand(M, I, device=DEV)).bfloat16(), (1 + torch.rand(M, I, device=DEV)).bfloat16()
    dkey = seed(10)
    r = K.act_bwd_lora(torch.randn_like(g), g, u, "silu", down=K.DownLora(torch.eye(M, device=DEV), 1.0, q, dkey))
    keep = P.keep_mask(dkey, M, I, q).to(DEV)
    assert torch.equal(r.dA_d != 0, keep)
    h = K.masked_gated_act_fwd(g, u, "silu", 0.0, False, None).float() * keep.float() * (1 / (1 - q))
    assert_close64(r.dA_d, h.double(), torch.float32, depth=1, tf32x3_depth=1)


def test_act_bwd_lora_is_deterministic_and_splits_agree():
    M, I = 150, 90
    g, u, dh = (torch.randn(M, I, device=DEV) for _ in range(3))
    args = dict(gate=_side(M, 6, torch.float32), up=_side(M, 6, torch.float32),
                down=K.DownLora(torch.randn(M, 6, device=DEV), 1.0, 0.1, seed(4)))
    one = K.act_bwd_lora(dh, g, u, "silu", 0.1, False, seed(3), splits=1, **args)
    for n in (2, 4):
        a = K.act_bwd_lora(dh, g, u, "silu", 0.1, False, seed(3), splits=n, **args)
        b = K.act_bwd_lora(dh, g, u, "silu", 0.1, False, seed(3), splits=n, **args)
        for x, y, z in zip((a.dg, a.dB_g, a.dB_u, a.dA_d), (b.dg, b.dB_g, b.dB_u, b.dA_d),
                           (one.dg, one.dB_g, one.dB_u, one.dA_d)):
            assert torch.equal(x, y)
            assert_close64(x, z.double(), torch.float32, depth=M, tf32x3_depth=M)


def test_act_bwd_lora_single_row_and_empty():
    g = torch.randn(1, 5, device=DEV)
    r = K.act_bwd_lora(g, g, g, "silu", 0.5, False, seed(1), gate=_side(1, 2, torch.float32))
    assert r.dg.shape == (1, 5) and r.dB_g.shape == (5, 2) and r.dA_d is None
    e = K.act_bwd_lora(g[:0], g[:0], g[:0], "silu", 0.0, False, None, gate=_side(0, 2, torch.float32),
                       down=K.DownLora(torch.randn(0, 3, device=DEV), 1.0))
    assert e.dg.shape == (0, 5) and torch.equal(e.dB_g, torch.zeros(5, 2)) and torch.equal(e.dA_d, torch.zeros(3, 5))


@pytest.mark.parametrize("dtype,adt,activation,mask,ranks,q,splits", [
    (torch.bfloat16, torch.bfloat16, Activation.SILU, (0.1, True), (16, 16, 16), 0.1, 2),
    (torch.float16, torch.float16, Activation.GELU_TANH, None, (0, 0, 5), 0.0, 1),
    (torch.bfloat16, torch.bfloat16, Activation.GELU, (0.2, False), (8, 0, 32), 0.3, 3),
    (torch.float32, torch.bfloat16, Activation.SILU, (0.1, True), (32, 32, 24), 0.05, 2),
    (torch.bfloat16, torch.bfloat16, Activation.SILU, (0.1, True), (64, 64, 64), 0.05, 2),  # sm_90 and interpreter
    (torch.float16, torch.float16, Activation.GELU_TANH, None, (48, 0, 40), 0.1, 1),
])
def test_act_bwd_lora_folds_the_down_lora_term_of_dh(dtype, adt, activation, mask, ranks, q, splits):
    """With down.a the pass adds s_d D_q(t_d A_d) to dh itself, rounded to dh's dtype: the same gradients as
    lora_expand_add over dh followed by the pass without the fold (the LoRA term's dot may round
    differently in its last fp32 bit, so dg, du and the dB built from them within a rounding of dh' and
    of the rank-deep dot), and dA_d bit for bit. A_d with a row stride wider than its row."""
    if not K.act_bwd_fold_supported(adt, max(ranks), DEV):
        pytest.skip(f"the fold takes ranks <= 32 on this GPU's architecture ({max(ranks)} here)")
    M, I = 37, 100
    rg, ru, rd = ranks
    g, u = strided(torch.randn(M, I, device=DEV).to(dtype)), torch.randn(M, I, device=DEV).to(dtype)
    dh = strided(torch.randn(M, I, device=DEV).to(dtype))
    p, rescale = mask or (0.0, False)
    key, dkey = seed(321), seed(2**33 + 5) if q else None
    t, a = torch.randn(M, rd, device=DEV).to(adt), strided(torch.randn(rd, I, device=DEV).to(adt))
    gate = _side(M, rg, adt) if rg else None
    up = _side(M, ru, adt) if ru else None
    args = dict(gate=gate, up=up, splits=splits)
    folded = K.act_bwd_lora(dh, g, u, activation.value, p, rescale, key if mask else None,
                            down=K.DownLora(t, 0.75, q, dkey, a), **args)
    dh_ref = K.lora_expand_add(dh.clone(), t, a.t(), 0.75, q, dkey)
    ref = K.act_bwd_lora(dh_ref, g, u, activation.value, p, rescale, key if mask else None,
                         down=K.DownLora(t, 0.75, q, dkey), **args)
    assert torch.equal(folded.dA_d, ref.dA_d)
    for got, want, depth in ((folded.dg, ref.dg, rd), (folded.du, ref.du, rd), (folded.dB_g, ref.dB_g, M),
                             (folded.dB_u, ref.dB_u, M)):
        assert (got is None) == (want is None)
        if got is not None:
            assert_close64(got, want.double(), got.dtype, depth=depth)
    assert not torch.equal(folded.dg, K.act_bwd_lora(dh, g, u, activation.value, p, rescale, key if mask else None,
                                                     down=K.DownLora(t, 0.75, q, dkey), **args).dg)


def test_act_bwd_lora_fold_rounds_dh_to_its_own_dtype():
    """A bf16 dh beside fp32 g, u: the folded dh' is rounded to bf16 (dh's dtype), as lora_expand_add over dh
    rounds it, not kept in g's fp32. Small integers in t_d and A_d make the LoRA term exact in any summation
    order, so both ways form the same dh' and the same pass gives the same bits."""
    M, I, r = 33, 72, 16
    g, u = torch.randn(M, I, device=DEV), torch.randn(M, I, device=DEV)
    dh = torch.randn(M, I, device=DEV).bfloat16()
    t = torch.randint(-3, 4, (M, r), device=DEV).bfloat16()
    a = torch.randint(-3, 4, (r, I), device=DEV).bfloat16()
    folded = K.act_bwd_lora(dh, g, u, "silu", down=K.DownLora(t, 0.75, a=a))
    ref = K.act_bwd_lora(K.lora_expand_add(dh.clone(), t, a.t(), 0.75), g, u, "silu", down=K.DownLora(t, 0.75))
    assert torch.equal(folded.dg, ref.dg) and torch.equal(folded.du, ref.du)


def test_act_bwd_lora_fold_rejects_what_it_does_not_cover():
    g = torch.randn(4, 8, device=DEV).bfloat16()
    t = torch.randn(4, 2, device=DEV).bfloat16()
    with pytest.raises(TypeError, match="down.a"):
        K.act_bwd_lora(g, g, g, "silu", down=K.DownLora(t.float(), 1.0, a=torch.randn(2, 8, device=DEV)))
    with pytest.raises(ValueError, match="down.a"):
        K.act_bwd_lora(g, g, g, "silu", down=K.DownLora(t, 1.0, a=torch.randn(3, 8, device=DEV).bfloat16()))
    # ranks above 32 fold on sm_90 (and in the interpreter), not on sm_80, where they spill
    t33 = torch.randn(4, 33, device=DEV).bfloat16()
    wide_gate = K.LoraSide(torch.randn(4, 64, device=DEV).bfloat16(), 1.0)  # every rank of the pass counts
    for arch, ok in (("sm_90", True), ("sm_80", False)):
        with pretend_triton_arch(arch):
            assert K.act_bwd_fold_supported(torch.bfloat16, 64, g.device) == ok
            assert K.act_bwd_fold_supported(torch.bfloat16, 32, g.device)
            if ok:
                continue
            with pytest.raises(ValueError, match="ranks <= 32 on sm_80 .gate, up and down., got 33"):
                K.act_bwd_lora(g, g, g, "silu", down=K.DownLora(t33, 1.0, a=torch.randn(33, 8, device=DEV).bfloat16()))
            with pytest.raises(ValueError, match="ranks <= 32 on sm_80 .gate, up and down., got 64"):
                K.act_bwd_lora(g, g, g, "silu", gate=wide_gate,
                               down=K.DownLora(t, 1.0, a=torch.randn(2, 8, device=DEV).bfloat16()))
    assert not K.act_bwd_fold_supported(torch.float32, 16, g.device)
    with pytest.raises(ValueError, match="down_a"):  # another device than the pass's operands
        K.act_bwd_lora(g, g, g, "silu", down=K.DownLora(t, 1.0, a=torch.empty(2, 8, device="meta", dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="unit column stride"):
        K.act_bwd_lora(g, g, g, "silu", down=K.DownLora(t, 1.0, a=torch.randn(8, 2, device=DEV).bfloat16().t()))


def test_act_bwd_lora_rejects_bad_arguments():
    g = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match="gate.s"):
        K.act_bwd_lora(g, g, g, "silu", gate=K.LoraSide(torch.randn(5, 2), 1.0))
    with pytest.raises(ValueError, match="r in"):
        K.act_bwd_lora(g, g, g, "silu", gate=K.LoraSide(torch.randn(4, 65), 1.0))
    with pytest.raises(TypeError, match="up.s"):
        K.act_bwd_lora(g, g, g, "silu", up=K.LoraSide(torch.randn(4, 2).double(), 1.0))
    with pytest.raises(ValueError, match="down.seed"):
        K.act_bwd_lora(g, g, g, "silu", down=K.DownLora(torch.randn(4, 2), 1.0, 0.1))
    with pytest.raises(ValueError, match="down.t"):
        K.act_bwd_lora(g, g, g, "silu", down=K.DownLora(torch.randn(5, 2), 1.0))
    with pytest.raises(ValueError, match="seed"):
        K.act_bwd_lora(g, g, g, "silu", 0.1, False, None)


# ---- LoRA passes over a cuBLAS output (lora_epilogue) ----------------------------------------------
@pytest.mark.parametrize("dtype,adt,rank,q", [
    (torch.float32, torch.float32, 5, 0.0), (torch.bfloat16, torch.float32, 16, 0.2),
    (torch.bfloat16, torch.bfloat16, 70, 0.1), (torch.float16, torch.float16, 1, 0.0),
    (torch.float16, torch.float32, 33, 0.3),
])
def test_lora_expand_add(dtype, adt, rank, q):
    """y + s D(S B^T) in place, B read through a transposed view (dX's A^T), against float64 of the
    rounded operands; only y's own rows and columns are written; the dropout mask is the reference's."""
    M, N = 45, 70
    y0 = torch.randn(M, N, device=DEV).to(dtype)
    y, buf = padded((M, N), dtype)
    y.copy_(y0)
    s = torch.randn(M, rank, device=DEV).to(adt)
    a = (torch.randn(rank, N, device=DEV) / rank**0.5).to(adt)  # b = a^T, strides (1, N)
    key = seed(77)
    out = K.lora_expand_add(y, s, a.t(), 0.5, q, key if q else None)
    assert out is y
    assert_border_intact(buf)
    term = s.double().cpu() @ a.double().cpu()
    if q:
        term = term * P.keep_mask(key, M, N, q).double() * K.lora_expand_add.__globals__["rounded_to"](1 / (1 - q), adt)
    assert_close64(y, y0.double().cpu() + 0.5 * term, dtype, depth=rank, tf32x3_depth=tf32x3_steps(adt, rank))
    if q:  # where the mask drops, y keeps its base value exactly
        dropped = ~P.keep_mask(key, M, N, q).to(DEV)
        assert torch.equal(y[dropped], y0[dropped])


@pytest.mark.parametrize("dtype,adt,ranks,drops,bias", [
    (torch.float32, torch.float32, (16,), (0.0,), True),
    (torch.bfloat16, torch.float32, (16, 16), (0.1, 0.3), False),
    (torch.float32, torch.float32, (12, 7), (0.5, 0.4), True),  # where both masks drop: the bias exactly
    (torch.bfloat16, torch.bfloat16, (70, 3), (0.2, 0.0), False),
    (torch.float16, torch.float16, (33,), (0.1,), False),
    (torch.float16, torch.float32, (5, 64), (0.0, 0.2), False),
    (torch.bfloat16, torch.bfloat16, (0,), (0.0,), True),
])
def test_lora_expand_into(dtype, adt, ranks, drops, bias):
    """out = b + s1 D1(S1 B1^T) [+ s2 D2(S2 B2^T)], out's old values never read (NaN before), each term
    with its own rank, scaling and mask (B read through A^T views as for dX), against float64 of the
    rounded operands; only out's own rows and columns are written; where every mask drops, out is the
    bias exactly (0 without one)."""
    M, N = 45, 70
    out, buf = padded((M, N), dtype)
    out.fill_(float("nan"))
    b = torch.randn(N, device=DEV).to(dtype) if bias else None
    terms, exact, kept_any = [], torch.zeros(M, N, dtype=torch.float64), torch.zeros(M, N, dtype=torch.bool)
    for i, (r, q) in enumerate(zip(ranks, drops)):
        s = torch.randn(M, r, device=DEV).to(adt)
        a = (torch.randn(r, N, device=DEV) / max(r, 1)**0.5).to(adt)
        key = seed(40 + i) if q else None
        scaling = (0.5, 1.75)[i]
        term = s.double().cpu() @ a.double().cpu()
        keep = P.keep_mask(key, M, N, q) if q else torch.ones(M, N, dtype=torch.bool)
        if q:
            term = term * keep.double() * K.lora_expand_add.__globals__["rounded_to"](1 / (1 - q), adt)
        kept_any |= keep & (r > 0)
        exact += scaling * term
        terms.append(K.LoraTerm(s, a.t(), scaling, q, key))
    if b is not None:
        exact += b.double().cpu()
        b = torch.stack([b, torch.zeros_like(b)], 1)[:, 0]  # a strided bias (copied by the launcher)
    assert K.lora_expand_into(out, tuple(terms), b) is out
    assert_border_intact(buf)
    assert_close64(out, exact, dtype, depth=sum(ranks), tf32x3_depth=tf32x3_steps(adt, sum(ranks)))
    dropped = ~kept_any.to(DEV)
    assert torch.equal(out[dropped], b.expand(M, N)[dropped] if b is not None else torch.zeros_like(out[dropped]))


def test_lora_expand_into_is_the_c_operand_of_addmm():
    """out.addmm_(x, W^T) after lora_expand_into: y = x W^T + b + s S B^T within one rounding of the
    LoRA term and one of y against float64 (the reference rounds the base product instead)."""
    M, d, N, r = 40, 48, 56, 8
    x = torch.randn(M, d, device=DEV).to(torch.bfloat16)
    w = (torch.randn(N, d, device=DEV) / d**0.5).to(torch.bfloat16)
    b = torch.randn(N, device=DEV).to(torch.bfloat16)
    s = torch.randn(M, r, device=DEV)
    lb = torch.randn(N, r, device=DEV) / r**0.5
    y = K.lora_expand_into(torch.empty(M, N, dtype=torch.bfloat16, device=DEV), (K.LoraTerm(s, lb, 0.5),), b)
    y.addmm_(x, w.t())
    exact = x.double().cpu() @ w.double().cpu().t() + b.double().cpu() + 0.5 * s.double().cpu() @ lb.double().cpu().t()
    assert_close64(y, exact, torch.bfloat16, depth=d + r, tf32x3_depth=r)


def test_lora_expand_into_rejects_bad_arguments():
    out = torch.empty(4, 8, device=DEV)
    term = K.LoraTerm(torch.randn(4, 2), torch.randn(8, 2), 1.0)
    with pytest.raises(ValueError, match="terms"):
        K.lora_expand_into(out, ())
    with pytest.raises(ValueError, match="terms"):
        K.lora_expand_into(out, (term,) * 3)
    with pytest.raises(TypeError, match="terms: expected one adapter dtype"):
        K.lora_expand_into(out, (term, K.LoraTerm(torch.randn(4, 2).half(), torch.randn(8, 2).half(), 1.0)))
    with pytest.raises(ValueError, match="terms\\[1\\].seed"):
        K.lora_expand_into(out, (term, K.LoraTerm(torch.randn(4, 2), torch.randn(8, 2), 1.0, 0.1)))
    with pytest.raises(ValueError, match="terms\\[1\\].s, terms\\[1\\].b"):
        K.lora_expand_into(out, (term, K.LoraTerm(torch.randn(4, 2), torch.randn(9, 2), 1.0)))
    with pytest.raises(ValueError, match="bias"):
        K.lora_expand_into(out, (term,), torch.randn(7))
    with pytest.raises(ValueError, match="bias"):
        K.lora_expand_into(out, (term,), torch.randn(8).half())
    with pytest.raises(ValueError, match="bias"):
        K.lora_expand_into(out, (term,), torch.randn(2, 8))
    with pytest.raises(ValueError, match="unit column stride"):
        K.lora_expand_into(torch.empty(8, 4).t(), (term,))


@pytest.mark.parametrize("dtype,adt,activation,mask,sides", [
    (torch.float32, torch.float32, Activation.SILU, (0.3, True), (3, 3)),
    (torch.bfloat16, torch.float32, Activation.GELU_TANH, (0.1, False), (16, 0)),
    (torch.bfloat16, torch.bfloat16, Activation.GELU, None, (0, 8)),
    (torch.float16, torch.float16, Activation.SILU, (0.2, True), (0, 0)),
    (torch.float16, torch.float32, Activation.GELU, (0.1, False), (64, 64)),
])
def test_gate_up_lora_act(dtype, adt, activation, mask, sides):
    """g, u updated in place within the rounding budget of float64; h' bit-identical to
    masked_gated_act_fwd on the updated g, u (what backward rebuilds); the fused layout's halves of one
    (M, 2I) buffer as g and u."""
    M, I = 37, 70
    gu = torch.randn(M, 2 * I, device=DEV).to(dtype)
    g0, u0 = gu[:, :I].clone(), gu[:, I:].clone()
    p, rescale = mask or (0.0, False)
    key = seed(5)

    def side(r):
        return None if not r else K.ExpandSide(torch.randn(M, r, device=DEV).to(adt),
                                               (torch.randn(I, r, device=DEV) / r**0.5).to(adt), 1.25)

    gate, up = side(sides[0]), side(sides[1])
    h = K.gate_up_lora_act(gu[:, :I], gu[:, I:], gate, up, activation.value, p, rescale, key if mask else None)
    for new, old, sd in ((gu[:, :I], g0, gate), (gu[:, I:], u0, up)):
        if sd is None:
            assert torch.equal(new, old)
        else:
            exact = old.double().cpu() + 1.25 * sd.s.double().cpu() @ sd.b.double().cpu().t()
            assert_close64(new, exact, dtype, depth=sd.s.shape[1], tf32x3_depth=tf32x3_steps(adt, sd.s.shape[1]))
    assert torch.equal(h, K.masked_gated_act_fwd(gu[:, :I], gu[:, I:], activation.value, p, rescale, key if mask else None))


def test_lora_epilogue_rejects_bad_arguments():
    y = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match="s, b"):
        K.lora_expand_add(y, torch.randn(4, 2), torch.randn(9, 2), 1.0)
    with pytest.raises(ValueError, match="unit column stride"):
        K.lora_expand_add(torch.randn(8, 4).t(), torch.randn(4, 2), torch.randn(8, 2), 1.0)
    with pytest.raises(ValueError, match="seed"):
        K.lora_expand_add(y, torch.randn(4, 2), torch.randn(8, 2), 1.0, 0.1)
    with pytest.raises(TypeError, match="b"):
        K.lora_expand_add(y, torch.randn(4, 2), torch.randn(8, 2).half(), 1.0)
    with pytest.raises(ValueError, match="u"):
        K.gate_up_lora_act(y, torch.randn(4, 9), None, None, "silu")


# ---- the sum of split partials ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits,shape", [(1, (7,)), (3, (37, 5)), (9, (1000, 3))])
def test_split_sum_is_the_sequential_fp32_sum_cast_once(dtype, splits, shape):
    """The same bits as adding the partials one after another in fp32, then one rounding to the dtype."""
    from transpeft_kernels.kernels.triton.split_sum import split_sum

    part = torch.randn(splits, *shape, device=DEV) * torch.logspace(-3, 3, splits, device=DEV).view(-1, *[1] * len(shape))
    want = part[0].clone()
    for s in range(1, splits):
        want += part[s]
    got = split_sum(part, dtype)
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    n = want.numel()  # into a contiguous view inside a sentinel-filled buffer: nothing written outside it
    buf = torch.full((n + 4,), SENTINEL, dtype=dtype, device=DEV)
    out = buf[2:2 + n].view(shape)
    assert split_sum(part, dtype, out) is out and torch.equal(out, want.to(dtype))
    assert torch.all(buf[:2] == SENTINEL) and torch.all(buf[2 + n:] == SENTINEL)


def test_split_sum_rejects_bad_arguments():
    from transpeft_kernels.kernels.triton.split_sum import split_sum

    with pytest.raises(ValueError, match="part: expected contiguous float32"):
        split_sum(torch.zeros(2, 3, dtype=torch.float16, device=DEV), torch.float32)
    with pytest.raises(ValueError, match="part: expected contiguous float32"):
        split_sum(torch.zeros(3, 2, device=DEV).t(), torch.float32)
    with pytest.raises(ValueError, match="out: expected a contiguous"):
        split_sum(torch.zeros(2, 3, device=DEV), torch.float32, torch.zeros(4, device=DEV))
    assert split_sum(torch.zeros(0, 3, device=DEV), torch.bfloat16).eq(0).all()  # no splits: zeros


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_token_reduce_splits_cost_one_extra_launch(out_dtype, monkeypatch):
    """With splits, the partials are summed and cast by one split_sum launch (two ATen ops before)."""
    import importlib

    S = importlib.import_module("transpeft_kernels.kernels.triton.split_sum")
    TR = importlib.import_module("transpeft_kernels.kernels.triton.token_reduce")  # the module, not its function

    calls = []
    real = S.split_sum
    monkeypatch.setattr(TR, "split_sum", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    p, q = torch.randn(200, 24, device=DEV), torch.randn(200, 16, device=DEV)
    one, _ = K.token_reduce(p, q, out_dtype, torch.float32, splits=1)
    three, _ = K.token_reduce(p, q, out_dtype, torch.float32, splits=3)
    assert calls == [out_dtype] and three.dtype == out_dtype
    assert_close64(three, p.double().cpu().t() @ q.double().cpu(), out_dtype, depth=200, tf32x3_depth=200)
    # into a given out: contiguous (summed straight into it) and strided (summed, then copied)
    for out in (torch.empty(24, 16, dtype=out_dtype, device=DEV), torch.empty(16, 24, dtype=out_dtype, device=DEV).t()):
        res, _ = K.token_reduce(p, q, out_dtype, torch.float32, splits=3, out=out)
        assert res is out and torch.equal(out, three)
