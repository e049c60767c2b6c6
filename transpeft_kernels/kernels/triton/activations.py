"""Gated-FFN activations in fp32 for the Triton kernels (formulas: reference/activations.py).

ACT codes (constexpr; the table is launch_args.ACT_CODES): 0 silu, 1 gelu (erf), 2 gelu (tanh approximation).

Everything but gelu (erf) goes through one sigmoid, and the tanh form is rewritten through it:
tanh(z) = 2 sigmoid(2z) - 1, so with s = sigmoid(2 c (g + 0.044715 g^3)), c = sqrt(2/pi),

    gelu_tanh(g)  = 0.5 g (1 + t) = g s
    gelu_tanh'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 0.044715 g^2) = s (1 + 2 c g (1 - s) (1 + 0.134145 g^2))

(1 + t = 2 s, 1 - t^2 = 4 s (1 - s)): the same function, fewer operations, and no cancellation in 1 + t
for negative g. The sigmoid is 1 / (1 + 2^(-z log2 e)) with the MUFU unit's approximate ex2 and rcp
(ex2.approx.ftz.f32, rcp.approx.ftz.f32: <= 2 ulp each, the accuracy of the ``tl.exp`` / ``/``
lowering they replace) and no select on the sign of z: for z < -88 the power overflows to +inf and
the sigmoid is 0, within 2^-126 of the true value, and subnormal intermediates flush to zero. That
drops what the default lowering wraps around both MUFU calls to keep subnormal results (a compare and
two predicated multiplies each) and the sign select of the overflow-free form: 4 instructions per
sigmoid instead of 13 (SASS, sm_90). The interpreter computes the same formulas with exp2 and a true
division.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import _INTERPRETED

# Constants are written inline as literals: compiled kernels may read only constexpr globals, and the
# interpreter mishandles a constexpr global on the left of a tensor product.
#   1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327, log2(e) = 1.4426950408889634,
#   2 sqrt(2/pi) = 1.5957691216057308 (x 0.044715 = 0.07135481627260025), tanh-approximation cubic
#   coefficient 0.044715 (x 3 = 0.134145)


@triton.jit
def _exp2_ftz(x):
    """2^x: MUFU ex2 with subnormal results flushed to zero, +inf past 2^127. The interpreter computes
    numpy's exp2 on x capped at 127 (no overflow warning) and gives +inf above, as the hardware does, so
    that g * sigmoid(g) is -0, not g * 2^-127, for very negative g."""
    if _INTERPRETED:
        y = tl.where(x > 127.0, float("inf"), tl.exp2(tl.minimum(x, 127.0)))
    else:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return y


@triton.jit
def _rcp_ftz(x):
    """1 / x: MUFU rcp (the interpreter: a division)."""
    if _INTERPRETED:
        y = 1.0 / x
    else:
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return y


@triton.jit
def _sigmoid(z):
    """1 / (1 + e^-z). For z < -88, e^-z overflows to +inf and the result is 0, within 2^-126 of the
    true value; no branch or select on the sign of z."""
    return _rcp_ftz(1.0 + _exp2_ftz(z * -1.4426950408889634))


@triton.jit
def _gelu_tanh_sigmoid(g):
    """s = sigmoid(2 c (g + 0.044715 g^3)) = (1 + tanh(c (g + 0.044715 g^3))) / 2."""
    return _sigmoid(g * (1.5957691216057308 + 0.07135481627260025 * (g * g)))


@triton.jit
def act_fwd(g, ACT: tl.constexpr):
    """act(g) for an fp32 block."""
    if ACT == 0:
        y = g * _sigmoid(g)
    elif ACT == 1:
        y = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        y = g * _gelu_tanh_sigmoid(g)
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
        s = _gelu_tanh_sigmoid(g)
        y = g * s
        # s + s (1 - s) 2 c g (1 + 3 0.044715 g^2), with s (1 - s) applied to g before the cubic factor:
        # for large |g| s (1 - s) is exactly 0, and 0 * g stays 0 where 2 c g (1 + ...) would overflow
        # (|g| > 1.2e13; inf * 0 = NaN). Finite while g^2 is (|g| < 1.8e19).
        dy = s + ((s * (1.0 - s)) * g) * (1.5957691216057308 + 0.21406444881780073 * (g * g))
    return y, dy
