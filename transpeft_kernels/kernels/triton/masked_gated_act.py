"""Masked gated activation, forward and backward, with the knowledge mask regenerated from Philox.

Shapes: g, u, h', dh' are (M, I), each with its own row stride (unit column stride); M tokens, I the
intermediate width. I/O in float32, float16 or bfloat16; all math in float32.

    keep[i, j] = reference.keep_mask's spec: lane j % 8 of tl.randint4x(seed, i * ceil(I / 8) + j // 8),
                 a 16-bit value, >= T = keep_threshold(p)  (int64 offsets; seed = the MASK stream key)
    h'  = act(g) * u * keep * c                          (c = 1, or 1/(1-p) with rescaling)
    dg  = dh' * keep * c * u * act'(g)
    du  = dh' * keep * c * act(g)

The mask is never stored: forward and backward each regenerate it from (seed, row, column), so it is
bit-identical to ``reference.keep_mask`` whatever the tiling. One Philox call per 8 elements (tile
columns start at multiples of BLOCK_N, a power of two >= 16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch_args import ACT_CODES, unit_column_stride, unit_columns
from . import configs, direct_launch, plans
from ._common import cast_like, cdiv, check_out, check_same_device, philox_keep, rounded_to, seed_on
from .activations import act_fwd, act_fwd_and_grad
from ...reference.philox import keep_threshold


@triton.jit
def tile_and_mask(seed_ptr, M, I, threshold, c, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_N) tile: int64 row and column offsets, the in-bounds mask, and
    the per-element factor keep * c (1 without masking), keep regenerated from (seed, row, column)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inb = (rows < M)[:, None] & (cols < I)[None, :]
    if HAS_MASK:
        scale = tl.where(philox_keep(tl.load(seed_ptr), rows, tl.program_id(1) * BLOCK_N, I, threshold, BLOCK_N), c, 0.0)
    else:
        scale = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
    return rows.to(tl.int64)[:, None], cols.to(tl.int64)[None, :], inb, scale


@triton.jit(do_not_specialize=["threshold"])
def masked_gated_act_fwd_kernel(
    g_ptr, u_ptr, h_ptr, seed_ptr,
    M, I, stride_g, stride_u, stride_h,
    threshold, c,
    ACT: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """h'[i, j] = act(g[i, j]) * u[i, j] * keep[i, j] * c over one (BLOCK_M, BLOCK_N) tile."""
    r64, c64, inb, scale = tile_and_mask(seed_ptr, M, I, threshold, c, HAS_MASK, BLOCK_M, BLOCK_N)
    g = tl.load(g_ptr + r64 * stride_g + c64, mask=inb, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r64 * stride_u + c64, mask=inb, other=0.0).to(tl.float32)
    h = act_fwd(g, ACT) * u * scale
    tl.store(h_ptr + r64 * stride_h + c64, cast_like(h, h_ptr), mask=inb)


@triton.jit(do_not_specialize=["threshold"])
def masked_gated_act_bwd_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, seed_ptr,
    M, I, stride_dh, stride_g, stride_u, stride_dg, stride_du,
    threshold, c,
    ACT: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dg = dh' keep c u act'(g), du = dh' keep c act(g) over one tile; act recomputed from g."""
    r64, c64, inb, scale = tile_and_mask(seed_ptr, M, I, threshold, c, HAS_MASK, BLOCK_M, BLOCK_N)
    dh = tl.load(dh_ptr + r64 * stride_dh + c64, mask=inb, other=0.0).to(tl.float32) * scale
    g = tl.load(g_ptr + r64 * stride_g + c64, mask=inb, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r64 * stride_u + c64, mask=inb, other=0.0).to(tl.float32)
    a, da = act_fwd_and_grad(g, ACT)
    tl.store(dg_ptr + r64 * stride_dg + c64, cast_like(dh * u * da, dg_ptr), mask=inb)
    tl.store(du_ptr + r64 * stride_du + c64, cast_like(dh * a, du_ptr), mask=inb)


def _mask_scalars(p: float, rescale: bool, dtype: torch.dtype, seed):
    """(has_mask, integer keep threshold, scale c) for the kernels."""
    threshold = keep_threshold(p)  # ValueError naming p outside [0, 1)
    if p == 0.0:
        return False, 0, 1.0
    if seed is None:
        raise ValueError("seed: required when the mask probability p > 0")
    # The reference multiplies by keep.to(dtype) * (1/(1-p)), i.e. by the scale rounded to dtype.
    return True, threshold, rounded_to(1.0 / (1.0 - p), dtype) if rescale else 1.0


def grad_outputs(g, u, out):
    """(dg, du): fresh (M, I) tensors in g's and u's dtypes, or ``out`` checked (shapes, dtypes, unit
    column strides: the kernels write columns by position)."""
    M, I = g.shape
    if out is None:
        return torch.empty((M, I), dtype=g.dtype, device=g.device), torch.empty((M, I), dtype=u.dtype, device=u.device)
    dg, du = out
    check_out(dg, (M, I), g.dtype, "out[0]")
    check_out(du, (M, I), u.dtype, "out[1]")
    if I > 1 and (dg.stride(1) != 1 or du.stride(1) != 1):
        raise ValueError("out: expected unit column strides")
    return dg, du


def _grid(M, I, config):
    return (cdiv(M, config["BLOCK_M"]), cdiv(I, config["BLOCK_N"]))


_FWD_PLANS = plans.plan_cache("masked_gated_act_fwd")
_BWD_PLANS = plans.plan_cache("masked_gated_act_bwd")


def masked_gated_act_fwd(g, u, activation: str, p: float, rescale: bool, seed: torch.Tensor | None, out=None):
    """h' = act(g) * u * keep * c, (M, I) in g's dtype. ``seed``: the MASK stream key (int64 tensor).
    ``out``: optional (M, I) tensor to write into (unit column stride, must not alias g or u)."""
    sig = plans.signature
    key = (sig(g), sig(u), activation, p, rescale, seed is None, sig(out), plans.tuning_state())
    plan = _FWD_PLANS.get(key, lambda: _fwd_plan(g, u, activation, p, rescale, seed, out))
    g, u = unit_columns(g), unit_columns(u)
    h = torch.empty(g.shape, dtype=g.dtype, device=g.device) if out is None else out
    if plan.empty:
        return h
    seed_t = seed_on(seed, g.device) if p > 0 else g  # any pointer when unused
    direct_launch.launch(masked_gated_act_fwd_kernel, plan, (g, u, h, seed_t))
    return h


def _fwd_plan(g, u, activation, p, rescale, seed, out) -> plans.LaunchPlan:
    g, u = unit_column_stride(g, "g"), unit_column_stride(u, "u")
    if g.shape != u.shape:
        raise ValueError(f"u: expected shape {tuple(g.shape)} like g, got {tuple(u.shape)}")
    device = check_same_device(g=g, u=u)
    has_mask, threshold, c = _mask_scalars(p, rescale, g.dtype, seed)
    M, I = g.shape
    check_out(out, (M, I), g.dtype)
    if M == 0 or I == 0:
        return plans.NOTHING
    stride_h = I if out is None else out.stride(0)

    def plan_for(config) -> plans.LaunchPlan:  # head: every argument after the four pointers
        return plans.LaunchPlan(_grid(M, I, config), (M, I, g.stride(0), u.stride(0), stride_h, threshold, c),
                                meta=dict(ACT=ACT_CODES[activation], HAS_MASK=has_mask, num_warps=config.num_warps,
                                          num_stages=config.num_stages, **config.kwargs()))

    tuned = []  # the output the tuner writes, allocated only when it runs

    def launch(config):
        if not tuned:
            tuned.append(torch.empty((M, I), dtype=g.dtype, device=device) if out is None else out)
        pl = plan_for(config)
        masked_gated_act_fwd_kernel[pl.grid](g, u, tuned[0], seed_on(seed, device) if has_mask else g, *pl.head,
                                             **pl.meta)

    key = ("act_fwd", configs.bucket(M), I, g.dtype, activation, has_mask, configs.layout_key(g, u, out))
    return plan_for(configs.choose(configs.ELEMENTWISE, device, key, g.element_size(), launch))


def masked_gated_act_bwd(dh, g, u, activation: str, p: float, rescale: bool, seed: torch.Tensor | None, out=None):
    """(dg, du) of h' = act(g) * u * keep * c, in g's and u's dtypes; inputs are only read.
    ``out``: optional (dg, du) to write into (unit column stride, must not alias an input)."""
    sig = plans.signature
    key = (sig(dh), sig(g), sig(u), activation, p, rescale, seed is None,
           None if out is None else (sig(out[0]), sig(out[1])), plans.tuning_state())
    plan = _BWD_PLANS.get(key, lambda: _bwd_plan(dh, g, u, activation, p, rescale, seed, out))
    dh, g, u = unit_columns(dh), unit_columns(g), unit_columns(u)
    dg, du = grad_outputs(g, u, out)
    if plan.empty:
        return dg, du
    seed_t = seed_on(seed, g.device) if p > 0 else g
    direct_launch.launch(masked_gated_act_bwd_kernel, plan, (dh, g, u, dg, du, seed_t))
    return dg, du


def _bwd_plan(dh, g, u, activation, p, rescale, seed, out) -> plans.LaunchPlan:
    dh, g, u = unit_column_stride(dh, "dh"), unit_column_stride(g, "g"), unit_column_stride(u, "u")
    for name, t in (("u", u), ("dh", dh)):
        if t.shape != g.shape:
            raise ValueError(f"{name}: expected shape {tuple(g.shape)} like g, got {tuple(t.shape)}")
    device = check_same_device(dh=dh, g=g, u=u)
    has_mask, threshold, c = _mask_scalars(p, rescale, g.dtype, seed)
    M, I = g.shape
    if out is not None:
        grad_outputs(g, u, out)  # checks out; fresh gradients are contiguous (M, I)
    if M == 0 or I == 0:
        return plans.NOTHING
    stride_dg, stride_du = (out[0].stride(0), out[1].stride(0)) if out is not None else (I, I)

    def plan_for(config) -> plans.LaunchPlan:  # head: every argument after the six pointers
        return plans.LaunchPlan(_grid(M, I, config),
                                (M, I, dh.stride(0), g.stride(0), u.stride(0), stride_dg, stride_du, threshold, c),
                                meta=dict(ACT=ACT_CODES[activation], HAS_MASK=has_mask, num_warps=config.num_warps,
                                          num_stages=config.num_stages, **config.kwargs()))

    tuned = []

    def launch(config):
        if not tuned:
            tuned.extend(grad_outputs(g, u, out))
        pl = plan_for(config)
        masked_gated_act_bwd_kernel[pl.grid](dh, g, u, *tuned, seed_on(seed, device) if has_mask else g, *pl.head,
                                             **pl.meta)

    key = ("act_bwd", configs.bucket(M), I, g.dtype, activation, has_mask,
           configs.layout_key(dh, g, u, *(out or (None, None))))
    return plan_for(configs.choose(configs.ELEMENTWISE, device, key, g.element_size(), launch))
