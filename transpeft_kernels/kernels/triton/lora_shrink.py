"""LoRA shrink with fused dropout: ``S = dropout_q(cast(X)) A^T`` — and, with q = 0, ``t = dY B``.

Shapes: X (M, K) any strides; A (R, K) any strides (pass ``B.t()`` to compute t = dY B); S (M, R).
    xd[m, k] = cast(X[m, k]) * keep[m, k] * scale,   keep = reference.keep_mask(seed, M, K, q): lane k % 8
               of tl.randint4x(seed, m * ceil(K / 8) + k // 8), a 16-bit value, >= keep_threshold(q)
    S[m, r]  = sum_k xd[m, k] A[r, k]                (fp32 accumulation, stored in S's dtype)
cast() rounds X to the adapter dtype first (PEFT casts x to the LoRA dtype), scale = 1/(1-q) rounded
to that dtype, so the dropped input is bit-identical to ``reference.lora_dropout``. The mask is
regenerated from (seed, row, column), never stored.

The product runs on the tensor cores (``_common.lora_dot_split``): the native 16-bit dot for bf16/fp16
adapters, tf32x3 for fp32 adapters (near fp32: each product within 2.5 * 2^-21 |x a|; bf16 operands
would lose 2^-8 against the reference's fp32 math). Until then the shrink with fp32 A ran as "ieee"
FFMA (1024 per thread per K step, 255 registers and spills with dropout on sm_90).
X_EXACT, fp32 adapters over a 16-bit X (every shrink of the gated MLP: x, h', dY, dg, du): X's values
are exact in tf32, so the product takes two MMAs, not three, and X is not split. With dropout the
mask selects X's values and the scale multiplies the sum instead of each element (X * scale would not
be exact): S = scale * sum_k keep X A^T, one fp32 rounding of the sum where the reference rounds each
X * scale (<= 2^-24 relative; the tests' budget is the tf32x3 one, 2^-21 per product). The same with
single tf32 products (torch's "high" precision, code 3): X stays exact, only A is read with 10 bits.

One program owns BLOCK_M rows and one BLOCK_R-wide slice of the rank and loops over K.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, direct_launch, plans
from ...reference.philox import keep_threshold
from ._common import (cast_like, cdiv, check_2d, check_out, check_same_device, dot_operand, dtype_code, lora_code, lora_dot_split,
                      philox_keep, pow2_at_least, rounded_to, seed_on, upcast_dots)


@triton.jit(do_not_specialize=["drop_threshold"])
def lora_shrink_kernel(
    x_ptr, a_ptr, s_ptr, seed_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    drop_threshold, drop_scale,
    HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = ranks < R
    r64 = rows.to(tl.int64)
    # fp32 adapters (tf32x3) keep the big and small tf32 parts of each x tile in registers, twice a
    # 16-bit tile's footprint: they step at most 64 columns of K at a time (BLOCK_K 128 spilled on sm_90);
    # as single tf32 products (code 3) they keep the same step
    STEP_K: tl.constexpr = 64 if ((DOT_DTYPE == 0 or DOT_DTYPE == 3) and BLOCK_K > 64) else BLOCK_K
    # fp32 adapters (tf32x3 or single tf32) over a 16-bit x: module docstring
    X_EXACT: tl.constexpr = (DOT_DTYPE == 0 or DOT_DTYPE == 3) and x_ptr.dtype.element_ty != tl.float32
    k_idx = tl.arange(0, STEP_K)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, STEP_K):
        ks = k0 + k_idx
        k_ok = ks < K
        k64 = ks.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * stride_xm + k64[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x = dot_operand(x, DOT_DTYPE, False)  # round to the adapter dtype first, as PEFT's cast does
        if HAS_DROPOUT:
            keep = philox_keep(seed, rows, k0, K, drop_threshold, STEP_K)
            if X_EXACT:  # the scale after the sum, so that x stays exact in tf32
                x = tl.where(keep, x, 0.0)
            else:
                x = dot_operand(tl.where(keep, x.to(tl.float32) * drop_scale, 0.0), DOT_DTYPE, False)
        # A^T tile (BLOCK_K, BLOCK_R), read straight from A's strides
        a = tl.load(a_ptr + ranks.to(tl.int64)[None, :] * stride_ar + k64[:, None] * stride_ak,
                    mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = lora_dot_split(dot_operand(x, DOT_DTYPE, UPCAST), dot_operand(a, DOT_DTYPE, UPCAST), acc, DOT_DTYPE,
                             UPCAST, X_EXACT, False)
    if X_EXACT and HAS_DROPOUT:
        acc = acc * drop_scale
    tl.store(s_ptr + r64[:, None] * stride_sm + ranks.to(tl.int64)[None, :] * stride_sr,
             cast_like(acc, s_ptr), mask=row_ok[:, None] & rank_ok[None, :])


def block_r(R: int) -> int:
    """Rank slice per program: the whole rank up to 64 (one pass over X), 64-wide slices beyond."""
    return min(64, pow2_at_least(R))


_PLANS = plans.plan_cache("lora_shrink")


def lora_shrink(x: torch.Tensor, a: torch.Tensor, dropout: float = 0.0, seed: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """S = dropout_q(cast_a(x)) a^T: x (M, K), a (R, K) -> S (M, R) in ``out_dtype`` (default a's dtype).

    x is cast to a's dtype before dropout and the product (PEFT's adapter-dtype semantics).
    ``seed``: the projection's Philox stream key (int64 tensor), required when dropout > 0.
    ``out``: optional (M, R) tensor to write into (must not alias an input).
    """
    key = (plans.signature(x), plans.signature(a), dropout, seed is None, out_dtype, plans.signature(out),
           plans.tuning_state())
    plan = _PLANS.get(key, lambda: _plan(x, a, dropout, seed, out_dtype, out))
    s = torch.empty((x.shape[0], a.shape[0]), dtype=out_dtype or a.dtype, device=x.device) if out is None else out
    if plan.empty:  # an empty side, or K == 0: zeros
        return s.zero_() if s.numel() else s
    seed_t = seed_on(seed, x.device) if dropout > 0 else x
    direct_launch.launch(lora_shrink_kernel, plan, (x, a, s, seed_t))
    return s


def _plan(x, a, dropout, seed, out_dtype, out) -> plans.LaunchPlan:
    check_2d(x, "x")
    check_2d(a, "a")
    dtype_code(x, "x")
    code = lora_code(a, "a")
    if a.shape[1] != x.shape[1]:
        raise ValueError(f"a: expected {x.shape[1]} columns to match x (M, K), got shape {tuple(a.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
    if dropout > 0 and seed is None:
        raise ValueError("seed: required when dropout > 0")
    device = check_same_device(x=x, a=a)
    M, K = x.shape
    R = a.shape[0]
    shape, dtype = (M, R), out_dtype or a.dtype
    check_out(out, shape, dtype)
    has_drop = dropout > 0
    if M == 0 or R == 0 or K == 0:
        return plans.NOTHING
    s = torch.empty(shape, dtype=dtype, device=device) if out is None else out  # what the tuner writes
    scale = rounded_to(1.0 / (1.0 - dropout), a.dtype) if has_drop else 1.0
    br = block_r(R)

    def plan_for(config) -> plans.LaunchPlan:  # head: every argument after the four pointers
        return plans.LaunchPlan((cdiv(M, config["BLOCK_M"]), cdiv(R, br)),
                                (M, K, R, x.stride(0), x.stride(1), a.stride(0), a.stride(1), s.stride(0), s.stride(1),
                                 keep_threshold(dropout) if has_drop else 0, scale),
                                meta=dict(HAS_DROPOUT=has_drop, DOT_DTYPE=code, UPCAST=upcast_dots(), BLOCK_R=br,
                                          num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs()))

    def launch(config):
        pl = plan_for(config)
        lora_shrink_kernel[pl.grid](x, a, s, seed_on(seed, device) if has_drop else x, *pl.head, **pl.meta)

    key = ("shrink", configs.bucket(M), K, R, x.dtype, a.dtype, code, has_drop, configs.layout_key(x, a))
    return plan_for(configs.choose(configs.SHRINK, device, key, a.element_size(), launch))
