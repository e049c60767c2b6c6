"""Reductions over the token dimension: ``out = scale * P^T D(Q)`` and optionally ``colsum(P)``.

Shapes: P (T, A), Q (T, B) with arbitrary strides; out (A, B) with arbitrary strides (pass ``dA.t()``
to write a transposed result); colsum (A,). T is the token count (the long dimension).

    out[a, b]  = scale * sum_t cast(P[t, a]) * D(cast(Q[t, b]))
    D(q)[t, b] = q[t, b] * keep[t, b] * drop_scale,  keep = reference.keep_mask(seed, T, B, drop_p): lane b % 8
                 of tl.randint4x(seed, t * ceil(B / 8) + b // 8), a 16-bit value, >= keep_threshold(drop_p)
    colsum[a]  = sum_t P[t, a]                         (the bias gradient, fused into the dW pass)
cast() rounds to the dtype the reference multiplies in (DOT_DTYPE); accumulation is fp32. The
LoRA reductions (dA, dB: LORA_DOT) run on the tensor cores in the adapter's precision
(``_common.lora_dot_split``: tf32x3 for fp32 adapters, near fp32; the native 16-bit dot otherwise); the
base weight's dW keeps IEEE fp32 for an fp32 base, like torch's default matmul. With fp32 adapters an
operand stored in a 16-bit dtype (dY of dB, x of dA over a 16-bit base) is exact in tf32: two MMAs, not
three. Under dropout its mask then selects Q's values and drop_scale multiplies the sum (Q * drop_scale
would not be exact): one fp32 rounding of the sum where the reference rounds each product's operand.

Gradients of a LoRA linear (t = dY B, S = dropout_q(x) A^T):
    dW = dY^T x            P = dY, Q = x                     (+ db = colsum(dY))
    dB = s dY^T S          P = dY, Q = S
    dA = s t^T dropout(x)  P = t,  Q = x, D = the forward's dropout mask
Deterministic: each program owns one output tile of one token split; with several splits (to fill
the GPU when A x B is small), fp32 partials go to a (splits, A, B) buffer summed in a fixed order
afterwards. No atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, direct_launch, plans
from .split_sum import split_sum
from ...reference.philox import keep_threshold
from ._common import (cast_like, cdiv, check_2d, check_out, check_same_device, dot_operand, dtype_code, lora_dot_code, lora_dot_split,
                      philox_keep, pow2_at_least, rounded_to, seed_on, upcast_dots, DTYPE_CODES)


@triton.jit(do_not_specialize=["drop_threshold"])
def token_reduce_kernel(
    p_ptr, q_ptr, out_ptr, colsum_ptr, seed_ptr,
    T, A, B, tokens_per_split,
    stride_pt, stride_pa, stride_qt, stride_qb, stride_os, stride_oa, stride_ob, stride_cs, stride_ca,
    scale, drop_threshold, drop_scale,
    Q_DROPOUT: tl.constexpr, HAS_COLSUM: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    LORA_DOT: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    tiles_b = tl.cdiv(B, BLOCK_B)
    pid_a = tl.program_id(0) // tiles_b
    pid_b = tl.program_id(0) % tiles_b
    split = tl.program_id(1)
    a_idx = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    b_idx = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    a_ok = a_idx < A
    b_ok = b_idx < B
    a64 = a_idx.to(tl.int64)
    b64 = b_idx.to(tl.int64)
    t_start = split * tokens_per_split
    t_stop = tl.minimum(T, t_start + tokens_per_split)
    if Q_DROPOUT:
        seed = tl.load(seed_ptr)
    # fp32 LoRA dots with an operand stored in a 16-bit dtype: exact in tf32 (module docstring)
    P_EXACT: tl.constexpr = LORA_DOT and (DOT_DTYPE == 0 or DOT_DTYPE == 3) and p_ptr.dtype.element_ty != tl.float32
    Q_EXACT: tl.constexpr = LORA_DOT and (DOT_DTYPE == 0 or DOT_DTYPE == 3) and q_ptr.dtype.element_ty != tl.float32
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    csum = tl.zeros((BLOCK_A,), dtype=tl.float32)
    for t0 in range(t_start, t_stop, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < t_stop
        t64 = ts.to(tl.int64)
        pt = tl.load(p_ptr + a64[:, None] * stride_pa + t64[None, :] * stride_pt,
                     mask=a_ok[:, None] & t_ok[None, :], other=0.0)  # P^T tile (BLOCK_A, BLOCK_T)
        q = tl.load(q_ptr + t64[:, None] * stride_qt + b64[None, :] * stride_qb,
                    mask=t_ok[:, None] & b_ok[None, :], other=0.0)
        q = dot_operand(q, DOT_DTYPE, False)
        if Q_DROPOUT:
            keep = philox_keep(seed, ts, pid_b * BLOCK_B, B, drop_threshold, BLOCK_B)
            if Q_EXACT:  # drop_scale after the sum
                q = tl.where(keep, q, 0.0)
            else:
                q = dot_operand(tl.where(keep, q.to(tl.float32) * drop_scale, 0.0), DOT_DTYPE, False)
        if HAS_COLSUM:
            if pid_b == 0:
                csum += tl.sum(pt.to(tl.float32), axis=1)
        if LORA_DOT:
            acc = lora_dot_split(dot_operand(pt, DOT_DTYPE, UPCAST), dot_operand(q, DOT_DTYPE, UPCAST), acc, DOT_DTYPE,
                                 UPCAST, P_EXACT, Q_EXACT)
        else:
            acc += tl.dot(dot_operand(pt, DOT_DTYPE, UPCAST), dot_operand(q, DOT_DTYPE, UPCAST),
                          input_precision="ieee")
    if Q_EXACT and Q_DROPOUT:
        acc = acc * drop_scale
    out = out_ptr + split.to(tl.int64) * stride_os + a64[:, None] * stride_oa + b64[None, :] * stride_ob
    tl.store(out, cast_like(acc * scale, out_ptr), mask=a_ok[:, None] & b_ok[None, :])
    if HAS_COLSUM:
        if pid_b == 0:
            tl.store(colsum_ptr + split.to(tl.int64) * stride_cs + a64 * stride_ca, cast_like(csum, colsum_ptr), mask=a_ok)


_PLANS = plans.plan_cache("token_reduce")


def token_reduce(p: torch.Tensor, q: torch.Tensor, out_dtype: torch.dtype, dot_dtype: torch.dtype,
                 scale: float = 1.0, dropout: float = 0.0, seed: torch.Tensor | None = None,
                 colsum_dtype: torch.dtype | None = None, transpose_out: bool = False,
                 splits: int | None = None, out: torch.Tensor | None = None, lora: bool = True):
    """(scale * p^T D(q), colsum(p) or None). p (T, A), q (T, B); out (A, B) in ``out_dtype``, or
    (B, A) holding the transposed product when ``transpose_out``. Operands are rounded to
    ``dot_dtype`` before the product (the reference's adapter or base dtype); fp32 accumulation.
    ``colsum_dtype``: also return sum over tokens of p, in that dtype. ``splits``: token splits
    (None: chosen from the device; any value gives the same result up to fp32 summation order).
    ``out``: optional tensor of the result's shape and dtype to write into (must not alias p or q).
    ``lora``: a LoRA gradient (dA, dB), whose fp32 product runs on the tensor cores as tf32x3 (or one
    tf32 product under torch's "high" fp32 matmul precision, ``_common.lora_code``); False for the base
    weight's dW, which keeps IEEE fp32 for fp32 operands."""
    key = (plans.signature(p), plans.signature(q), out_dtype, dot_dtype, dropout, seed is None, colsum_dtype,
           transpose_out, splits, plans.signature(out), bool(lora), plans.tuning_state())
    plan = _PLANS.get(key, lambda: _plan(p, q, out_dtype, dot_dtype, scale, dropout, seed, colsum_dtype,
                                         transpose_out, splits, out, lora))
    device, A, B = p.device, p.shape[1], q.shape[1]
    shape = (B, A) if transpose_out else (A, B)
    if plan.empty:
        res = torch.zeros(shape, dtype=out_dtype, device=device) if out is None else out.zero_()
        return res, (torch.zeros(A, dtype=colsum_dtype, device=device) if colsum_dtype else None)
    res, cs, part, cpart = _buffers(shape, plan.n_splits, A, out_dtype, colsum_dtype, out, device)
    _run(plan, p, q, part, cpart, seed_on(seed, device) if dropout > 0 else p, scale, transpose_out)
    if plan.n_splits == 1:
        return res, cs
    # fixed-order sum of the fp32 partials and the cast in one launch (split_sum): deterministic, no atomics
    if out is not None and not out.is_contiguous():  # a strided out: summed, then copied in
        total = out.copy_(split_sum(part, torch.float32))
    else:
        total = split_sum(part, out_dtype, out)
    return total, None if cpart is None else split_sum(cpart, colsum_dtype)


def _buffers(shape, n_splits, A, out_dtype, colsum_dtype, out, device):
    """(result, colsum, what the kernel writes, its colsum): the result itself with one split, else
    fp32 partials (n_splits, *shape) to be summed."""
    if n_splits == 1:
        res = torch.empty(shape, dtype=out_dtype, device=device) if out is None else out
        cs = torch.empty(A, dtype=colsum_dtype, device=device) if colsum_dtype else None
        return res, cs, res.unsqueeze(0), None if cs is None else cs.unsqueeze(0)
    part = torch.empty((n_splits, *shape), dtype=torch.float32, device=device)
    cpart = torch.empty((n_splits, A), dtype=torch.float32, device=device) if colsum_dtype else None
    return None, None, part, cpart


def _run(plan: plans.LaunchPlan, p, q, part, cpart, seed_t, scale, transpose_out) -> None:
    """One launch writing ``part`` (and ``cpart``). ``plan.head``: the arguments between the five pointers
    and the output strides, which are read here (``out``'s vary with the caller); then the scale."""
    so, s1, s2 = part.stride()
    soa, sob = (s2, s1) if transpose_out else (s1, s2)
    cs = cpart.stride() if cpart is not None else (0, 0)
    direct_launch.launch(token_reduce_kernel, plan, (p, q, part, cpart if cpart is not None else part, seed_t),
                         (so, soa, sob, *cs, float(scale)))


def _plan(p, q, out_dtype, dot_dtype, scale, dropout, seed, colsum_dtype, transpose_out, splits, out,
          lora) -> plans.LaunchPlan:
    check_2d(p, "p")
    check_2d(q, "q")
    dtype_code(p, "p")
    dtype_code(q, "q")
    if dot_dtype not in DTYPE_CODES:
        raise TypeError(f"dot_dtype: expected float32, float16 or bfloat16, got {dot_dtype}")
    if p.shape[0] != q.shape[0]:
        raise ValueError(f"q: expected {p.shape[0]} rows (tokens) like p, got shape {tuple(q.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
    if dropout > 0 and seed is None:
        raise ValueError("seed: required when dropout > 0")
    device = check_same_device(p=p, q=q)
    T, A = p.shape
    B = q.shape[1]
    shape = (B, A) if transpose_out else (A, B)
    check_out(out, shape, out_dtype)
    has_drop = dropout > 0
    if T == 0 or A == 0 or B == 0:
        return plans.NOTHING
    drop_scale = rounded_to(1.0 / (1.0 - dropout), dot_dtype) if has_drop else 1.0
    elem = torch.empty((), dtype=dot_dtype).element_size()
    # a LoRA gradient's fp32 dot follows torch's fp32 matmul precision (_common.lora_code); dW stays IEEE
    dot_code = lora_dot_code(DTYPE_CODES[dot_dtype]) if lora else DTYPE_CODES[dot_dtype]

    def plan_for(config, n_splits) -> plans.LaunchPlan:
        m = config.kwargs()
        # A rank-sized side gets one block of exactly its (padded) width: no wasted tiles.
        if A <= 64:
            m["BLOCK_A"] = pow2_at_least(A)
        if B <= 64:
            m["BLOCK_B"] = pow2_at_least(B)
        tiles = cdiv(A, m["BLOCK_A"]) * cdiv(B, m["BLOCK_B"])
        if n_splits is None:
            n_splits = configs.token_splits(tiles, T, m["BLOCK_T"], device)
        per_split = cdiv(cdiv(T, n_splits), m["BLOCK_T"]) * m["BLOCK_T"]
        n_splits = cdiv(T, per_split)
        return plans.LaunchPlan(
            (tiles, n_splits), (T, A, B, per_split, p.stride(0), p.stride(1), q.stride(0), q.stride(1)),
            (keep_threshold(dropout) if has_drop else 0, drop_scale),
            dict(Q_DROPOUT=has_drop, HAS_COLSUM=colsum_dtype is not None, DOT_DTYPE=dot_code,
                 UPCAST=upcast_dots(), LORA_DOT=bool(lora), num_warps=config.num_warps,
                 num_stages=config.num_stages, **m),
            n_splits)

    def launch(config):  # what the tuner times (it writes only fresh partials or ``out``)
        pl = plan_for(config, splits)
        _, _, part, cpart = _buffers(shape, pl.n_splits, A, out_dtype, colsum_dtype, out, device)
        _run(pl, p, q, part, cpart, seed_on(seed, device) if has_drop else p, scale, transpose_out)

    key = ("token_reduce", configs.bucket(T), A, B, p.dtype, q.dtype, dot_dtype, has_drop, colsum_dtype,
           transpose_out, configs.layout_key(p, q), bool(lora), dot_code)
    return plan_for(configs.choose(configs.TOKEN_REDUCE, device, key, elem, launch), splits)
