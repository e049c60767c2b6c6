"""The numerics check run before any implementation is timed.

Same inputs for the implementation and the reference (``reference.lora_linear`` / ``reference.gated_mlp``
evaluated in float32 on float32 copies of the same tensors, with full-fp32 matmuls also in the TF32 cases): the output and the gradients with respect
to x and every LoRA factor are compared by normwise relative error ``||a - ref|| / ||ref||``, which stays
meaningful at large shapes where elementwise tolerances either explode or must be made absurd.
Philox implementations are checked with the case's masking and LoRA dropout (same seed, hence the
same masks); vanilla ones with both off (their torch.rand masks cannot match; see impls.deterministic).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.env import cuda_fp32_matmul
from ..reference import lora as ref_lora
from ..reference import mlp as ref_mlp
from ..specs import GatedMLPWeights, LinearWeights, LoraWeights, MaskSpec
from .impls import Impl, OpSetup, _fixed_seed, deterministic

# Normwise relative error allowed against the float32 reference, by the dtype the implementation runs in.
# bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 0.002); a few roundings in a chain stay well below 1%.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float64: 1e-10}


class NumericsMismatch(AssertionError):
    """An implementation disagrees with the reference: its timings would be meaningless."""


@dataclass(frozen=True)
class CheckResult:
    max_rel_err: float
    worst: str  # which tensor had it ("y", "dx", "dA0", ...)
    mode: str  # "case settings" or "masking and lora dropout off"
    tokens: int


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref||_2 / ||ref||_2 in float64 (0 when both are zero)."""
    a64, r64 = a.detach().double(), ref.detach().double()
    denom = r64.norm().item()
    diff = (a64 - r64).norm().item()
    return diff / denom if denom > 0 else diff


def _f32(t):
    return None if t is None else t.detach().float().requires_grad_(t.requires_grad)


def _lin32(lin: LinearWeights, q: float) -> LinearWeights:
    lora = lin.lora
    lora32 = None if lora is None else LoraWeights(_f32(lora.A), _f32(lora.B), lora.scaling, q)
    return LinearWeights(_f32(lin.weight), _f32(lin.bias), lora32)


def _reference(setup: OpSetup, x: torch.Tensor, use_case_random: bool):
    """(y, [x, A0, B0, A1, ...] leaves) of the float32 reference."""
    case = setup.case
    q = case.lora_dropout if use_case_random else 0.0
    x32 = x.detach().float().requires_grad_(True)
    seed = _fixed_seed()
    w = setup.weights
    if isinstance(w, LinearWeights):
        lin = _lin32(w, q)
        y = ref_lora.lora_linear(x32, lin, seed)
        lins = [lin]
    else:
        lins = [_lin32(p, q) for p in w.projections]
        mask = MaskSpec(case.masking) if use_case_random and case.masking > 0 else None
        y = ref_mlp.gated_mlp(x32, GatedMLPWeights((lins[0], lins[1]), lins[2]), setup.activation, mask, seed)
    leaves = [x32] + [t for lin in lins for t in (lin.lora.A, lin.lora.B)]
    return y, leaves


def check(impl: Impl, setup: OpSetup, tokens: int, seed: int = 0) -> CheckResult:
    """Compare ``impl`` with the reference on ``tokens`` rows; raise NumericsMismatch beyond TOLERANCE."""
    if impl.is_floor:
        raise ValueError("impl: the floor computes a different function and has no numerics check")
    case = setup.case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, case.d, generator=gen).to(setup.device, setup.dtype).requires_grad_(True)
    with cuda_fp32_matmul("ieee"):  # the spec in full fp32, also in the benchmark's TF32 cases
        y_ref, ref_leaves = _reference(setup, x, impl.check_random)
    dy = torch.randn(y_ref.shape, generator=gen).to(setup.device, setup.dtype)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.float())

    if impl.check_random:
        y = impl.check_forward(x)
    else:
        with deterministic(setup):
            y = impl.check_forward(x)
    grads = torch.autograd.grad(y, [x, *setup.params], dy)

    names = ["y", "dx"] + [f"d{f}{i}" for i in range(len(setup.params) // 2) for f in ("A", "B")]
    errs = [rel_err(y, y_ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    worst = max(range(len(errs)), key=errs.__getitem__)
    mode = "case settings" if impl.check_random else "masking and lora dropout off"
    tol = TOLERANCE[setup.dtype]
    if not all(e <= tol for e in errs):  # also catches NaN
        detail = ", ".join(f"{n}={e:.3g}" for n, e in zip(names, errs))
        raise NumericsMismatch(f"{impl.name} on {case.key}: relative error against the reference above {tol:g} "
                               f"({mode}): {detail}")
    return CheckResult(errs[worst], names[worst], mode, tokens)
