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
@pytest.mark.parametrize("dtype,dot_dtype,q,splits,transpose", [
    (torch.float32, torch.float32, 0.0, 1, False), (torch.float32, torch.float32, 0.2, 3, True),
    (torch.bfloat16, torch.float32, 0.1, 1, False), (torch.bfloat16, torch.bfloat16, 0.0, 2, False),
    (torch.float16, torch.float16, 0.3, 1, True), (torch.float16, torch.float32, 0.0, 4, False),
])
def test_token_reduce(dtype, dot_dtype, q, splits, transpose):
    T, A, B = 75, 5, 53
    p = strided(torch.randn(T, A, device=DEV).to(dtype))
    qm = torch.randn(B, T, device=DEV).to(dtype).t()
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
