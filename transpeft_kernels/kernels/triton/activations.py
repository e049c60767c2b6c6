"""Gated-FFN activations in fp32 for the Triton kernels (formulas: reference/activations.py).

ACT codes (constexpr; the table is launch_args.ACT_CODES): 0 silu, 1 gelu (erf), 2 gelu (tanh approximation).
tanh is written as 2 sigmoid(2z) - 1 so that no libdevice entry point is needed (the name of the
libdevice module differs between the supported Triton versions).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Constants are written inline as literals: compiled kernels may read only constexpr globals, and the
# interpreter mishandles a constexpr global on the left of a tensor product.
#   1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327,
#   sqrt(2/pi) = 0.7978845608028654, tanh-approximation cubic coefficient 0.044715


@triton.jit
def _sigmoid(z):
    """1 / (1 + e^-z) through e^-|z|, which never overflows."""
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def act_fwd(g, ACT: tl.constexpr):
    """act(g) for an fp32 block."""
    if ACT == 0:
        y = g * _sigmoid(g)
    elif ACT == 1:
        y = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        t = 2.0 * _sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)) - 1.0
        y = 0.5 * g * (1.0 + t)
    return y


@triton.jit
def act_fwd_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) for an fp32 block, sharing the transcendental work."""
    if ACT == 0:
        s = _sigmoid(g)
        y = g * s
        dy = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        y = g * cdf
        dy = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    else:
        g2 = g * g
        t = 2.0 * _sigmoid(2.0 * 0.7978845608028654 * g * (1.0 + 0.044715 * g2)) - 1.0
        y = 0.5 * g * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g2)
    return y, dy
