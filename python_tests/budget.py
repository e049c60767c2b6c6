"""Error budgets against float64: how far a result computed in a working precision may be from the
exact (float64) result, derived from the arithmetic and never from what one host produced.

CPU hosts differ in BLAS kernels, libm and SIMD dispatch (AVX-512, AVX2, scalar), so the last bits of
an fp32 result differ between hosts. A fixed atol tuned on one host fails on another. Instead every
comparison here is anchored to float64:

    err(x)  = max |x - exact|                            (normwise, over the whole tensor)
    budget  = 3 * err(reference in the same dtype)       (the problem's conditioning, as seen on this host)
            + (depth * u_acc + u_out) * max |exact|      (a floor: the worst-case rounding of a chain of
                                                          `depth` accumulations in fp32, plus one
                                                          rounding of the output to its dtype)

where u is the unit roundoff (2^-24 for fp32, 2^-8 bf16, 2^-11 fp16, 2^-53 fp64) and u_acc is that of
the accumulator: fp32 for fp32/bf16/fp16 work (every kernel accumulates in fp32), fp64 for fp64.
`depth` is the longest chain of sums an output element goes through (reduction lengths of the
forward and backward products added up); callers derive it from their shapes.

Tensor-core fp32 dots: the Triton kernels run every fp32 LoRA dot (fp32 adapters, PEFT's default) as
tf32x3 (kernels/triton/_common.lora_dot): a = a_big + a_small with a_big rounded to tf32 (|a - a_big| <=
2^-11 |a|), a_small read by the MMA with 10 mantissa bits (<= 2^-10 |a_small| <= 2^-21 |a|), and the
a_small b_small term dropped (<= 2^-22 |a b|). Each product then carries up to TF32X3_ROUNDOFF =
2.5 * 2^-21 |a b| before the fp32 accumulation: one more roundoff per step of the chain, for the
``tf32x3_depth`` steps that go through such dots (0 where every dot is IEEE fp32 or 16-bit):

    floor   = (depth * u_acc + tf32x3_depth * TF32X3_ROUNDOFF + roundings * u_out) * max |exact|

The interpreter (the CPU tests) does the same split (it ignores input_precision otherwise), so the
tests see that error, not the IEEE one. The CUDA tile kernels (csrc/include/transpeft/tile_mma.cuh) split the same way except
that a_small is left for the MMA to truncate (<= 2^-21 |a|): 2.25 * 2^-21 per product, inside the same bound.

Under torch's "high" or "medium" fp32 matmul precision the fp32-adapter LoRA dots are single tf32
products instead (``_common.fp32_lora_precision``): each operand read with 10 mantissa bits (truncated:
<= 2^-10 |a|), so a product carries up to TF32_ROUNDOFF = (2 * 2^-10 + 2^-20) |a b|, passed as
``product_roundoff`` with the same ``tf32x3_depth`` steps.

The first term scales with whatever the host's libraries do to the reference, so a kernel is judged
against the same host's rounding; the factor 3 leaves room for a different (blocked, fused) order of
the same sums. The floor covers outputs whose reference error happens to be ~0. A real defect (a wrong
mask bit, a missing scale, a wrong gradient term) is O(|exact|), orders of magnitude over the budget.
"""
from __future__ import annotations

import torch

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


# per-product error bound of a tf32x3 dot (3 tf32 MMAs), relative to |a b|; see the module docstring
TF32X3_ROUNDOFF = 2.5 * 2.0**-21
# the same for one tf32 MMA of fp32 operands (torch's "high" fp32 matmul precision)
TF32_ROUNDOFF = 2 * 2.0**-10 + 2.0**-20


def accumulator_roundoff(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]


def floor(dtype: torch.dtype, depth: int, scale: float, roundings: int = 1, tf32x3_depth: int = 0,
          product_roundoff: float = TF32X3_ROUNDOFF) -> float:
    """The rounding-only part of the budget for a result of magnitude ``scale``: ``depth``
    accumulations in the accumulator's precision, ``tf32x3_depth`` of them fed by tensor-core fp32
    products (``product_roundoff`` each: TF32X3_ROUNDOFF, or TF32_ROUNDOFF for single tf32 products),
    and ``roundings`` roundings to ``dtype`` itself (an intermediate stored in dtype, e.g. act(g)
    before the product with u, is one more)."""
    return (depth * accumulator_roundoff(dtype) + tf32x3_depth * product_roundoff
            + roundings * UNIT_ROUNDOFF[dtype]) * scale


def max_err(x: torch.Tensor, exact: torch.Tensor) -> float:
    return (x.double() - exact.double()).abs().max().item() if x.numel() else 0.0


def assert_within_budget(ours: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                         depth: int, what: str = "", tf32x3_depth: int = 0,
                         product_roundoff: float = TF32X3_ROUNDOFF) -> None:
    """``ours`` and ``ref`` (the reference run in ``dtype``) against ``exact`` (the reference in float64).
    ``tf32x3_depth``: the steps of the chain that go through tensor-core fp32 dots in ``ours``, each
    product within ``product_roundoff`` (see ``floor``)."""
    assert ours.shape == exact.shape, (what, tuple(ours.shape), tuple(exact.shape))
    if exact.numel() == 0:
        return
    scale = exact.double().abs().max().item()
    err_ours, err_ref = max_err(ours, exact), max_err(ref, exact)
    allowed = 3 * err_ref + floor(dtype, depth, scale, tf32x3_depth=tf32x3_depth, product_roundoff=product_roundoff) + 1e-300
    assert err_ours <= allowed, (
        f"{what}: error against float64 {err_ours:.3e} over the budget {allowed:.3e} "
        f"(reference in {dtype}: {err_ref:.3e}; max|exact| {scale:.3e}; depth {depth})")


def assert_close_to_exact(ours: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, depth: int,
                          what: str = "", roundings: int = 1, min_scale: float = 0.0,
                          tf32x3_depth: int = 0, product_roundoff: float = TF32X3_ROUNDOFF) -> None:
    """``ours`` against float64 when no same-dtype reference exists: the floor alone (a pure rounding
    budget), for computations with no cancellation-prone sums (elementwise math, short chains)."""
    assert ours.shape == exact.shape, (what, tuple(ours.shape), tuple(exact.shape))
    if exact.numel() == 0:
        return
    scale = max(exact.double().abs().max().item(), min_scale)
    err, allowed = max_err(ours, exact), floor(dtype, depth, scale, roundings, tf32x3_depth, product_roundoff)
    assert err <= allowed, f"{what}: error against float64 {err:.3e} over the rounding budget {allowed:.3e} (depth {depth})"
