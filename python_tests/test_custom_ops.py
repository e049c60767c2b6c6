"""The transpeft:: custom ops (the kernel boundary: forward and backward ops without autograd of their
own): schemas and fake (meta) implementations checked by torch.library.opcheck; the autograd Functions
over them give the same results through the dispatcher as through the implementations; a compiled
patched model on the Triton backend traces without graph breaks."""
import pytest
import torch

import test_ops
from test_ops import EMULATED_CUDA, _backend_names, make_linear, make_mlp
from transpeft_kernels import ops, reference as R
from transpeft_kernels.ops import custom_ops  # noqa: F401  (registers the ops)
from transpeft_kernels.specs import Layout, MaskSpec

pytestmark = pytest.mark.usefixtures("on_accelerator")
T = torch.ops.transpeft


def _names() -> list[str]:
    """The backends that run here; "cuda" also on CPU through its host emulation (needs g++)."""
    return ["cuda" if n == EMULATED_CUDA else n for n in _backend_names()]


@pytest.fixture(autouse=True)
def _cuda_emulation_on_cpu(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRANSPEFT_CUDA_EMULATE", "1")


def _detached(args):
    """The ops are kernel boundaries with no autograd of their own (the Functions in custom_ops.py
    carry it): check them on detached inputs."""
    def d(a):
        if isinstance(a, torch.Tensor):
            return a.detach()
        if isinstance(a, list):
            return [d(t) for t in a]
        return a
    return tuple(d(a) for a in args)


def _lin_args(lin, x, seed, backend):
    scal, drop = (0.0, 0.0) if lin.lora is None else (lin.lora.scaling, lin.lora.dropout)
    return (x, *lin.tensors(), seed, scal, drop, backend)


@pytest.mark.parametrize("backend", _names())
@pytest.mark.parametrize("lora", [True, False])
def test_lora_linear_ops(backend, lora):
    lin = make_linear(12, 10, torch.float32, rank=3, dropout=0.2 if lora else 0.0, bias=True, train_base=True, lora=lora)
    x = torch.randn(5, 12, requires_grad=True)
    args = _lin_args(lin, x, torch.tensor(4), backend)
    torch.library.opcheck(T.lora_linear, _detached(args))
    y, s = T.lora_linear(*_detached(args))
    dy = torch.randn_like(y)
    needs = [True, True, True, lora, lora]
    torch.library.opcheck(T.lora_linear_backward, _detached((dy, x, s, *args[1:-1], needs, backend)))


@pytest.mark.parametrize("backend", _names())
def test_masked_gated_act_ops(backend):
    g, u = torch.randn(6, 9, requires_grad=True), torch.randn(6, 9, requires_grad=True)
    seed = torch.tensor(11)
    torch.library.opcheck(T.masked_gated_act, _detached((g, u, seed, "gelu_tanh", 0.3, True, backend)))
    dh = torch.randn(6, 9)
    torch.library.opcheck(T.masked_gated_act_backward, (dh, g.detach(), u.detach(), seed, "silu", 0.3, False, backend))


def _mlp_args(w, x, seed, backend):
    flat = [t for p in w.projections for t in p.tensors()]
    scal = [0.0 if p.lora is None else p.lora.scaling for p in w.projections]
    drop = [0.0 if p.lora is None else p.lora.dropout for p in w.projections]
    return (x, [t for t in flat if t is not None], [t is not None for t in flat], seed, scal, drop, "silu", 0.2, False, backend)


@pytest.mark.parametrize("backend", _names())
@pytest.mark.parametrize("layout", [Layout.SPLIT, Layout.FUSED_GATE_UP])
def test_masked_gated_mlp_ops(backend, layout):
    w = make_mlp(8, 12, layout, torch.float32, rank=2, dropout=0.1, bias=True)
    x = torch.randn(5, 8, requires_grad=True)
    args = _mlp_args(w, x, torch.tensor(2), backend)
    torch.library.opcheck(T.masked_gated_mlp, _detached(args))
    y, saved = T.masked_gated_mlp(*_detached(args))
    needs = [True] + [t is not None and t.requires_grad for p in w.projections for t in p.tensors()]
    bwd = (torch.randn_like(y), x.detach(), saved, *args[1:-1], needs, backend)
    torch.library.opcheck(T.masked_gated_mlp_backward, _detached(bwd))


def test_bad_backend_name_inside_the_op_names_the_accepted_values():
    g = torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend"):
        T.masked_gated_act(g, g, None, "silu", 0.0, False, "tpu")


@pytest.mark.skipif("triton" not in _backend_names(), reason="triton cannot run here")
def test_patched_model_on_triton_traces_without_graph_breaks():
    import transpeft_kernels as tpk
    from helpers import batch, lora_model

    torch.set_default_device("cpu")
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = lora_model("phi3", lora_dropout=0.1).to(dev)
    tpk.patch(model, masking=0.2, dropping=0.3, backend="triton")
    model.train()
    ids = batch().to(dev)
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids, use_cache=False)
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert ops.resolve("triton", dev).name == "triton"


@pytest.mark.parametrize("backend", _names())
def test_eager_path_equals_the_dispatched_op(backend, monkeypatch):
    # Eager calls run the ops' implementations directly; under torch.compile the Functions call the
    # same ops through the dispatcher. Forcing the dispatched path gives the same bits, forward and
    # every gradient, and a second backward (retain_graph) sees the same needs.
    w = make_mlp(8, 12, Layout.FUSED_GATE_UP, torch.float32, rank=2, dropout=0.1, bias=True, train_base=True)
    x = torch.randn(5, 8, requires_grad=True)
    lin = make_linear(12, 10, torch.float32, rank=3, dropout=0.2, bias=True, train_base=True)
    xl = torch.randn(5, 12, requires_grad=True)
    g, u = torch.randn(5, 9, requires_grad=True), torch.randn(5, 9, requires_grad=True)
    seed, be = torch.tensor(2), ops.resolve(backend, torch.get_default_device())

    def run_all():
        outs = [ops.masked_gated_mlp(x, w, R.Activation.SILU, MaskSpec(0.2), seed, be),
                ops.lora_linear(xl, lin, seed, be),
                ops.masked_gated_act(g, u, R.Activation.GELU, MaskSpec(0.3, True), seed, be)]
        leaves = [x, *test_ops.leaves(x, w)[1:], xl, *test_ops.leaves(xl, lin)[1:], g, u]
        loss = sum((o * torch.randn_like(o, generator=torch.Generator().manual_seed(i))).sum() for i, o in enumerate(outs))
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        second = torch.autograd.grad(loss, leaves)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        return outs, first

    eager = run_all()
    calls = []
    monkeypatch.setattr(custom_ops, "_dispatch", lambda op, impl, *args: calls.append(op) or op(*args))
    dispatched = run_all()
    assert len(calls) == 3 + 2 * 3  # three forward ops, three backward ops twice, all dispatched
    for a, b in zip([*eager[0], *eager[1]], [*dispatched[0], *dispatched[1]]):
        assert torch.equal(a, b)
