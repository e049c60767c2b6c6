"""Masked gated activation, forward and backward, with the knowledge mask regenerated from Philox.

Shapes: g, u, h', dh' are (M, I), each with its own row stride (unit column stride); M tokens, I the
intermediate width. I/O in float32, float16 or bfloat16; all math in float32.

    keep[i, j] = tl.rand(seed, i * I + j) >= p          (int64 offsets; seed = the MASK stream key)
    h'  = act(g) * u * keep * c                          (c = 1, or 1/(1-p) with rescaling)
    dg  = dh' * keep * c * u * act'(g)
    du  = dh' * keep * c * act(g)

The mask is never stored: forward and backward each regenerate it from (seed, row, column), so it is
bit-identical to ``reference.keep_mask`` whatever the tiling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch_args import ACT_CODES
from . import configs
from ._common import cast_like, check_2d, check_out, check_same_device, dtype_code, philox_keep, rounded_to, seed_on
from .activations import act_fwd, act_fwd_and_grad


@triton.jit
def tile_and_mask(seed_ptr, M, I, p, c, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_N) tile: int64 row and column offsets, the in-bounds mask, and
    the per-element factor keep * c (1 without masking), keep regenerated from (seed, row, column)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inb = (rows < M)[:, None] & (cols < I)[None, :]
    if HAS_MASK:
        scale = tl.where(philox_keep(tl.load(seed_ptr), rows, cols, I, p), c, 0.0)
    else:
        scale = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
    return rows.to(tl.int64)[:, None], cols.to(tl.int64)[None, :], inb, scale


@triton.jit
def masked_gated_act_fwd_kernel(
    g_ptr, u_ptr, h_ptr, seed_ptr,
    M, I, stride_g, stride_u, stride_h,
    p, c,
    ACT: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """h'[i, j] = act(g[i, j]) * u[i, j] * keep[i, j] * c over one (BLOCK_M, BLOCK_N) tile."""
    r64, c64, inb, scale = tile_and_mask(seed_ptr, M, I, p, c, HAS_MASK, BLOCK_M, BLOCK_N)
    g = tl.load(g_ptr + r64 * stride_g + c64, mask=inb, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r64 * stride_u + c64, mask=inb, other=0.0).to(tl.float32)
    h = act_fwd(g, ACT) * u * scale
    tl.store(h_ptr + r64 * stride_h + c64, cast_like(h, h_ptr), mask=inb)


@triton.jit
def masked_gated_act_bwd_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, seed_ptr,
    M, I, stride_dh, stride_g, stride_u, stride_dg, stride_du,
    p, c,
    ACT: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dg = dh' keep c u act'(g), du = dh' keep c act(g) over one tile; act recomputed from g."""
    r64, c64, inb, scale = tile_and_mask(seed_ptr, M, I, p, c, HAS_MASK, BLOCK_M, BLOCK_N)
    dh = tl.load(dh_ptr + r64 * stride_dh + c64, mask=inb, other=0.0).to(tl.float32) * scale
    g = tl.load(g_ptr + r64 * stride_g + c64, mask=inb, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r64 * stride_u + c64, mask=inb, other=0.0).to(tl.float32)
    a, da = act_fwd_and_grad(g, ACT)
    tl.store(dg_ptr + r64 * stride_dg + c64, cast_like(dh * u * da, dg_ptr), mask=inb)
    tl.store(du_ptr + r64 * stride_du + c64, cast_like(dh * a, du_ptr), mask=inb)


def _rows_view(t: torch.Tensor, name: str) -> torch.Tensor:
    """t with unit column stride (copied only when the columns are strided)."""
    check_2d(t, name)
    dtype_code(t, name)
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _mask_scalars(p: float, rescale: bool, dtype: torch.dtype, seed):
    if p < 0.0 or p >= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1), got {p}")
    if p == 0.0:
        return False, 0.0, 1.0
    if seed is None:
        raise ValueError("seed: required when the mask probability p > 0")
    # The reference multiplies by keep.to(dtype) * (1/(1-p)), i.e. by the scale rounded to dtype.
    return True, float(p), rounded_to(1.0 / (1.0 - p), dtype) if rescale else 1.0


def _grid(M, I, config):
    return (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(I, config["BLOCK_N"]))


def masked_gated_act_fwd(g, u, activation: str, p: float, rescale: bool, seed: torch.Tensor | None, out=None):
    """h' = act(g) * u * keep * c, (M, I) in g's dtype. ``seed``: the MASK stream key (int64 tensor).
    ``out``: optional (M, I) tensor to write into (unit column stride, must not alias g or u)."""
    g, u = _rows_view(g, "g"), _rows_view(u, "u")
    if g.shape != u.shape:
        raise ValueError(f"u: expected shape {tuple(g.shape)} like g, got {tuple(u.shape)}")
    device = check_same_device(g=g, u=u)
    has_mask, p, c = _mask_scalars(p, rescale, g.dtype, seed)
    M, I = g.shape
    check_out(out, (M, I), g.dtype)
    h = torch.empty((M, I), dtype=g.dtype, device=device) if out is None else out
    if M == 0 or I == 0:
        return h
    seed_t = seed_on(seed, device) if has_mask else g  # any pointer when unused

    def launch(config):
        masked_gated_act_fwd_kernel[_grid(M, I, config)](
            g, u, h, seed_t, M, I, g.stride(0), u.stride(0), h.stride(0), p, c,
            ACT=ACT_CODES[activation], HAS_MASK=has_mask,
            num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs())

    key = ("act_fwd", configs.bucket(M), I, g.dtype, activation, has_mask)
    launch(configs.choose(configs.ELEMENTWISE, device, key, g.element_size(), launch))
    return h


def masked_gated_act_bwd(dh, g, u, activation: str, p: float, rescale: bool, seed: torch.Tensor | None, out=None):
    """(dg, du) of h' = act(g) * u * keep * c, in g's and u's dtypes; inputs are only read.
    ``out``: optional (dg, du) to write into (unit column stride, must not alias an input)."""
    dh, g, u = _rows_view(dh, "dh"), _rows_view(g, "g"), _rows_view(u, "u")
    for name, t in (("u", u), ("dh", dh)):
        if t.shape != g.shape:
            raise ValueError(f"{name}: expected shape {tuple(g.shape)} like g, got {tuple(t.shape)}")
    device = check_same_device(dh=dh, g=g, u=u)
    has_mask, p, c = _mask_scalars(p, rescale, g.dtype, seed)
    M, I = g.shape
    if out is None:
        dg = torch.empty((M, I), dtype=g.dtype, device=device)
        du = torch.empty((M, I), dtype=u.dtype, device=device)
    else:
        dg, du = out
        check_out(dg, (M, I), g.dtype, "out[0]")
        check_out(du, (M, I), u.dtype, "out[1]")
    if M == 0 or I == 0:
        return dg, du
    seed_t = seed_on(seed, device) if has_mask else g

    def launch(config):
        masked_gated_act_bwd_kernel[_grid(M, I, config)](
            dh, g, u, dg, du, seed_t, M, I,
            dh.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0), p, c,
            ACT=ACT_CODES[activation], HAS_MASK=has_mask,
            num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs())

    key = ("act_bwd", configs.bucket(M), I, g.dtype, activation, has_mask)
    launch(configs.choose(configs.ELEMENTWISE, device, key, g.element_size(), launch))
    return dg, du
