"""Gate/up GEMM with the LoRA expands and the masked gated activation fused into its epilogue.

Shapes: x (M, d); Wg, Wu (I, d); bg, bu (I,); S_g (M, r_g), B_g (I, r_g); S_u (M, r_u), B_u (I, r_u);
g, u, h' (M, I). Every operand with arbitrary strides. x, W, b, g, u, h' share one dtype (float32,
float16 or bfloat16); each adapter's S and B share the adapter dtype. fp32 accumulation.

    g  = round(x Wg^T + bg + s_g * S_g B_g^T)          (S = dropout(x) A^T, from lora_shrink)
    u  = round(x Wu^T + bu + s_u * S_u B_u^T)          round() = to the I/O dtype, nearest even
    h' = act(g) * u * keep * c                         computed in fp32 from the *rounded* g and u
         keep[i, j] = lane j % 8 of tl.randint4x(seed, i * ceil(I / 8) + j // 8) >= keep_threshold(p)
                      (16-bit lanes, reference.keep_mask's spec; int64 offsets; seed = the MASK stream key)

g and u are outputs too (autograd saves them). h' is bit-identical to ``masked_gated_act_fwd(g, u)``
(same formula on the same rounded values), so backward, which recomputes h' from g and u with that
kernel, sees exactly the forward's h'.

Fused gate_up layout (Phi3, GLM): one W (2I, d), b (2I,), B (2I, r) with the gate in the first half
and one S for both halves; the launcher passes the halves as views and writes g, u into the two
halves of one (M, 2I) output. The kernel itself does not know the layout.

Each program owns one (BLOCK_M, BLOCK_N) tile of the intermediate dimension and keeps two fp32
accumulators; x is read once per K step for both products. Each LoRA expand is the first r steps of
its side's accumulator (then scaled by s), on the tensor cores (``_common.lora_dot``): bf16/fp16
adapters as native 16-bit dots, fp32 adapters as tf32x3 (near fp32: within 2.5 * 2^-21 |a b| per
product; bf16 operands would lose 2^-8 against the reference's fp32 adapter math). No separate fp32
LoRA tile is added in the epilogue, which keeps the fp32-adapter variants off FFMA and out of spills
(with an fp32 base, whose IEEE product runs on the CUDA cores in another register layout, the expands
come after the K loop instead). Programs are ordered in groups of GROUP_M row tiles (as in
gemm_lora_expand) so consecutive programs share weight columns in L2.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..launch_args import ACT_CODES
from . import configs
from ._common import (cast_like, cdiv, check_2d, check_out, check_same_device, dot_operand, dtype_code, lora_code, philox_keep,
                      pow2_at_least, seed_on, to_code, upcast_dots)
from .activations import act_fwd
from .gemm_lora_expand import grouped_tile, lora_expand_tile
from .masked_gated_act import _mask_scalars


@triton.jit(do_not_specialize=["threshold"])
def gate_up_act_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, sg_ptr, lbg_ptr, su_ptr, lbu_ptr, g_ptr, u_ptr, h_ptr, seed_ptr,
    M, I, K, RG, RU,
    stride_xm, stride_xk, stride_wgn, stride_wgk, stride_wun, stride_wuk,
    stride_sgm, stride_sgr, stride_lbgn, stride_lbgr, stride_sum, stride_sur, stride_lbun, stride_lbur,
    stride_gm, stride_gn, stride_um, stride_un, stride_hm, stride_hn,
    scaling_g, scaling_u, threshold, c,
    ACT: tl.constexpr, BIAS_G: tl.constexpr, BIAS_U: tl.constexpr, LORA_G: tl.constexpr, LORA_U: tl.constexpr,
    HAS_MASK: tl.constexpr, X_DTYPE: tl.constexpr, LORA_G_DTYPE: tl.constexpr, LORA_U_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, I, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < I
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    k_idx = tl.arange(0, BLOCK_K)

    # The LoRA expands first, as extra rank steps of each accumulator (scaled in place), so that no
    # third fp32 tile is live through the K loop or the epilogue (see gemm_lora_expand). An fp32 base
    # product runs on the CUDA cores in another register layout: there they come after the K loop.
    LORA_FIRST: tl.constexpr = X_DTYPE != 0
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if LORA_FIRST:
        if LORA_G:
            acc_g = scaling_g * lora_expand_tile(acc_g, sg_ptr, lbg_ptr, RG, stride_sgm, stride_sgr, stride_lbgn,
                                                 stride_lbgr, rows64, cols64, row_ok, col_ok, LORA_G_DTYPE, UPCAST,
                                                 BLOCK_R)
        if LORA_U:
            acc_u = scaling_u * lora_expand_tile(acc_u, su_ptr, lbu_ptr, RU, stride_sum, stride_sur, stride_lbun,
                                                 stride_lbur, rows64, cols64, row_ok, col_ok, LORA_U_DTYPE, UPCAST,
                                                 BLOCK_R)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + k_idx
        k_ok = ks < K
        ks64 = ks.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks64[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x = dot_operand(x, X_DTYPE, UPCAST)
        w_ok = k_ok[:, None] & col_ok[None, :]
        wg = tl.load(wg_ptr + cols64[None, :] * stride_wgn + ks64[:, None] * stride_wgk, mask=w_ok, other=0.0)
        acc_g += tl.dot(x, dot_operand(wg, X_DTYPE, UPCAST), input_precision="ieee")
        wu = tl.load(wu_ptr + cols64[None, :] * stride_wun + ks64[:, None] * stride_wuk, mask=w_ok, other=0.0)
        acc_u += tl.dot(x, dot_operand(wu, X_DTYPE, UPCAST), input_precision="ieee")
    if not LORA_FIRST:
        if LORA_G:
            acc_g += scaling_g * lora_expand_tile(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), sg_ptr, lbg_ptr,
                                                  RG, stride_sgm, stride_sgr, stride_lbgn, stride_lbgr, rows64, cols64,
                                                  row_ok, col_ok, LORA_G_DTYPE, UPCAST, BLOCK_R)
        if LORA_U:
            acc_u += scaling_u * lora_expand_tile(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), su_ptr, lbu_ptr,
                                                  RU, stride_sum, stride_sur, stride_lbun, stride_lbur, rows64, cols64,
                                                  row_ok, col_ok, LORA_U_DTYPE, UPCAST, BLOCK_R)

    if BIAS_G:
        acc_g += tl.load(bg_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if BIAS_U:
        acc_u += tl.load(bu_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    inb = row_ok[:, None] & col_ok[None, :]
    # h' must be computed from the values autograd saves, so round first and read back the rounded bits
    g = to_code(acc_g, X_DTYPE)
    u = to_code(acc_u, X_DTYPE)
    tl.store(g_ptr + rows64[:, None] * stride_gm + cols64[None, :] * stride_gn, g, mask=inb)
    tl.store(u_ptr + rows64[:, None] * stride_um + cols64[None, :] * stride_un, u, mask=inb)
    h = act_fwd(g.to(tl.float32), ACT) * u.to(tl.float32)
    if HAS_MASK:
        h = h * tl.where(philox_keep(tl.load(seed_ptr), rows, pid_n * BLOCK_N, I, threshold, BLOCK_N), c, 0.0)
    tl.store(h_ptr + rows64[:, None] * stride_hm + cols64[None, :] * stride_hn, cast_like(h, h_ptr), mask=inb)


class GateUpOperand(NamedTuple):
    """One input projection: ``x W^T + b + scaling * S B^T``. weight (N, d), bias (N,) or None,
    s (M, r) and b (N, r) in the adapter dtype, or both None without LoRA."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    s: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scaling: float = 1.0


def _check_projection(proj: GateUpOperand, name: str, x: torch.Tensor, n: int) -> int:
    """Validates one projection of width n against x; returns its rank (0 without LoRA)."""
    w, bias, s, b = proj.weight, proj.bias, proj.s, proj.b
    check_2d(w, f"{name}.weight")
    if w.dtype != x.dtype:
        raise TypeError(f"{name}.weight: expected dtype {x.dtype} like x, got {w.dtype}")
    if tuple(w.shape) != (n, x.shape[1]):
        raise ValueError(f"{name}.weight: expected shape ({n}, {x.shape[1]}), got {tuple(w.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"{name}.bias: expected shape ({n},) and dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if (s is None) != (b is None):
        raise ValueError(f"{name}: s and b go together (both or neither)")
    if s is None:
        return 0
    check_2d(s, f"{name}.s")
    check_2d(b, f"{name}.b")
    dtype_code(s, f"{name}.s")
    if b.dtype != s.dtype:
        raise TypeError(f"{name}.b: expected dtype {s.dtype} like s, got {b.dtype}")
    if s.shape[0] != x.shape[0] or b.shape[0] != n or b.shape[1] != s.shape[1]:
        raise ValueError(f"{name}.s, {name}.b: expected shapes ({x.shape[0]}, r) and ({n}, r), "
                         f"got {tuple(s.shape)} and {tuple(b.shape)}")
    return s.shape[1]


def _halves(proj: GateUpOperand, inter: int) -> tuple[GateUpOperand, GateUpOperand]:
    """The gate and up halves of a fused gate_up projection (views; S is shared)."""
    w, bias, s, b = proj.weight, proj.bias, proj.s, proj.b
    return (GateUpOperand(w[:inter], None if bias is None else bias[:inter], s, None if b is None else b[:inter], proj.scaling),
            GateUpOperand(w[inter:], None if bias is None else bias[inter:], s, None if b is None else b[inter:], proj.scaling))


def gate_up_act(x: torch.Tensor, gate: GateUpOperand, up: GateUpOperand | None, activation: str,
                p: float = 0.0, rescale: bool = False, seed: torch.Tensor | None = None,
                out: tuple[torch.Tensor, ...] | None = None, out_h: torch.Tensor | None = None):
    """(outs, h'): the gate/up projections of x (M, d) and h' = act(g) * u * keep * c, all in x's dtype.

    SPLIT layout: ``gate`` and ``up`` each of width I; outs = (g, u), (M, I) each.
    FUSED_GATE_UP layout: ``up`` is None and ``gate`` is the (2I, d) gate_up projection, gate rows
    first; outs = (gu,), (M, 2I) with g = gu[:, :I], u = gu[:, I:].
    ``p``, ``rescale``: knowledge masking (c = 1, or 1/(1-p) rounded to x's dtype); ``seed``: the MASK
    stream key (int64 tensor), required when p > 0. ``out``/``out_h``: optional tensors of the results'
    shapes to write into (must not alias an input).
    """
    check_2d(x, "x")
    xcode = dtype_code(x, "x")
    check_2d(gate.weight, "gate.weight")
    fused = up is None
    M = x.shape[0]
    if fused:
        if gate.weight.shape[0] % 2:
            raise ValueError(f"gate.weight: a fused gate_up weight needs an even row count, got {tuple(gate.weight.shape)}")
        inter = gate.weight.shape[0] // 2
        _check_projection(gate, "gate", x, 2 * inter)
        g_proj, u_proj = _halves(gate, inter)
    else:
        inter = gate.weight.shape[0]
        _check_projection(gate, "gate", x, inter)
        _check_projection(up, "up", x, inter)
        g_proj, u_proj = gate, up
    device = check_same_device(x=x, wg=g_proj.weight, wu=u_proj.weight, bg=g_proj.bias, bu=u_proj.bias,
                               sg=g_proj.s, bbg=g_proj.b, su=u_proj.s, bbu=u_proj.b)
    has_mask, threshold, c = _mask_scalars(p, rescale, x.dtype, seed)
    shapes = ((M, 2 * inter),) if fused else ((M, inter), (M, inter))
    if out is None:
        outs = tuple(torch.empty(sh, dtype=x.dtype, device=device) for sh in shapes)
    else:
        if len(out) != len(shapes):
            raise ValueError(f"out: expected {len(shapes)} tensor(s), got {len(out)}")
        for i, (o, sh) in enumerate(zip(out, shapes)):
            check_out(o, sh, x.dtype, f"out[{i}]")
        outs = tuple(out)
    check_out(out_h, (M, inter), x.dtype, "out_h")
    h = torch.empty((M, inter), dtype=x.dtype, device=device) if out_h is None else out_h
    if M == 0 or inter == 0:
        return outs, h
    g_out, u_out = (outs[0][:, :inter], outs[0][:, inter:]) if fused else outs
    seed_t = seed_on(seed, device) if has_mask else x  # any pointer when unused
    lora_g, lora_u = g_proj.s is not None, u_proj.s is not None
    rg = g_proj.s.shape[1] if lora_g else 0
    ru = u_proj.s.shape[1] if lora_u else 0
    br = min(64, pow2_at_least(max(rg, ru)))

    def lora_args(proj, on):
        if not on:
            return (x, x), (0, 0, 0, 0), xcode, 1.0
        s, b = proj.s, proj.b
        return (s, b), (s.stride(0), s.stride(1), b.stride(0), b.stride(1)), lora_code(s, "s"), float(proj.scaling)

    (sg, lbg), sg_strides, gcode, scale_g = lora_args(g_proj, lora_g)
    (su, lbu), su_strides, ucode, scale_u = lora_args(u_proj, lora_u)
    wg, wu = g_proj.weight, u_proj.weight
    bias_g, bias_u = g_proj.bias is not None, u_proj.bias is not None
    bg = g_proj.bias if bias_g else x
    bu = u_proj.bias if bias_u else x
    K = x.shape[1]

    def launch(config):
        grid = (cdiv(M, config["BLOCK_M"]) * cdiv(inter, config["BLOCK_N"]),)
        gate_up_act_kernel[grid](
            x, wg, wu, bg, bu, sg, lbg, su, lbu, g_out, u_out, h, seed_t,
            M, inter, K, rg, ru,
            x.stride(0), x.stride(1), wg.stride(0), wg.stride(1), wu.stride(0), wu.stride(1),
            *sg_strides, *su_strides,
            g_out.stride(0), g_out.stride(1), u_out.stride(0), u_out.stride(1), h.stride(0), h.stride(1),
            scale_g, scale_u, threshold, c,
            ACT=ACT_CODES[activation], BIAS_G=bias_g, BIAS_U=bias_u, LORA_G=lora_g, LORA_U=lora_u, HAS_MASK=has_mask,
            X_DTYPE=xcode, LORA_G_DTYPE=gcode, LORA_U_DTYPE=ucode, UPCAST=upcast_dots(), BLOCK_R=br,
            num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs())

    key = ("gate_up_act", configs.bucket(M), inter, K, rg, ru, x.dtype, gcode, ucode, bias_g, bias_u, activation, has_mask,
           configs.layout_key(x, wg, wu, g_out, u_out, h))
    launch(configs.choose(configs.GATE_UP, device, key, x.element_size(), launch))
    return outs, h
