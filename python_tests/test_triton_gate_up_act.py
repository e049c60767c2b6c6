"""The gate/up GEMM with the masked activation epilogue (kernels/triton/gate_up_act.py) and the Triton
backend's gate_up_act_fwd built on it (interpreter on CPU; compiled on a GPU).

Checked: g, u against float64 (with the kernel's own rank-sized S), h' against float64 on the rounded
g and u and bit-equal to the masked_gated_act kernel that backward recomputes h' with, every I/O
dtype, both layouts, all activations, LoRA on none/one/both sides, ragged sizes (no dimension a
multiple of the interpreter's 32x64x64 tiles), masks bit-equal to reference.keep_mask, sentinel-padded
outputs, and the backend against TorchBackend.gate_up_act_fwd.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from budget import assert_close_to_exact, assert_within_budget  # noqa: E402
from test_ops import to64  # noqa: E402
from test_triton_kernels import DEV, assert_border_intact, assert_close64, padded, seed, strided, tf32x3_steps  # noqa: E402
from transpeft_kernels.kernels import triton as K  # noqa: E402  (conftest chose the interpreter first)
from transpeft_kernels.kernels.triton._common import rounded_to  # noqa: E402
from transpeft_kernels.ops.torch_backend import TORCH  # noqa: E402
from transpeft_kernels.reference import philox as P  # noqa: E402
from transpeft_kernels.reference.activations import Activation, act  # noqa: E402
from transpeft_kernels.specs import GatedMLPWeights, Layout, LinearWeights, LoraWeights, MaskSpec, SubSeed, sub_seed  # noqa: E402

M, D, I = 45, 77, 70  # ragged against every tile size


def _proj(n, dtype, adapter_dtype, rank, bias, x, q=0.0, key=None):
    """A GateUpOperand of width n and its float64 value on x (using the kernel's own S)."""
    w = (torch.randn(n, D, device=DEV) / D**0.5).to(dtype)
    b = (torch.randn(n, device=DEV) * 0.1).to(dtype) if bias else None
    exact = x.double().cpu() @ w.double().cpu().t()
    if b is not None:
        exact = exact + b.double().cpu()
    if adapter_dtype is None:
        return K.GateUpOperand(w, b), exact
    A = (torch.randn(rank, D, device=DEV) / D**0.5).to(adapter_dtype)
    B = torch.randn(n, rank, device=DEV).to(adapter_dtype)  # non-zero B
    s = K.lora_shrink(x, A, q, key)
    exact = exact + 0.75 * s.double().cpu() @ B.double().cpu().t()
    return K.GateUpOperand(w, b, s, B, 0.75), exact


def _check_h(h, g, u, activation, p, rescale, key, dtype):
    keep = P.keep_mask(key, M, I, p).double() if p else torch.ones(M, I, dtype=torch.float64)
    c = rounded_to(1.0 / (1.0 - p), dtype) if rescale else 1.0
    assert_close64(h, act(g.double().cpu(), activation) * u.double().cpu() * keep * c, dtype)
    # the h' that backward recomputes from the saved g and u is the forward's, bit for bit
    again = K.masked_gated_act_fwd(g, u, activation.value, p, rescale, key if p else None)
    assert torch.equal(h, again)


# (dtype, gate adapter dtype, up adapter dtype (None: no LoRA), bias, activation, mask (p, rescale), lora dropout)
SPLIT_CASES = [
    (torch.float32, torch.float32, torch.float32, True, Activation.SILU, (0.3, False), 0.1),
    (torch.float32, None, None, False, Activation.GELU, None, 0.0),
    (torch.float32, torch.float32, None, True, Activation.GELU_TANH, (0.25, True), 0.0),
    (torch.float16, None, torch.float32, False, Activation.SILU, (0.2, True), 0.2),
    (torch.float16, torch.float16, torch.float16, True, Activation.GELU_TANH, None, 0.0),
    (torch.bfloat16, torch.float32, torch.float32, False, Activation.SILU, (0.1, False), 0.05),
    (torch.bfloat16, torch.bfloat16, None, True, Activation.GELU, (0.3, True), 0.0),
]


@pytest.mark.parametrize("dtype,adt_g,adt_u,bias,activation,mask,q", SPLIT_CASES)
def test_gate_up_act_split_layout(dtype, adt_g, adt_u, bias, activation, mask, q):
    x = strided(torch.randn(M, D, device=DEV).to(dtype))
    key = seed(77)
    gate, g64 = _proj(I, dtype, adt_g, 5, bias, x, q, key)
    up, u64 = _proj(I, dtype, adt_u, 19, bias, x, q, seed(78))
    p, rescale = mask or (0.0, False)
    (g, gbuf), (u, ubuf), (h, hbuf) = padded((M, I), dtype), padded((M, I), dtype), padded((M, I), dtype)
    outs, h_ret = K.gate_up_act(x, gate, up, activation.value, p, rescale, key if mask else None, out=(g, u), out_h=h)
    assert outs[0] is g and outs[1] is u and h_ret is h
    for buf in (gbuf, ubuf, hbuf):
        assert_border_intact(buf)
    assert_close64(g, g64, dtype, tf32x3_depth=tf32x3_steps(adt_g, 5))  # the expand's rank steps
    assert_close64(u, u64, dtype, tf32x3_depth=tf32x3_steps(adt_u, 19))
    _check_h(h, g, u, activation, p, rescale, key, dtype)


# (dtype, adapter dtype (None: no LoRA), bias, activation, mask, lora dropout)
FUSED_CASES = [
    (torch.float32, torch.float32, True, Activation.GELU, (0.3, False), 0.1),
    (torch.float32, None, False, Activation.SILU, None, 0.0),
    (torch.float16, torch.float32, False, Activation.GELU_TANH, (0.2, True), 0.0),
    (torch.bfloat16, torch.bfloat16, True, Activation.SILU, (0.15, False), 0.2),
    (torch.bfloat16, torch.float32, False, Activation.GELU, None, 0.05),
]


@pytest.mark.parametrize("dtype,adt,bias,activation,mask,q", FUSED_CASES)
def test_gate_up_act_fused_layout(dtype, adt, bias, activation, mask, q):
    x = torch.randn(D, M, device=DEV).to(dtype).t()  # column-major input
    key = seed(2**35 + 3)
    gate_up, gu64 = _proj(2 * I, dtype, adt, 7, bias, x, q, key)
    p, rescale = mask or (0.0, False)
    (gu, gubuf), (h, hbuf) = padded((M, 2 * I), dtype), padded((M, I), dtype)
    (out,), _ = K.gate_up_act(x, gate_up, None, activation.value, p, rescale, key if mask else None, out=(gu,), out_h=h)
    assert out is gu
    assert_border_intact(gubuf)
    assert_border_intact(hbuf)
    assert_close64(gu, gu64, dtype, tf32x3_depth=tf32x3_steps(adt, 7))
    _check_h(h, gu[:, :I], gu[:, I:], activation, p, rescale, key, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_up_act_mask_is_bit_equal_to_reference(dtype):
    # x, W > 0 and no bias: g, u > 0, so act(g) * u > 0 and h' == 0 exactly where the mask drops.
    p, key = 0.4, seed(2**41 + 5)
    x = (1 + torch.rand(M, D, device=DEV)).to(dtype)
    w = (torch.rand(2 * I, D, device=DEV) / D).to(dtype)
    for gate, up in ((K.GateUpOperand(w), None), (K.GateUpOperand(w[:I]), K.GateUpOperand(w[I:]))):
        _, h = K.gate_up_act(x, gate, up, "silu", p, False, key)
        assert torch.equal(h != 0, P.keep_mask(key, M, I, p).to(DEV))


def test_gate_up_act_single_row_empty_and_bad_arguments():
    x, w = torch.randn(1, 9, device=DEV), torch.randn(10, 9, device=DEV)
    (gu,), h = K.gate_up_act(x, K.GateUpOperand(w), None, "gelu", 0.5, False, seed(3))
    assert_close64(gu, x.double() @ w.double().t(), torch.float32)
    assert torch.equal(h != 0, P.keep_mask(seed(3), 1, 5, 0.5).to(DEV) & (gu[:, :5] != 0) & (gu[:, 5:] != 0))
    (g, u), h = K.gate_up_act(x[:0], K.GateUpOperand(w[:5]), K.GateUpOperand(w[5:]), "silu")
    assert g.shape == u.shape == h.shape == (0, 5)
    with pytest.raises(ValueError, match="even"):
        K.gate_up_act(x, K.GateUpOperand(w[:9]), None, "silu")
    with pytest.raises(ValueError, match="up.weight"):
        K.gate_up_act(x, K.GateUpOperand(w[:5]), K.GateUpOperand(w[:4]), "silu")
    with pytest.raises(TypeError, match="weight"):
        K.gate_up_act(x, K.GateUpOperand(w.half()), None, "silu")
    with pytest.raises(ValueError, match="seed"):
        K.gate_up_act(x, K.GateUpOperand(w), None, "silu", 0.1)
    with pytest.raises(ValueError, match="s and b"):
        K.gate_up_act(x, K.GateUpOperand(w, None, torch.randn(1, 2, device=DEV)), None, "silu")


# ---- TritonBackend.gate_up_act_fwd against TorchBackend.gate_up_act_fwd ----------------------------
def _linear(n, dtype, lora_dtype, rank, q, bias):
    w = (torch.randn(n, D, device=DEV) / D**0.5).to(dtype)
    b = (torch.randn(n, device=DEV) * 0.1).to(dtype) if bias else None
    if lora_dtype is None:
        return LinearWeights(w, b)
    A = (torch.randn(rank, D, device=DEV) / D**0.5).to(lora_dtype)
    B = (torch.randn(n, rank, device=DEV) / rank**0.5).to(lora_dtype)
    return LinearWeights(w, b, LoraWeights(A, B, 2.0, q))


@pytest.mark.parametrize("dtype,layout,loras,activation", [
    (torch.float32, Layout.SPLIT, (torch.float32, None), Activation.SILU),
    (torch.float32, Layout.FUSED_GATE_UP, (torch.float32,), Activation.GELU_TANH),
    (torch.float16, Layout.SPLIT, (None, torch.float16), Activation.GELU),
    (torch.bfloat16, Layout.SPLIT, (torch.float32, torch.float32), Activation.SILU),
    (torch.bfloat16, Layout.FUSED_GATE_UP, (None,), Activation.GELU),
])
@pytest.mark.parametrize("base_gemm", ["triton", "cublas"])
def test_backend_gate_up_act_fwd_matches_torch_backend(dtype, layout, loras, activation, base_gemm, monkeypatch):
    """Both base-GEMM modes: our gate/up GEMM with the epilogue, or the cuBLAS (here: CPU ATen) output
    with the LoRA expands and the masked activation as one pass (gate_up_lora_act)."""
    from transpeft_kernels.ops.backends import by_name
    from transpeft_kernels.ops.triton_backend import BASE_GEMM_ENV

    monkeypatch.setenv(BASE_GEMM_ENV, base_gemm)
    triton_backend = by_name("triton")
    fused = "gate_up_act" if base_gemm == "triton" else "gate_up_lora_act"
    launches, kernel = [], getattr(K, fused)
    monkeypatch.setattr(K, fused, lambda *a, **kw: launches.append(1) or kernel(*a, **kw))
    widths = (I, I) if layout is Layout.SPLIT else (2 * I,)
    inputs = tuple(_linear(n, dtype, ld, 6, 0.1, bias=i == 0) for i, (n, ld) in enumerate(zip(widths, loras)))
    w = GatedMLPWeights(inputs, _linear(I, dtype, None, 0, 0.0, False))
    x = torch.randn(M, D, device=DEV).to(dtype)
    key, mask = seed(31), MaskSpec(0.3, rescale=dtype == torch.float16)
    outs, shrinks, h = triton_backend.gate_up_act_fwd(x, w, activation, mask, key)
    assert launches == [1]  # no silent fallback to the torch backend
    outs_t, shrinks_t, h_t = TORCH.gate_up_act_fwd(x, w, activation, mask, key)
    assert len(outs) == len(outs_t) and len(shrinks) == len(shrinks_t)
    outs64, shrinks64, _ = TORCH.gate_up_act_fwd(x.double(), to64(w), activation, mask, key)
    depth = D + 6 + 16
    # fp32 adapters: the shrink's D products and the expand's 6 rank products are tf32x3 (budget.py)
    tc = max(tf32x3_steps(ld, D + 6) for ld in loras)
    for a, b, e in zip(outs, outs_t, outs64):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_within_budget(a, b, e, dtype, depth, "gate/up", tf32x3_depth=tc)
    for a, b, e in zip(shrinks, shrinks_t, shrinks64):
        assert (a is None) == (b is None)
        if a is not None:
            assert_within_budget(a, b, e, a.dtype, depth, "shrink", tf32x3_depth=tf32x3_steps(a.dtype, D))
    keep = P.keep_mask(sub_seed(key, SubSeed.MASK), M, I, mask.p).to(DEV)
    assert not (h[~keep] != 0).any()  # dropped exactly where the mask drops; kept values checked below
    # h' from the torch backend rounds act(g) and the product separately, and its g, u differ by a
    # rounding from ours: compare against h' evaluated in float64 on torch's g and u
    g_t, u_t = (outs_t[0][:, :I], outs_t[0][:, I:]) if layout is Layout.FUSED_GATE_UP else outs_t
    c = mask.multiplier if mask.rescale else 1.0
    exact = act(g_t.double(), activation) * u_t.double() * keep.double() * c
    assert_close_to_exact(h, exact, dtype, 32, "h'", roundings=16, min_scale=1.0)
    assert h.dtype == h_t.dtype and h.shape == h_t.shape


def test_backend_gate_up_act_fwd_falls_back_for_float64():
    from transpeft_kernels.ops.backends import by_name

    lin = _linear(2 * I, torch.float64, torch.float64, 3, 0.0, True)
    w = GatedMLPWeights((lin,), _linear(I, torch.float64, None, 0, 0.0, False))
    x = torch.randn(M, D, dtype=torch.float64)
    got = by_name("triton").gate_up_act_fwd(x, w, Activation.SILU, None, None)
    want = TORCH.gate_up_act_fwd(x, w, Activation.SILU, None, None)
    assert torch.equal(got[0][0], want[0][0]) and torch.equal(got[2], want[2])
