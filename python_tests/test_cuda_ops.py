"""backend="cuda" on a GPU (skipped without one or without the built library): forward and backward
numerics against the reference, masks bit-equal across torch, triton and cuda for the same seed
(including int64 offsets past 2**31), the kernels really running (no silent fallback), and patched
tiny models on "cuda" matching "torch"."""
import pytest
import torch

from helpers import assert_same_training_step, batch, lora_model, spy_cuda_calls, twin
from transpeft_kernels import ops, reference as R
from transpeft_kernels.kernels.cuda.library import emulating
from transpeft_kernels.reference.philox import keep_threshold, philox_randint4x
from transpeft_kernels.specs import GatedMLPWeights, Layout, LinearWeights, LoraWeights, MaskSpec, SubSeed, sub_seed


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available() and not emulating():
        return "no CUDA GPU"
    try:
        ops.check_available("cuda")
    except RuntimeError as e:
        return str(e)
    return None


pytestmark = pytest.mark.skipif(_cuda_reason() is not None, reason=f"backend='cuda' unavailable: {_cuda_reason()}")
# CPU only under TRANSPEFT_CUDA_EMULATE=1: a dry run of these tests through the host emulation.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def calls(monkeypatch):
    return spy_cuda_calls(monkeypatch)


def _linear(d_in, d_out, dtype, adt, rank, q, gen, bias=True, train_base=False):
    W = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dtype).requires_grad_(train_base)
    b = (torch.randn(d_out, generator=gen) * 0.1).to(dtype).requires_grad_(train_base) if bias else None
    A = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(adt).requires_grad_()
    B = (torch.randn(d_out, rank, generator=gen) / rank**0.5).to(adt).requires_grad_()
    return LinearWeights(W, b, LoraWeights(A, B, 2.0, q))


def _moved(lin, device, dtype=None):
    def c(t):
        return None if t is None else t.detach().to(device=device, dtype=dtype or t.dtype).requires_grad_(t.requires_grad)
    return lin.with_tensors(*(c(t) for t in lin.tensors()))


def _run(fn, x, lins, dy):
    leaves = [x] + [t for lin in lins for t in lin.tensors() if t is not None and t.requires_grad]
    y = fn(x, lins)
    return [y, *torch.autograd.grad(y, leaves, dy.to(device=y.device, dtype=y.dtype))]


def _assert_close_to_reference(fn, x, lins):
    """cuda on the GPU vs float64 on the CPU: its error at most 3x that of "torch" on the GPU in the same
    dtype (plus a small floor), for the output and every gradient."""
    cuda, torch_be = ops.resolve("cuda", DEV), ops.resolve("torch", DEV)
    dy = torch.randn(*x.shape[:-1], fn(x, lins, torch_be).shape[-1], generator=torch.Generator().manual_seed(1))
    got = _run(lambda x, ls: fn(x, ls, cuda), x.to(DEV).requires_grad_(), [_moved(lin, DEV) for lin in lins], dy)
    ref = _run(lambda x, ls: fn(x, ls, torch_be), x.to(DEV).requires_grad_(), [_moved(lin, DEV) for lin in lins], dy)
    exact = _run(lambda x, ls: fn(x, ls, torch_be), x.double().requires_grad_(),
                 [_moved(lin, "cpu", torch.float64) for lin in lins], dy.double())
    for i, (a, b, e) in enumerate(zip(got, ref, exact)):
        err_ours = (a.double().cpu() - e).abs().max().item()
        err_ref = (b.double().cpu() - e).abs().max().item()
        assert err_ours <= 3 * err_ref + 1e-3 * e.abs().max().item() + 1e-6, (i, err_ours, err_ref)


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float32)]


@pytest.mark.parametrize("dtype,adt", DTYPES)
@pytest.mark.parametrize("d_in,rank,q", [(257, 16, 0.1), (512, 8, 0.0), (96, 100, 0.05)])
def test_lora_linear_matches_reference(dtype, adt, d_in, rank, q, calls):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 111, d_in, generator=gen).to(dtype)
    lin = _linear(d_in, 515, dtype, adt, rank, q, gen, train_base=True)
    seed = torch.tensor(11)
    _assert_close_to_reference(lambda x, ls, be: ops.lora_linear(x, ls[0], seed, be), x, [lin])
    # the shrink goes to cuBLAS when it has nothing to fuse: no dropout, a 16-bit adapter in x's dtype
    to_cublas = q == 0 and adt == dtype and adt != torch.float32
    want = {"transpeft_lora_expand"} | (set() if to_cublas else {"transpeft_lora_shrink"})
    assert want <= set(calls), (sorted(want), calls)


@pytest.mark.parametrize("dtype,adt", DTYPES)
@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.FUSED_GATE_UP])
@pytest.mark.parametrize("inter,rank", [(700, 8), (1024, 16), (1024, 32), (520, 64), (256, 80)])
def test_gated_mlp_matches_reference(dtype, adt, layout, inter, rank, calls):
    gen = torch.Generator().manual_seed(0)
    d = 257
    x = torch.randn(2, 150, d, generator=gen).to(dtype)
    width = inter if layout is Layout.SPLIT else 2 * inter
    lins = [_linear(d, width, dtype, adt, rank, 0.05, gen) for _ in range(2 if layout is Layout.SPLIT else 1)]
    lins.append(_linear(inter, d, dtype, adt, rank, 0.1, gen, train_base=True))
    seed = torch.tensor(2024)
    for activation in R.Activation:
        for mask in (None, MaskSpec(0.1), MaskSpec(0.3, rescale=True)):
            _assert_close_to_reference(
                lambda x, ls, be: ops.masked_gated_mlp(x, GatedMLPWeights(tuple(ls[:-1]), ls[-1]), activation, mask,
                                                       seed, be), x, lins)
    fused = rank <= 64 and adt in (torch.float32, dtype)
    assert ("transpeft_masked_gated_act_fwd" in calls) and ("transpeft_masked_gated_act_bwd" in calls or not fused)


def test_empty_and_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(0)
    lins = [_moved(_linear(16, 48, torch.float32, torch.float32, 4, 0.1, gen), DEV) for _ in range(2)]
    lins.append(_moved(_linear(24, 16, torch.float32, torch.float32, 4, 0.1, gen), DEV))
    w = GatedMLPWeights((lins[0],), lins[2])  # fused gate_up of width 48 = 2 * 24
    cuda = ops.resolve("cuda", DEV)
    empty = torch.randn(0, 3, 16, device=DEV, requires_grad=True)
    y = ops.masked_gated_mlp(empty, w, R.Activation.SILU, MaskSpec(0.2), torch.tensor(4), cuda)
    assert y.shape == (0, 3, 16)
    y.sum().backward()
    x = torch.randn(16, 10, device=DEV).t()
    _assert_close_to_reference(
        lambda x, ls, be: ops.masked_gated_mlp(x, GatedMLPWeights((ls[0],), ls[1]), R.Activation.SILU, MaskSpec(0.2),
                                               torch.tensor(4), be),
        x.cpu(), [_moved(lins[0], "cpu"), _moved(lins[2], "cpu")])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_knowledge_masks_are_bit_equal_across_backends(dtype):
    seed = torch.tensor(2**41 + 3)
    g = (1 + torch.rand(3000, 1537, device=DEV)).to(dtype)  # never zero: h' == 0 exactly where dropped
    want = R.keep_mask(sub_seed(seed, SubSeed.MASK), 3000, 1537, 0.1, device=DEV)
    names = dict.fromkeys([*ops.runnable_backends(), "cuda"])  # cuda is required here: resolve() says why not
    for name in names:
        h = ops.masked_gated_act(g, g, R.Activation.SILU, MaskSpec(0.1), seed, ops.resolve(name, DEV))
        assert torch.equal(h != 0, want), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs 13 GB of tensors: GPU only")
def test_masks_past_2_pow_31_offsets_equal_the_reference():
    from transpeft_kernels.kernels import cuda as K

    rows, cols = 150_000, 14_336  # element indices rows * cols > 2**31
    seed = torch.tensor(987654321)

    def tail_keep(p):  # the mask spec for the last 3 rows: Philox call row * ceil(cols / 8) + j // 8, lane j % 8
        groups = torch.arange(rows - 3, rows, device=DEV, dtype=torch.int64)[:, None] * (cols // 8) + torch.arange(cols // 8, device=DEV)
        words = philox_randint4x(seed, groups)
        lanes = torch.stack([(words[l // 2] >> (16 * (l % 2))) & 0xFFFF for l in range(8)], dim=-1).reshape(3, cols)
        return lanes >= keep_threshold(p)

    g = torch.ones(rows, cols, dtype=torch.bfloat16, device=DEV)
    h = K.masked_gated_act_fwd(g, g, "silu", 0.3, False, seed)
    assert torch.equal(h[-3:] != 0, tail_keep(0.3))
    del g, h
    x = torch.ones(rows, cols, dtype=torch.bfloat16, device=DEV)
    xd = K.lora_dropout_cast(x, torch.float32, K.Dropout(0.2, seed))
    assert torch.equal(xd[-3:] != 0, tail_keep(0.2))


def test_lora_dropout_masks_equal_the_reference():
    from transpeft_kernels.kernels import cuda as K
    from transpeft_kernels.reference.lora import dropout_multiplier

    seed = torch.tensor(77)
    x = 1 + torch.rand(1000, 96, device=DEV)
    s = K.lora_shrink(x, torch.eye(96, device=DEV), K.Dropout(0.05, seed))
    assert torch.equal(s, x * dropout_multiplier(seed, x, 0.05))


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_patched_tiny_model_on_cuda_matches_torch(family):
    import transpeft_kernels as tpk

    model = lora_model(family, lora_dropout=0.1).to(DEV)
    reference = twin(model)
    tpk.patch(model, masking=0.2, dropping=0.1, backend="cuda")
    tpk.patch(reference, masking=0.2, dropping=0.1, backend="torch")
    for seed in range(3):
        assert_same_training_step(model, reference, batch(seed).to(DEV), seed=seed)
