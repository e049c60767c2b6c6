"""The implementations compared at op level, built over one set of weights per case.

    vanilla           PEFT's LoRA Linear with its defaults (fp32 adapters on a bf16 base, nn.Dropout
                      copies); for the gated MLP, baselines.vanilla_masked_mlp: the Trans-PEFT reference
                      code's ``h * (torch.rand_like(h) > p).float()``
    vanilla_compiled  the same function under torch.compile
    floor             only the frozen base GEMMs through cuBLAS (F.linear / matmul): no LoRA, no mask,
                      no activation. A lower bound, not a competitor: nothing computing the LoRA update
                      can beat it
    torch, triton, cuda  ops.lora_linear / ops.masked_gated_mlp on that backend (the latter two only
                      when ops.backends says they can run; otherwise skipped with its reason)

Every implementation shares the base and adapter tensors of one PEFT module, so they compute the same
function; lora_B is random (never PEFT's zeros), so the adapter gradients are not vacuous.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..baselines import vanilla_masked_mlp
from ..reference.activations import Activation
from ..specs import SEED_BOUND, GatedMLPWeights, LinearWeights, MaskSpec
from .cases import OpCase

IMPL_NAMES = ("vanilla", "vanilla_compiled", "floor", "torch", "triton", "cuda")
BACKEND_IMPLS = ("torch", "triton", "cuda")


def dtype_of(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"dtype: expected a floating dtype name such as 'bfloat16', got {name!r}")
    return dt


def availability(name: str, device: torch.device) -> str | None:
    """None when implementation ``name`` can run on ``device``, else why not (recorded with the skip)."""
    if name not in IMPL_NAMES:
        raise ValueError(f"impls: expected names from {IMPL_NAMES}, got {name!r}")
    if name in BACKEND_IMPLS:
        try:
            ops.check_available(name)
        except RuntimeError as e:
            return str(e)
        if name != "torch" and device.type != "cuda":
            # On CPU tensors the Triton backend runs in Triton's interpreter: a correctness tool whose
            # speed means nothing (and takes minutes), so it is not benchmarked.
            return f"backend={name!r} is benchmarked on CUDA tensors only (on CPU it would run an interpreter)"
    return None


# ---- one case's weights --------------------------------------------------------------------------
@dataclass
class OpSetup:
    """The PEFT module of one case and our view of its tensors.

    lora_linear: ``module`` is a PEFT LoRA Linear (d -> n); ``weights`` a LinearWeights.
    gated_mlp: ``module`` is a transformers LlamaMLP with PEFT LoRA on gate/up/down; ``weights`` a
    GatedMLPWeights. ``params``: the trainable adapter tensors (A, B per projection), in a fixed order."""

    case: OpCase
    device: torch.device
    dtype: torch.dtype
    module: nn.Module
    weights: LinearWeights | GatedMLPWeights
    params: list[torch.Tensor]
    activation: Activation = Activation.SILU
    dropouts: list[nn.Module] = field(default_factory=list)  # PEFT dropout modules (for the numerics check)

    @property
    def mask(self) -> MaskSpec | None:
        return MaskSpec(self.case.masking) if self.case.masking > 0 else None

    def base_weights(self) -> list[torch.Tensor]:
        w = self.weights
        return [w.weight] if isinstance(w, LinearWeights) else [p.weight for p in w.projections]


def _randomize_lora(lora_layers, generator: torch.Generator) -> None:
    """Both factors uniform in +-1/sqrt(fan_in), drawn on CPU for reproducibility, so that the LoRA
    branch is of the same order as the base output and every gradient is informative."""
    with torch.no_grad():
        for layer in lora_layers:
            for lin in (layer.lora_A["default"], layer.lora_B["default"]):
                w = lin.weight
                bound = w.shape[1] ** -0.5
                w.copy_((torch.rand(w.shape, generator=generator) * 2 - 1) * bound)


def _read(layer) -> LinearWeights:
    from ..integration.projections import read_projection

    proj = read_projection(layer)
    if proj.weights is None:
        raise RuntimeError(f"benchmark setup: PEFT layer not readable by the fused path ({proj.reason})")
    return proj.weights


def _base_module(case: OpCase) -> nn.Module:
    holder = nn.Module()
    if case.op == "lora_linear":
        holder.proj = nn.Linear(case.d, case.n, bias=case.bias)
    elif case.op == "gated_mlp":
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        holder.mlp = LlamaMLP(LlamaConfig(hidden_size=case.d, intermediate_size=case.I, hidden_act="silu"))
    else:
        raise ValueError(f"op: expected 'lora_linear' or 'gated_mlp', got {case.op!r}")
    return holder


def build_setup(case: OpCase, device: torch.device, seed: int = 0) -> OpSetup:
    """Random weights for ``case`` on ``device``, in PEFT's default layout and dtypes."""
    from peft import LoraConfig, get_peft_model

    dtype = dtype_of(case.dtype)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear's own init
    with torch.device(device):  # initialise on the device: CPU init of 8B-model shapes takes seconds
        holder = _base_module(case)
    holder = holder.to(dtype=dtype)
    targets = ["proj"] if case.op == "lora_linear" else ["gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(holder, LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.lora_dropout,
                                                   target_modules=targets))
    peft_model.train()
    inner = peft_model.base_model.model
    layers = [inner.proj] if case.op == "lora_linear" else [getattr(inner.mlp, t) for t in targets]
    _randomize_lora(layers, gen)
    params = [t for layer in layers for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    dropouts = [layer.lora_dropout["default"] for layer in layers]
    if case.op == "lora_linear":
        return OpSetup(case, device, dtype, inner.proj, _read(inner.proj), params, dropouts=dropouts)
    lins = [_read(layer) for layer in layers]
    return OpSetup(case, device, dtype, inner.mlp, GatedMLPWeights((lins[0], lins[1]), lins[2]), params,
                   dropouts=dropouts)


@contextlib.contextmanager
def deterministic(setup: OpSetup):
    """Masking and LoRA dropout off for the vanilla implementations' numerics check (their masks come
    from torch.rand and cannot match the reference's Philox masks); restored afterwards."""
    saved = [d.p for d in setup.dropouts if isinstance(d, nn.Dropout)]
    try:
        for d in setup.dropouts:
            if isinstance(d, nn.Dropout):
                d.p = 0.0
        yield
    finally:
        for d, p in zip((d for d in setup.dropouts if isinstance(d, nn.Dropout)), saved):
            d.p = p


# ---- implementations -----------------------------------------------------------------------------
@dataclass
class Impl:
    """One implementation of a case.

    forward(x) -> y: the autograd forward (x (M, d) in the case dtype -> y (M, n or d)); None for the
    floor, which instead gives floor_fwd(x) and floor_bwd(dy) (its GEMMs only).
    check_forward(x): what the numerics check runs; ``check_random`` says whether it uses the case's
    masking and dropout (Philox paths) or runs with them off (vanilla paths, see ``deterministic``)."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor] | None
    check_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    check_random: bool = False
    floor_fwd: Callable[[torch.Tensor], object] | None = None
    floor_bwd: Callable[[torch.Tensor], object] | None = None
    compile_backend: str | None = None

    @property
    def is_floor(self) -> bool:
        return self.forward is None


def _vanilla_fns(setup: OpSetup):
    case = setup.case
    if case.op == "lora_linear":
        return setup.module, setup.module
    mlp, p = setup.module, case.masking

    def masked(x):
        return vanilla_masked_mlp(mlp, x, p)

    return masked, mlp  # with masking off the reference masking is the stock forward


def _fixed_seed(value: int = 1234) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


def _backend_fns(setup: OpSetup, name: str):
    backend = ops.resolve(name, setup.device)
    case = setup.case
    random = case.random

    def seed():  # drawn per forward on the input's device, as the patched MLP does
        return torch.randint(SEED_BOUND, (), dtype=torch.int64, device=setup.device) if random else None

    if case.op == "lora_linear":
        def fwd(x, s=None):
            return ops.lora_linear(x, setup.weights, seed() if s is None else s, backend)
    else:
        def fwd(x, s=None):
            return ops.masked_gated_mlp(x, setup.weights, setup.activation, setup.mask, seed() if s is None else s, backend)

    return fwd, (lambda x: fwd(x, _fixed_seed()))


def _floor_fns(setup: OpSetup):
    """Frozen base GEMMs only. lora_linear: y = x W^T (+b); dx = dy W.
    gated_mlp: g = x Wg^T, u = x Wu^T, y = g Wd^T (g stands in for h: same shape, same GEMM);
    backward: dh = dy Wd, dx = dh Wg + dh Wu (dh stands in for dg and du)."""
    w = setup.weights
    if isinstance(w, LinearWeights):
        return (lambda x: F.linear(x, w.weight, w.bias)), (lambda dy: dy @ w.weight)
    wg, wu, wd = (p.weight for p in w.projections)

    def fwd(x):
        g = F.linear(x, wg)
        u = F.linear(x, wu)
        return F.linear(g, wd), u

    def bwd(dy):
        dh = dy @ wd
        dx = dh @ wg
        return dx.addmm_(dh, wu)  # dx is ours: accumulating in place is safe

    return fwd, bwd


def build_impl(name: str, setup: OpSetup, compile_backend: str = "inductor") -> Impl:
    """Implementation ``name`` over ``setup``'s tensors. Backend names must be available (see availability)."""
    if name == "vanilla":
        fwd, check = _vanilla_fns(setup)
        return Impl(name, fwd, check)
    if name == "vanilla_compiled":
        fwd, check = _vanilla_fns(setup)
        return Impl(name, torch.compile(fwd, backend=compile_backend), torch.compile(check, backend=compile_backend),
                    compile_backend=compile_backend)
    if name == "floor":
        f, b = _floor_fns(setup)
        return Impl(name, None, floor_fwd=f, floor_bwd=b)
    if name in BACKEND_IMPLS:
        fwd, check = _backend_fns(setup, name)
        return Impl(name, fwd, check, check_random=True)
    raise ValueError(f"impls: expected names from {IMPL_NAMES}, got {name!r}")
