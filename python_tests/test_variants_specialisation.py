"""The variants that ``compile-check`` compiles (kernels/triton/variants.py) are specialised as real
launches are: the int arguments compiled as the constant 1 are exactly those a launch through the
ops layer passes as 1 (Triton's JIT turns an int argument equal to 1 into a constexpr).

Every kernel launch of a few masked gated MLP steps (split and fused layouts, LoRA on all, some or
no projections, with dropout, biases and base-weight gradients) and of the masked activation op is
recorded with a pre-run hook (interpreter on CPU; compiled kernels on a GPU), with realistic
row-major contiguous tensors and no dimension of size 1. A launch is keyed by its kernel, its phase
(forward, or under a ``*_bwd`` method of the ops layer) and the constexpr flags that decide which
operands exist; each variant's unit strides must equal the int arguments equal to 1 of the
launches with its key. The arguments that launches pass as Python floats must be the ones
variants.FLOAT_ARGS compiles as fp32."""
import os
import sys

import pytest
import torch

pytest.importorskip("triton")

from transpeft_kernels import ops  # noqa: E402
from transpeft_kernels.kernels.env import interpreting  # noqa: E402
from transpeft_kernels.reference.activations import Activation  # noqa: E402
from transpeft_kernels.specs import GatedMLPWeights, LinearWeights, LoraWeights, MaskSpec  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(DEV.type == "cpu" and not interpreting(),
                                reason="needs a GPU or TRITON_INTERPRET=1 for the kernels to launch")

# The constexprs that decide which operands (and so which stride arguments) a launch has.
FLAGS = {
    "masked_gated_act_fwd_kernel": (),
    "masked_gated_act_bwd_kernel": (),
    "lora_shrink_kernel": ("HAS_DROPOUT",),
    "gemm_lora_expand_kernel": ("HAS_LORA", "LORA_DROPOUT"),
    "gate_up_act_kernel": ("LORA_G", "LORA_U"),
    "token_reduce_kernel": ("HAS_COLSUM", "Q_DROPOUT"),
    "act_bwd_lora_kernel": (),
    "lora_expand_add_kernel": ("SECOND",),
    "gate_up_lora_act_kernel": ("LORA_G", "LORA_U"),
    "split_sum_kernel": (),
}
MODULES = {
    "masked_gated_act_fwd_kernel": "masked_gated_act", "masked_gated_act_bwd_kernel": "masked_gated_act",
    "lora_shrink_kernel": "lora_shrink", "gemm_lora_expand_kernel": "gemm_lora_expand",
    "gate_up_act_kernel": "gate_up_act", "token_reduce_kernel": "token_reduce", "act_bwd_lora_kernel": "act_bwd_lora",
    "lora_expand_add_kernel": "lora_epilogue", "gate_up_lora_act_kernel": "lora_epilogue",
    "split_sum_kernel": "split_sum",
}
_OPS_DIR = os.sep + os.path.join("transpeft_kernels", "ops") + os.sep


def _phase() -> str:
    """"backward" when a ``*_bwd`` method of the ops layer is on the stack, else "forward"."""
    f = sys._getframe(1)
    while f is not None:
        if _OPS_DIR in f.f_code.co_filename and f.f_code.co_name.endswith("_bwd"):
            return "backward"
        f = f.f_back
    return "forward"


def _key(kernel: str, phase: str, constexprs: dict) -> tuple:
    return (kernel, phase) + tuple((k, bool(constexprs[k])) for k in FLAGS[kernel])


def _linear(d_in, d_out, rank=None, dropout=0.0, bias=False, train_base=False):
    w = torch.randn(d_out, d_in, device=DEV, requires_grad=train_base)
    b = torch.randn(d_out, device=DEV, requires_grad=train_base) if bias else None
    lora = None
    if rank:
        lora = LoraWeights(torch.randn(rank, d_in, device=DEV, requires_grad=True),
                           torch.randn(d_out, rank, device=DEV, requires_grad=True), 0.5, dropout)
    return LinearWeights(w, b, lora)


def _leaves(x, w: GatedMLPWeights):
    return [x] + [t for p in w.projections for t in p.tensors() if t is not None and t.requires_grad]


@pytest.fixture(scope="module")
def recorded_launches():
    """({key: {frozenset of the int args equal to 1}}, {kernel: {frozenset of the float args}}) over the
    recorded launches."""
    import importlib

    recorded: dict = {}
    floats: dict = {}
    kernels = {}
    for name, mod in MODULES.items():
        kernels[name] = getattr(importlib.import_module(f"transpeft_kernels.kernels.triton.{mod}"), name)

    def hook_for(name, fn):
        def hook(*args, **kwargs):
            ones = frozenset(n for n, v in zip(fn.arg_names, args) if type(v) is int and v == 1)
            recorded.setdefault(_key(name, _phase(), kwargs), set()).add(ones)
            floats.setdefault(name, set()).add(frozenset(n for n, v in zip(fn.arg_names, args) if type(v) is float))
        return hook

    saved = {name: fn.pre_run_hooks for name, fn in kernels.items()}
    for name, fn in kernels.items():
        fn.pre_run_hooks = [hook_for(name, fn)]
    from transpeft_kernels.ops.triton_backend import BASE_GEMM_ENV, ONE_PASS_ENV

    env_before = {k: os.environ.get(k) for k in (ONE_PASS_ENV, BASE_GEMM_ENV)}
    try:
        backend = ops.resolve("triton", DEV)
        d, inter, r, tokens = 32, 64, 16, (2, 24)  # no size 1 anywhere: M = 48
        mask, seed = MaskSpec(0.2), torch.tensor(7)
        lora = dict(rank=r, dropout=0.1)
        mlps = [
            # split, LoRA everywhere, biases, base weights trained: dW + db, dA, dB, dX with the mask
            GatedMLPWeights((_linear(d, inter, bias=True, train_base=True, **lora),
                             _linear(d, inter, bias=True, train_base=True, **lora)),
                            _linear(inter, d, bias=True, train_base=True, **lora)),
            GatedMLPWeights((_linear(d, inter, **lora), _linear(d, inter)), _linear(inter, d)),  # gate only
            GatedMLPWeights((_linear(d, inter), _linear(d, inter, **lora)), _linear(inter, d, **lora)),  # up only
            GatedMLPWeights((_linear(d, inter), _linear(d, inter)), _linear(inter, d)),  # no LoRA
            GatedMLPWeights((_linear(d, 2 * inter, bias=True, **lora),), _linear(inter, d, **lora)),  # fused
        ]
        # both backwards (multi-pass, one pass: act_bwd_lora) and both base-GEMM modes (cuBLAS with the
        # lora_epilogue passes, our GEMMs with fused epilogues)
        for one_pass, base in (("0", "triton"), ("1", "triton"), ("1", "cublas")):
            os.environ[ONE_PASS_ENV] = one_pass
            os.environ[BASE_GEMM_ENV] = base
            for w in mlps:
                x = torch.randn(*tokens, d, device=DEV, requires_grad=True)
                y = ops.masked_gated_mlp(x, w, Activation.SILU, mask, seed, backend)
                torch.autograd.grad(y, _leaves(x, w), torch.randn_like(y))
        g = torch.randn(*tokens, inter, device=DEV, requires_grad=True)
        u = torch.randn(*tokens, inter, device=DEV, requires_grad=True)
        h = ops.masked_gated_act(g, u, Activation.SILU, mask, seed, backend)
        torch.autograd.grad(h, (g, u), torch.randn_like(h))
        # split reductions (the interpreter's token splits are 1): their partials' sum, split_sum
        from transpeft_kernels.kernels import triton as K

        K.token_reduce(torch.randn(512, 16, device=DEV), torch.randn(512, 24, device=DEV), torch.bfloat16,
                       torch.float32, splits=2)  # 512 tokens: two splits with BLOCK_T up to 256
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name, fn in kernels.items():
            fn.pre_run_hooks = saved[name]
    return recorded, floats


@pytest.fixture(scope="module")
def launches(recorded_launches):
    return recorded_launches[0]


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_unit_strides_are_what_real_launches_pass(launches, arch):
    from transpeft_kernels.kernels.triton.variants import variants

    checked = set()
    for v in variants(arch):
        name = v.kernel.rsplit(".", 1)[1]
        key = _key(name, v.phase, v.constexprs)
        assert key in launches, f"{v.label}: no recorded launch with key {key} (recorded: {sorted(launches)})"
        assert launches[key] == {frozenset(v.unit_strides)}, (
            f"{v.label} ({v.phase}): compiled with {sorted(v.unit_strides)} as 1, "
            f"real launches pass {[sorted(s) for s in launches[key]]}")
        checked.add(name)
    assert checked == set(FLAGS)  # every kernel family has variants, and each was checked


def test_elementwise_variants_have_no_unit_strides():
    # the act kernels take row strides only: compiling any of them as 1 gives scalar, not vector, stores
    from transpeft_kernels.kernels.triton.variants import variants

    acts = [v for v in variants("sm_90") if v.kernel.startswith("masked_gated_act.")]
    assert acts and all(v.unit_strides == () for v in acts)
    assert all(v.elements_per_thread == v.constexprs["BLOCK_M"] * v.constexprs["BLOCK_N"] // (32 * v.num_warps)
               for v in acts)


def test_float_arguments_are_what_real_launches_pass(recorded_launches):
    # compile-check compiles FLOAT_ARGS as fp32 and every other scalar as an int: a launch passing a
    # Python int there would run another specialisation than the one checked
    from transpeft_kernels.kernels.triton.variants import FLOAT_ARGS

    floats = recorded_launches[1]
    for kernel, names in FLOAT_ARGS.items():
        name = kernel.rsplit(".", 1)[1]
        assert floats[name] == {frozenset(names)}, (kernel, [sorted(f) for f in floats[name]])
