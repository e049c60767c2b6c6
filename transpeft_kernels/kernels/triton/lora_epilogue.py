"""LoRA expands (and the masked activation) as passes over the output of a cuBLAS GEMM, for the
"cublas" base-GEMM mode of the Triton backend (ops/triton_backend.py): the base product stays with
cuBLAS, which a Triton GEMM matches at about 0.85 (perf/roofline.TRITON_GEMM_VS_CUBLAS), and the rank-sized
work reads and rewrites its output once.

    lora_expand_add    y <- round_y(y + s D_q(S B^T))        in place; y (M, N) in the base dtype,
                                                             S (M, r) and B (N, r) in the adapter dtype,
                                                             D_q the keep mask of width N and 1/(1-q)
                                                             (the LoRA dropout of dX), or none
    gate_up_lora_act   g <- round_x(g + s_g S_g B_g^T), u alike (in place, sides with LoRA), and
                       h' = act(g) * u * keep * c            written to h; bit-identical to
                                                             masked_gated_act_fwd(g, u)

Rounding: the reference adds the LoRA branch to the rounded base output (``(x W^T + b) + s S B^T``, then
the cast), which is what these passes do, with the LoRA product accumulated in fp32 on the tensor cores
(``_common.lora_dot``: tf32x3 for fp32 adapters).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..launch_args import ACT_CODES
from . import configs, direct_launch, plans
from ._common import (cast_like, cdiv, check_2d, check_same_device, dtype_code, philox_keep, pow2_at_least, rounded_to,
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


@triton.jit(do_not_specialize=["drop_threshold"])
def lora_expand_add_kernel(
    y_ptr, s_ptr, b_ptr, seed_ptr,
    M, N, R,
    stride_ym, stride_sm, stride_sr, stride_bn, stride_br,
    scaling, drop_threshold, drop_scale,
    LORA_DROPOUT: tl.constexpr, LORA_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[tile] <- round(y[tile] + scaling * D(S B^T)[tile]); y has a unit column stride."""
    pid_n = tl.program_id(1)
    rows, rows64, row_ok, cols64, col_ok = _tile(M, N, BLOCK_M, BLOCK_N)
    acc = lora_term(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), s_ptr, b_ptr, seed_ptr, R, N, stride_sm, stride_sr,
                    stride_bn, stride_br, rows, rows64, cols64, row_ok, col_ok, pid_n, scaling, drop_threshold,
                    drop_scale, LORA_DROPOUT, LORA_DTYPE, UPCAST, BLOCK_N, BLOCK_R)
    ptrs = y_ptr + rows64[:, None] * stride_ym + cols64[None, :]
    inb = row_ok[:, None] & col_ok[None, :]
    y = tl.load(ptrs, mask=inb, other=0.0).to(tl.float32)
    tl.store(ptrs, cast_like(y + acc, y_ptr), mask=inb)


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
    code = dtype_code(s, f"{name}s")
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


_EXPAND_PLANS = plans.plan_cache("lora_expand_add")


def lora_expand_add(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float = 0.0,
                    seed: torch.Tensor | None = None) -> torch.Tensor:
    """y <- y + scaling * D(s b^T), in place, rounded to y's dtype; returns y. y (M, N) with a unit
    column stride; s (M, r), b (N, r) in one adapter dtype (b may be a strided view, e.g. A^T for dX).
    dropout > 0: the keep mask of ``seed`` over (M, N) and 1/(1-dropout) rounded to the adapter dtype."""
    key = (plans.signature(y), plans.signature(s), plans.signature(b), dropout, seed is None, plans.tuning_state())
    plan = _EXPAND_PLANS.get(key, lambda: _expand_plan(y, s, b, scaling, dropout, seed))
    if not plan.empty:
        _expand(plan, y, s, b, scaling, seed_on(seed, y.device) if dropout > 0 else y)
    return y


def _expand(plan: plans.LaunchPlan, target, s, b, scaling, seed_t) -> None:
    """One launch; ``plan.head``: the arguments between the four pointers and the scaling."""
    direct_launch.launch(lora_expand_add_kernel, plan, (target, s, b, seed_t), (float(scaling),))


def _expand_plan(y, s, b, scaling, dropout, seed) -> plans.LaunchPlan:
    _check_output(y, "y")
    M, N = y.shape
    code = _check_lora(s, b, "", M, N)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
    drop = dropout > 0
    if drop and seed is None:
        raise ValueError("seed: required when dropout > 0")
    device = check_same_device(y=y, s=s, b=b)
    R = s.shape[1]
    if M == 0 or N == 0 or R == 0:
        return plans.NOTHING
    scale = rounded_to(1.0 / (1.0 - dropout), s.dtype) if drop else 1.0

    def plan_for(config) -> plans.LaunchPlan:
        return plans.LaunchPlan(
            _grid(M, N, config), (M, N, R, y.stride(0), s.stride(0), s.stride(1), b.stride(0), b.stride(1)),
            (keep_threshold(dropout) if drop else 0, scale),
            dict(LORA_DROPOUT=drop, LORA_DTYPE=code, UPCAST=upcast_dots(), BLOCK_R=min(64, pow2_at_least(R)),
                 num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs()))

    key = ("expand_add", configs.bucket(M), N, R, y.dtype, s.dtype, drop, configs.layout_key(y, s, b))
    scratch = []  # the tuner times launches on a copy: each launch adds the term to its target again

    def timed(config):
        if not scratch:  # with y's strides: the plan's arguments carry them
            scratch.append(torch.empty_strided(y.shape, y.stride(), dtype=y.dtype, device=y.device).copy_(y))
        _expand(plan_for(config), scratch[0], s, b, scaling, seed_on(seed, device) if drop else y)

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
