"""LoRA expands (and the masked activation) as passes over the output of a cuBLAS GEMM, for the
"cublas" base-GEMM mode of the Triton backend (ops/triton_backend.py): the base product stays with
cuBLAS, which a Triton GEMM matches at about 0.85 (perf/roofline.TRITON_GEMM_VS_CUBLAS), and the rank-sized
work reads and rewrites its output once.

    lora_expand_add    y <- round_y(y + s D_q(S B^T))        in place; y (M, N) in the base dtype,
                                                             S (M, r) and B (N, r) in the adapter dtype,
                                                             D_q the keep mask of width N and 1/(1-q)
                                                             (the LoRA dropout of dX), or none
    lora_expand_into   C <- round_y(b + s D_q(S B^T)         C not read: the operand of a cuBLAS
                                + s2 D2(S2 B2^T))            C.addmm_(x, W^T), which adds the base
                                                             product in its epilogue (one or two terms:
                                                             the gate and up dX of one MLP input)
    gate_up_lora_act   g <- round_x(g + s_g S_g B_g^T), u alike (in place, sides with LoRA), and
                       h' = act(g) * u * keep * c            written to h; bit-identical to
                                                             masked_gated_act_fwd(g, u)

Rounding: the reference adds the LoRA branch to the rounded base output (``(x W^T + b) + s S B^T``, then
the cast), which is what lora_expand_add and gate_up_lora_act do, with the LoRA product accumulated in fp32
on the tensor cores (``_common.lora_dot``: tf32x3 for fp32 adapters). lora_expand_into rounds the LoRA
term (with the bias) to y's dtype instead and cuBLAS adds it to the unrounded base product: one rounding
of the LoRA term's size in place of one of the base product's, within the same error budget.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..launch_args import ACT_CODES
from . import configs, direct_launch, plans
from ._common import (cast_like, cdiv, check_2d, check_same_device, dtype_code, lora_code, philox_keep, pow2_at_least, rounded_to,
                      seed_on, upcast_dots)
from .activations import act_fwd
from .gemm_lora_expand import lora_expand_tile, lora_term
from .masked_gated_act import _mask_scalars
from ...reference.philox import keep_threshold


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_N) tile of an (M, N) output, grid (row tiles, column tiles):
    rows, rows as int64, rows in bounds, columns as int64, columns in bounds."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows.to(tl.int64), rows < M, cols.to(tl.int64), cols < N


@triton.jit(do_not_specialize=["drop_threshold", "drop_threshold2"])
def lora_expand_add_kernel(
    y_ptr, s_ptr, b_ptr, seed_ptr, s2_ptr, b2_ptr, seed2_ptr, bias_ptr,
    M, N, R, R2,
    stride_ym, stride_sm, stride_sr, stride_bn, stride_br, stride_s2m, stride_s2r, stride_b2n, stride_b2r,
    scaling, scaling2, drop_threshold, drop_scale, drop_threshold2, drop_scale2,
    ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, SECOND: tl.constexpr,
    LORA_DROPOUT: tl.constexpr, LORA_DROPOUT2: tl.constexpr, LORA_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[tile] <- round(base + (s D(S B^T) [+ s2 D2(S2 B2^T)])), base = y[tile] (ACCUMULATE) or the bias
    row (HAS_BIAS) or 0; y has a unit column stride. fp32 sums: the terms first, then the base."""
    pid_n = tl.program_id(1)
    rows, rows64, row_ok, cols64, col_ok = _tile(M, N, BLOCK_M, BLOCK_N)
    acc = lora_term(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), s_ptr, b_ptr, seed_ptr, R, N, stride_sm, stride_sr,
                    stride_bn, stride_br, rows, rows64, cols64, row_ok, col_ok, pid_n, scaling, drop_threshold,
                    drop_scale, LORA_DROPOUT, LORA_DTYPE, UPCAST, BLOCK_N, BLOCK_R)
    if SECOND:
        acc += lora_term(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), s2_ptr, b2_ptr, seed2_ptr, R2, N, stride_s2m,
                         stride_s2r, stride_b2n, stride_b2r, rows, rows64, cols64, row_ok, col_ok, pid_n, scaling2,
                         drop_threshold2, drop_scale2, LORA_DROPOUT2, LORA_DTYPE, UPCAST, BLOCK_N, BLOCK_R)
    ptrs = y_ptr + rows64[:, None] * stride_ym + cols64[None, :]
    inb = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc = tl.load(ptrs, mask=inb, other=0.0).to(tl.float32) + acc
    if HAS_BIAS:
        acc = tl.load(bias_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :] + acc
    tl.store(ptrs, cast_like(acc, y_ptr), mask=inb)


@triton.jit(do_not_specialize=["threshold"])
def gate_up_lora_act_kernel(
    g_ptr, u_ptr, h_ptr, sg_ptr, lbg_ptr, su_ptr, lbu_ptr, seed_ptr,
    M, I, RG, RU,
    stride_g, stride_u, stride_h,
    stride_sgm, stride_sgr, stride_lbgn, stride_lbgr, stride_sum, stride_sur, stride_lbun, stride_lbur,
    scaling_g, scaling_u, threshold, c,
    ACT: tl.constexpr, LORA_G: tl.constexpr, LORA_U: tl.constexpr, HAS_MASK: tl.constexpr,
    LORA_G_DTYPE: tl.constexpr, LORA_U_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """g, u (base outputs, bias included) <- + LoRA expand, rounded; h' from the rounded values (the
    arithmetic of gate_up_act's epilogue and of masked_gated_act_fwd)."""
    pid_n = tl.program_id(1)
    rows, rows64, row_ok, cols64, col_ok = _tile(M, I, BLOCK_M, BLOCK_N)
    inb = row_ok[:, None] & col_ok[None, :]
    g_ptrs = g_ptr + rows64[:, None] * stride_g + cols64[None, :]
    u_ptrs = u_ptr + rows64[:, None] * stride_u + cols64[None, :]
    g = tl.load(g_ptrs, mask=inb, other=0.0)
    u = tl.load(u_ptrs, mask=inb, other=0.0)
    if LORA_G:
        lg = lora_expand_tile(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), sg_ptr, lbg_ptr, RG, stride_sgm,
                              stride_sgr, stride_lbgn, stride_lbgr, rows64, cols64, row_ok, col_ok, LORA_G_DTYPE,
                              UPCAST, BLOCK_R)
        g = cast_like(g.to(tl.float32) + scaling_g * lg, g_ptr)
        tl.store(g_ptrs, g, mask=inb)
    if LORA_U:
        lu = lora_expand_tile(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), su_ptr, lbu_ptr, RU, stride_sum,
                              stride_sur, stride_lbun, stride_lbur, rows64, cols64, row_ok, col_ok, LORA_U_DTYPE,
                              UPCAST, BLOCK_R)
        u = cast_like(u.to(tl.float32) + scaling_u * lu, u_ptr)
        tl.store(u_ptrs, u, mask=inb)
    h = act_fwd(g.to(tl.float32), ACT) * u.to(tl.float32)
    if HAS_MASK:
        h = h * tl.where(philox_keep(tl.load(seed_ptr), rows, pid_n * BLOCK_N, I, threshold, BLOCK_N), c, 0.0)
    tl.store(h_ptr + rows64[:, None] * stride_h + cols64[None, :], cast_like(h, h_ptr), mask=inb)


class ExpandSide(NamedTuple):
    """One gate/up side's LoRA expand: s (M, r) the shrink, b (I, r) that side's rows of B, ``scaling``."""

    s: torch.Tensor
    b: torch.Tensor
    scaling: float


def _check_lora(s, b, name: str, M: int, N: int) -> int:
    check_2d(s, f"{name}s")
    check_2d(b, f"{name}b")
    code = lora_code(s, f"{name}s")
    if b.dtype != s.dtype:
        raise TypeError(f"{name}b: expected dtype {s.dtype} like {name}s, got {b.dtype}")
    if s.shape[0] != M or b.shape[0] != N or b.shape[1] != s.shape[1]:
        raise ValueError(f"{name}s, {name}b: expected shapes ({M}, r) and ({N}, r), got {tuple(s.shape)} and {tuple(b.shape)}")
    return code


def _check_output(t: torch.Tensor, name: str) -> None:
    check_2d(t, name)
    dtype_code(t, name)
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name}: expected a unit column stride (it is written in place), got strides {t.stride()}")


def _grid(M, N, config):
    return (cdiv(M, config["BLOCK_M"]), cdiv(N, config["BLOCK_N"]))


class LoraTerm(NamedTuple):
    """One LoRA term ``scaling * D_q(S B^T)`` of an expand over an (M, N) output: s (M, r), b (N, r) in
    the adapter dtype (b may be a strided view, e.g. A^T for dX); ``dropout`` q > 0 with ``seed``: the
    keep mask of width N and 1/(1-q) rounded to the adapter dtype (the LoRA dropout of dX)."""

    s: torch.Tensor
    b: torch.Tensor
    scaling: float
    dropout: float = 0.0
    seed: torch.Tensor | None = None


_EXPAND_PLANS = plans.plan_cache("lora_expand_add")


def lora_expand_add(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float = 0.0,
                    seed: torch.Tensor | None = None) -> torch.Tensor:
    """y <- y + scaling * D(s b^T), in place, rounded to y's dtype; returns y. y (M, N) with a unit
    column stride; s (M, r), b (N, r) in one adapter dtype (b may be a strided view, e.g. A^T for dX).
    dropout > 0: the keep mask of ``seed`` over (M, N) and 1/(1-dropout) rounded to the adapter dtype."""
    return _expand_call(y, (LoraTerm(s, b, scaling, dropout, seed),), None, True)


def lora_expand_into(out: torch.Tensor, terms: tuple[LoraTerm, ...], bias: torch.Tensor | None = None) -> torch.Tensor:
    """out <- round(bias + (term_1 [+ term_2])) (fp32 sums, the terms first; one rounding to out's dtype),
    overwriting ``out`` (M, N), unit column stride; returns it. One or two ``LoraTerm``s in one adapter
    dtype; ``bias`` (N,) in out's dtype or None (a strided bias is copied: N elements).

    It writes the C operand of a cuBLAS product that accumulates into it, ``out.addmm_(x, W^T)``: the
    LoRA terms (and the bias) then reach y = x W^T + b + s S B^T through the GEMM's epilogue, which
    reads C while the GEMM is compute-bound, instead of a pass that reads y back and writes it again.
    Rounding: round(x W^T + round(b + LoRA)); the reference rounds the base product first,
    round(round(x W^T + b) + LoRA). Both are one rounding of the LoRA term's size and one of y's."""
    if not 1 <= len(terms) <= 2:
        raise ValueError(f"terms: expected one or two LoraTerm, got {len(terms)}")
    if bias is not None and bias.dim() == 1 and bias.shape[0] > 1 and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernel reads the bias row with a unit stride
    return _expand_call(out, tuple(terms), bias, False)


def _expand_call(y, terms, bias, accumulate: bool) -> torch.Tensor:
    sig = plans.signature
    key = (sig(y), tuple((sig(t.s), sig(t.b), t.dropout, t.seed is None) for t in terms), sig(bias), accumulate,
           plans.tuning_state())
    plan = _EXPAND_PLANS.get(key, lambda: _expand_plan(y, terms, bias, accumulate))
    if not plan.empty:
        _expand(plan, y, terms, bias)
    return y


def _expand(plan: plans.LaunchPlan, target, terms, bias) -> None:
    """One launch; ``plan.head``: the shape and stride arguments, ``plan.tail``: the two dropout
    thresholds and scales. A missing second term or bias passes stand-in pointers the kernel never reads."""
    first = terms[0]
    second = terms[1] if len(terms) > 1 else LoraTerm(first.s, first.b, 1.0)

    def seed_t(t):
        return seed_on(t.seed, target.device) if t.dropout > 0 else target

    direct_launch.launch(lora_expand_add_kernel, plan,
                         (target, first.s, first.b, seed_t(first), second.s, second.b, seed_t(second),
                          target if bias is None else bias),
                         (float(first.scaling), float(second.scaling)))


def _expand_plan(y, terms, bias, accumulate: bool) -> plans.LaunchPlan:
    _check_output(y, "y" if accumulate else "out")
    M, N = y.shape
    names = ("", "terms[1].") if len(terms) > 1 else ("",)
    codes = [_check_lora(t.s, t.b, name, M, N) for t, name in zip(terms, names)]
    if len(set(codes)) > 1:
        raise TypeError(f"terms: expected one adapter dtype, got {terms[0].s.dtype} and {terms[1].s.dtype}")
    tail = []
    for t, name in zip(terms, names):
        if not 0.0 <= t.dropout < 1.0:
            raise ValueError(f"{name}dropout: expected a probability in [0, 1), got {t.dropout}")
        if t.dropout > 0 and t.seed is None:
            raise ValueError(f"{name}seed: required when dropout > 0")
        tail += [keep_threshold(t.dropout), rounded_to(1.0 / (1.0 - t.dropout), t.s.dtype)] if t.dropout > 0 else [0, 1.0]
    second = terms[1] if len(terms) > 1 else None
    if second is None:
        tail += [0, 1.0]
    if bias is not None:
        if accumulate:
            raise ValueError("bias: only when the expand writes its output (lora_expand_into)")
        if bias.dim() != 1 or bias.shape[0] != N or bias.dtype != y.dtype:
            raise ValueError(f"bias: expected shape ({N},) and dtype {y.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    device = check_same_device(y=y, bias=bias, **{f"{n}s": t.s for t, n in zip(terms, names)},
                               **{f"{n}b": t.b for t, n in zip(terms, names)})
    ranks = [t.s.shape[1] for t in terms]
    if M == 0 or N == 0 or (accumulate and max(ranks) == 0):
        return plans.NOTHING

    def strides(t):  # a missing second term: 0 strides (never read)
        return (0, 0, 0, 0) if t is None else (t.s.stride(0), t.s.stride(1), t.b.stride(0), t.b.stride(1))

    def plan_for(config) -> plans.LaunchPlan:
        return plans.LaunchPlan(
            _grid(M, N, config), (M, N, ranks[0], 0 if second is None else ranks[1], y.stride(0),
                                  *strides(terms[0]), *strides(second)),
            tuple(tail),
            dict(ACCUMULATE=accumulate, HAS_BIAS=bias is not None, SECOND=second is not None,
                 LORA_DROPOUT=terms[0].dropout > 0, LORA_DROPOUT2=second is not None and second.dropout > 0,
                 LORA_DTYPE=codes[0], UPCAST=upcast_dots(), BLOCK_R=min(64, pow2_at_least(max(ranks))),
                 num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs()))

    drops = tuple(t.dropout > 0 for t in terms)
    key = ("expand_add", configs.bucket(M), N, tuple(ranks), y.dtype, terms[0].s.dtype, codes[0], drops, accumulate,
           bias is not None, configs.layout_key(y, bias, *(t.s for t in terms), *(t.b for t in terms)))
    scratch = []  # the tuner times launches on a copy (an accumulating launch adds the term to its target again)

    def timed(config):
        if not scratch:  # with y's strides: the plan's arguments carry them
            scratch.append(torch.empty_strided(y.shape, y.stride(), dtype=y.dtype, device=y.device).copy_(y))
        _expand(plan_for(config), scratch[0], terms, bias)

    return plan_for(configs.choose(configs.EPILOGUE, device, key, y.element_size(), timed))


_GATE_UP_PLANS = plans.plan_cache("gate_up_lora_act")


def gate_up_lora_act(g: torch.Tensor, u: torch.Tensor, gate: ExpandSide | None, up: ExpandSide | None,
                     activation: str, p: float = 0.0, rescale: bool = False, seed: torch.Tensor | None = None,
                     out_h: torch.Tensor | None = None) -> torch.Tensor:
    """g <- g + s_g S_g B_g^T and u <- u + s_u S_u B_u^T in place (sides with LoRA; rounded to their
    dtype), and h' = act(g) * u * keep * c (M, I) in g's dtype, returned. g and u: (M, I) base outputs
    with unit column strides (the halves of a fused (M, 2I) output are fine). ``p``, ``rescale``,
    ``seed``: the knowledge mask as in masked_gated_act_fwd."""
    sig = plans.signature
    key = (sig(g), sig(u), None if gate is None else (sig(gate.s), sig(gate.b)),
           None if up is None else (sig(up.s), sig(up.b)), activation, p, rescale, seed is None, sig(out_h),
           plans.tuning_state())
    plan = _GATE_UP_PLANS.get(key, lambda: _gate_up_plan(g, u, gate, up, activation, p, rescale, seed, out_h))
    h = torch.empty(g.shape, dtype=g.dtype, device=g.device) if out_h is None else out_h
    if not plan.empty:
        _gate_up(plan, g, u, h, gate, up, seed_on(seed, g.device) if p > 0 else g)
    return h


def _gate_up(plan: plans.LaunchPlan, g, u, h, gate: ExpandSide | None, up: ExpandSide | None, seed_t) -> None:
    """One launch; ``plan.head``: the arguments between the eight pointers and the two scalings. A side
    without LoRA passes stand-in pointers the kernel never reads and scaling 1."""
    sg, lbg, scale_g = (g, g, 1.0) if gate is None else (gate.s, gate.b, float(gate.scaling))
    su, lbu, scale_u = (g, g, 1.0) if up is None else (up.s, up.b, float(up.scaling))
    direct_launch.launch(gate_up_lora_act_kernel, plan, (g, u, h, sg, lbg, su, lbu, seed_t), (scale_g, scale_u))


def _gate_up_plan(g, u, gate, up, activation, p, rescale, seed, out_h) -> plans.LaunchPlan:
    _check_output(g, "g")
    _check_output(u, "u")
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"u: expected shape {tuple(g.shape)} and dtype {g.dtype} like g, got {tuple(u.shape)} {u.dtype}")
    M, I = g.shape
    gcode = _check_lora(gate.s, gate.b, "gate.", M, I) if gate is not None else 0
    ucode = _check_lora(up.s, up.b, "up.", M, I) if up is not None else 0
    device = check_same_device(g=g, u=u, gate_s=gate and gate.s, gate_b=gate and gate.b, up_s=up and up.s,
                               up_b=up and up.b)
    has_mask, threshold, c = _mask_scalars(p, rescale, g.dtype, seed)
    h = out_h  # None: a fresh contiguous (M, I) on each call
    if h is not None and (tuple(h.shape) != (M, I) or h.dtype != g.dtype or (I > 1 and h.stride(1) != 1)):
        raise ValueError(f"out_h: expected shape ({M}, {I}), dtype {g.dtype} and a unit column stride")
    stride_h = I if h is None else h.stride(0)
    if M == 0 or I == 0:
        return plans.NOTHING
    rg = gate.s.shape[1] if gate is not None else 0
    ru = up.s.shape[1] if up is not None else 0

    def strides(side):
        return (0, 0, 0, 0) if side is None else (side.s.stride(0), side.s.stride(1), side.b.stride(0), side.b.stride(1))

    def plan_for(config) -> plans.LaunchPlan:
        return plans.LaunchPlan(
            _grid(M, I, config), (M, I, rg, ru, g.stride(0), u.stride(0), stride_h, *strides(gate), *strides(up)),
            (threshold, c),
            dict(ACT=ACT_CODES[activation], LORA_G=gate is not None, LORA_U=up is not None, HAS_MASK=has_mask,
                 LORA_G_DTYPE=gcode, LORA_U_DTYPE=ucode, UPCAST=upcast_dots(),
                 BLOCK_R=min(64, pow2_at_least(max(rg, ru))), num_warps=config.num_warps,
                 num_stages=config.num_stages, **config.kwargs()))

    key = ("gate_up_lora_act", configs.bucket(M), I, rg, ru, g.dtype, gcode, ucode, activation, has_mask,
           configs.layout_key(g, u, h, gate and gate.s, up and up.s))  # h None: fresh, aligned
    scratch = []  # the tuner times launches on copies of g and u (they are updated in place), with their strides

    def timed(config):
        if not scratch:
            scratch.extend(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t) for t in (g, u))
            scratch.append(torch.empty((M, I), dtype=g.dtype, device=device) if h is None else h)
        _gate_up(plan_for(config), *scratch, gate, up, seed_on(seed, device) if has_mask else g)

    return plan_for(configs.choose(configs.EPILOGUE, device, key, g.element_size(), timed))
