"""The gated MLP's activation backward in one pass over (M, I), together with the LoRA gradients that
read the same tiles: dg and du are not read back for the gate/up dB, and h' (for the down LoRA's dA) is
rebuilt in registers and never written.

Shapes: dh', g, u, dg, du (M, I), each with its own row stride (unit column stride). Per gate/up side
with LoRA: S (M, r) the forward's shrink, B (I, r) that side's rows of the LoRA B factor, s its
scaling. The down projection's LoRA: t_d = cast_A(dY) B_d (M, r_d), s_d, its dropout q and seed.
Math in fp32, with the roundings of the reference (keep, c as in masked_gated_act):

    dg   = round_x(dh' keep c u act'(g))            du = round_x(dh' keep c act(g))
    dB_g = s_g cast_A(dg)^T S_g  (I, r)             t_g = cast_A(dg) B_g  (M, r), if t_in_pass  (u alike)
    h'   = round_x(act(g) u keep c)                 bit-identical to the forward's h'
    dA_d = s_d t_d^T D_q(cast_A(h'))    (r_d, I)    D_q: the down LoRA's dropout, keep x 1/(1-q)

The fused gate_up layout has one t = cast_A(dg) B[:I] + cast_A(du) B[I:], summed in one buffer.
The LoRA products run on the tensor cores in the adapter's precision (``_common.lora_dot``).

Tiling and determinism: program (n, s) owns the columns n*BLOCK_N .. of row split s. It walks its
rows in BLOCK_M steps and keeps dB and dA for its columns in fp32 registers for the whole walk (with
t_in_pass it also writes, at each step, the (BLOCK_M, r) partial of t over its columns). Partials go to fp32 buffers (t: column
blocks x M x r; dB: splits x I x r; dA: splits x r_d x I) that are summed afterwards in a fixed order:
no atomics, the same bits on every run with the same config.

t is left to lora_shrink by default (``t_in_pass`` False), which reads dg and du once more: the t dots
have (BLOCK_M, r) outputs, 16 x 16 at r 16, that keep few warps busy while every warp gathers the
whole (BLOCK_M, BLOCK_N) operand, and in the static sm_90 SASS of the default config they add about
40 instructions per element (fp32 adapters: 118 instead of 78 per element in the loop; bf16 77 instead
of 65), more issue time than the re-read's bytes cost. Their partials also cost 8 r / BLOCK_N bytes per
element. ``t_in_pass=True`` computes them here anyway (tested; for measuring on a GPU).
dB and dA cost only rank-sized partials and are always computed here. Ranks up to 64 (register
accumulators).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..launch_args import ACT_CODES, unit_column_stride
from . import configs
from ._common import (cast_like, check_2d, check_out, check_same_device, dot_operand, dtype_code, lora_dot,
                      lora_dot_exact, philox_keep, pow2_at_least, rounded_to, seed_on, to_code, upcast_dots)
from .activations import act_fwd, act_fwd_and_grad
from .masked_gated_act import _mask_scalars
from ...reference.philox import keep_threshold

MAX_RANK = 64


@triton.jit
def _rank_tile(ptr, rows64, row_ok, R, BLOCK_R: tl.constexpr):
    """A (len(rows), BLOCK_R) tile of a contiguous (rows, R) rank-sized tensor, zero outside."""
    rr = tl.arange(0, BLOCK_R)
    return tl.load(ptr + rows64[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr < R)[None, :], other=0.0)


@triton.jit
def _rank_tile_t(ptr, rows64, row_ok, R, BLOCK_R: tl.constexpr):
    """The transpose (BLOCK_R, len(rows)) of ``_rank_tile``, read transposed from memory."""
    rr = tl.arange(0, BLOCK_R)
    return tl.load(ptr + rows64[None, :] * R + rr[:, None], mask=row_ok[None, :] & (rr < R)[:, None], other=0.0)


@triton.jit
def _store_rank_tile_t(ptr, xt, rows64, row_ok, R, BLOCK_R: tl.constexpr):
    """Stores xt (BLOCK_R, len(rows)) transposed, into the rows of a contiguous (rows, R) tensor."""
    rr = tl.arange(0, BLOCK_R)
    tl.store(ptr + rows64[None, :] * R + rr[:, None], xt, mask=row_ok[None, :] & (rr < R)[:, None])


@triton.jit
def _store_rank_tile(ptr, x, rows64, row_ok, R, BLOCK_R: tl.constexpr):
    rr = tl.arange(0, BLOCK_R)
    tl.store(ptr + rows64[:, None] * R + rr[None, :], x, mask=row_ok[:, None] & (rr < R)[None, :])


@triton.jit
def _t_dot(d, b, acc, CODE: tl.constexpr, UPCAST: tl.constexpr, X16: tl.constexpr):
    """acc + d B for one side: d (BLOCK_M, BLOCK_N) the gradient tile, exact in tf32 when X16."""
    if X16:
        acc = lora_dot_exact(d, b, acc, CODE, UPCAST, True)
    else:
        acc = lora_dot(d, b, acc, CODE, UPCAST)
    return acc


@triton.jit(do_not_specialize=["threshold", "drop_threshold"])
def act_bwd_lora_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, seed_ptr,
    sg_ptr, bg_ptr, tg_ptr, dbg_ptr,
    su_ptr, bu_ptr, tu_ptr, dbu_ptr,
    td_ptr, dad_ptr, dseed_ptr,
    M, I, RG, RU, RD, rows_per_split,
    stride_dh, stride_g, stride_u, stride_dg, stride_du,
    threshold, c, scaling_g, scaling_u, scaling_d, drop_threshold, drop_scale,
    ACT: tl.constexpr, HAS_MASK: tl.constexpr,
    LORA_G: tl.constexpr, LORA_U: tl.constexpr, T_IN_PASS: tl.constexpr, SHARED_T: tl.constexpr,
    LORA_D: tl.constexpr, D_DROPOUT: tl.constexpr,
    G_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr, D_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RD: tl.constexpr,
):
    """One (column block, row split) of the pass; see the module docstring. Rank-sized tensors are
    contiguous: S (M, r), B (I, r), t_d (M, r_d); partials t (column blocks, M, r), dB (splits, I, r),
    dA (splits, r_d, I), all fp32."""
    X16: tl.constexpr = dg_ptr.dtype.element_ty != tl.float32  # dg, du, h' exact in tf32
    D_EXACT: tl.constexpr = X16 and D_DTYPE == 0
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    c64 = cols.to(tl.int64)
    row_start = split * rows_per_split
    row_stop = tl.minimum(M, row_start + rows_per_split)
    if HAS_MASK:
        seed = tl.load(seed_ptr)
    if D_DROPOUT:
        dseed = tl.load(dseed_ptr)
    # B tiles (BLOCK_N, r) stay in registers for the whole walk when t is computed here
    if LORA_G:
        acc_bg = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)  # dB_g^T
        if T_IN_PASS:
            b_g = dot_operand(_rank_tile(bg_ptr, c64, col_ok, RG, BLOCK_R), G_DTYPE, UPCAST)
    if LORA_U:
        acc_bu = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        if T_IN_PASS:
            b_u = dot_operand(_rank_tile(bu_ptr, c64, col_ok, RU, BLOCK_R), U_DTYPE, UPCAST)
    if LORA_D:
        acc_ad = tl.zeros((BLOCK_RD, BLOCK_N), dtype=tl.float32)
    t_part = pid_n.to(tl.int64) * M  # row offset of this column block's t partials
    for r0 in range(row_start, row_stop, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_stop
        r64 = rows.to(tl.int64)
        inb = row_ok[:, None] & col_ok[None, :]
        dh = tl.load(dh_ptr + r64[:, None] * stride_dh + c64[None, :], mask=inb, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + r64[:, None] * stride_g + c64[None, :], mask=inb, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + r64[:, None] * stride_u + c64[None, :], mask=inb, other=0.0).to(tl.float32)
        if HAS_MASK:
            scale = tl.where(philox_keep(seed, rows, col0, I, threshold, BLOCK_N), c, 0.0)
        else:
            scale = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
        a, da = act_fwd_and_grad(g, ACT)
        dhs = dh * scale
        dg = cast_like(dhs * u * da, dg_ptr)
        du = cast_like(dhs * a, du_ptr)
        tl.store(dg_ptr + r64[:, None] * stride_dg + c64[None, :], dg, mask=inb)
        tl.store(du_ptr + r64[:, None] * stride_du + c64[None, :], du, mask=inb)
        # dg, du and h' hold 16-bit values when the base is 16-bit: exact in tf32, so fp32-adapter dots
        # with them need two tf32 MMAs, not three (lora_dot_exact)
        if LORA_G:
            dga = dot_operand(dg, G_DTYPE, UPCAST)
            sgt = dot_operand(_rank_tile_t(sg_ptr, r64, row_ok, RG, BLOCK_R), G_DTYPE, UPCAST)
            if X16:
                acc_bg = lora_dot_exact(sgt, dga, acc_bg, G_DTYPE, UPCAST, False)
            else:
                acc_bg = lora_dot(sgt, dga, acc_bg, G_DTYPE, UPCAST)
        if LORA_U:
            dua = dot_operand(du, U_DTYPE, UPCAST)
            sut = dot_operand(_rank_tile_t(su_ptr, r64, row_ok, RU, BLOCK_R), U_DTYPE, UPCAST)
            if X16:
                acc_bu = lora_dot_exact(sut, dua, acc_bu, U_DTYPE, UPCAST, False)
            else:
                acc_bu = lora_dot(sut, dua, acc_bu, U_DTYPE, UPCAST)
        if T_IN_PASS:
            if SHARED_T:  # fused gate_up: one t over both halves (both sides have LoRA, one dtype)
                t = _t_dot(dga, b_g, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), G_DTYPE, UPCAST, X16)
                t = _t_dot(dua, b_u, t, G_DTYPE, UPCAST, X16)
                _store_rank_tile(tg_ptr + t_part * RG, t, r64, row_ok, RG, BLOCK_R)
            else:
                if LORA_G:
                    t = _t_dot(dga, b_g, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), G_DTYPE, UPCAST, X16)
                    _store_rank_tile(tg_ptr + t_part * RG, t, r64, row_ok, RG, BLOCK_R)
                if LORA_U:
                    t = _t_dot(dua, b_u, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), U_DTYPE, UPCAST, X16)
                    _store_rank_tile(tu_ptr + t_part * RU, t, r64, row_ok, RU, BLOCK_R)
        if LORA_D:
            # h' as the forward rounded it: silu's and erf-gelu's act(g) from the gradient are the forward's
            # bit for bit (the same products; a factor 0.5 moved is exact); gelu_tanh's are written
            # differently and can differ in the last fp32 bit, so its act_fwd runs again
            if ACT == 2:
                h = cast_like(act_fwd(g, ACT) * u * scale, g_ptr)
            else:
                h = cast_like(a * u * scale, g_ptr)
            hq = to_code(h, D_DTYPE)
            tdt = dot_operand(_rank_tile_t(td_ptr, r64, row_ok, RD, BLOCK_RD), D_DTYPE, UPCAST)
            if D_EXACT:
                # fp32 adapters over a 16-bit base: the dropout's keep here, its scale 1/(1-q) after the sum,
                # so that the dot's h' operand stays exact in tf32
                if D_DROPOUT:
                    hq = tl.where(philox_keep(dseed, rows, col0, I, drop_threshold, BLOCK_N), hq, 0.0)
                acc_ad = lora_dot_exact(tdt, dot_operand(hq, D_DTYPE, UPCAST), acc_ad, D_DTYPE, UPCAST, False)
            else:
                if D_DROPOUT:
                    keep_d = philox_keep(dseed, rows, col0, I, drop_threshold, BLOCK_N)
                    hq = to_code(tl.where(keep_d, hq.to(tl.float32) * drop_scale, 0.0), D_DTYPE)
                acc_ad = lora_dot(tdt, dot_operand(hq, D_DTYPE, UPCAST), acc_ad, D_DTYPE, UPCAST)
    s64 = split.to(tl.int64)
    if LORA_G:
        _store_rank_tile_t(dbg_ptr + s64 * I * RG, acc_bg * scaling_g, c64, col_ok, RG, BLOCK_R)
    if LORA_U:
        _store_rank_tile_t(dbu_ptr + s64 * I * RU, acc_bu * scaling_u, c64, col_ok, RU, BLOCK_R)
    if LORA_D:
        if D_EXACT and D_DROPOUT:
            acc_ad = acc_ad * drop_scale
        rd = tl.arange(0, BLOCK_RD)
        tl.store(dad_ptr + s64 * RD * I + rd.to(tl.int64)[:, None] * I + c64[None, :], acc_ad * scaling_d,
                 mask=(rd < RD)[:, None] & col_ok[None, :])


class LoraSide(NamedTuple):
    """One gate/up side's LoRA for the backward: s (M, r) the forward's shrink, b (I, r) that side's
    rows of B, both in the adapter dtype; ``scaling`` s."""

    s: torch.Tensor
    b: torch.Tensor
    scaling: float


class DownLora(NamedTuple):
    """The down projection's LoRA for its dA: t (M, r_d) = cast_A(dY) B_d in the adapter dtype, the
    scaling, and its lora dropout probability with the seed of its stream (None when dropout is 0)."""

    t: torch.Tensor
    scaling: float
    dropout: float = 0.0
    seed: torch.Tensor | None = None


@dataclass(frozen=True)
class ActBwdLoraGrads:
    """Results of ``act_bwd_lora``. dg, du (M, I) in g's and u's dtypes; t_g, t_u (M, r) and dB_g,
    dB_u (I, r) in each side's adapter dtype (None for a side without LoRA; t None when not computed
    in the pass; with ``shared_t`` t_g holds the one t of the fused layout and t_u is None); dA_d
    (r_d, I) in the down adapter's dtype, or None."""

    dg: torch.Tensor
    du: torch.Tensor
    t_g: torch.Tensor | None
    t_u: torch.Tensor | None
    dB_g: torch.Tensor | None
    dB_u: torch.Tensor | None
    dA_d: torch.Tensor | None


def _block_n(block_n: int, rank: int) -> int:
    """BLOCK_N for LoRA rank ``rank``: at most 64 above rank 32 (the rank x BLOCK_N fp32 accumulators)."""
    return min(block_n, 64) if rank > 32 else block_n


def _check_side(side: LoraSide | None, name: str, M: int, I: int) -> int:
    if side is None:
        return 0
    s, b = side.s, side.b
    check_2d(s, f"{name}.s")
    check_2d(b, f"{name}.b")
    dtype_code(s, f"{name}.s")
    if b.dtype != s.dtype:
        raise TypeError(f"{name}.b: expected dtype {s.dtype} like {name}.s, got {b.dtype}")
    if s.shape[0] != M or b.shape[0] != I or b.shape[1] != s.shape[1]:
        raise ValueError(f"{name}.s, {name}.b: expected shapes ({M}, r) and ({I}, r), got {tuple(s.shape)} and {tuple(b.shape)}")
    if not 1 <= s.shape[1] <= MAX_RANK:
        raise ValueError(f"{name}.s: expected a rank in [1, {MAX_RANK}], got {s.shape[1]}")
    return s.shape[1]


def act_bwd_lora(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str, p: float = 0.0,
                 rescale: bool = False, seed: torch.Tensor | None = None, gate: LoraSide | None = None,
                 up: LoraSide | None = None, shared_t: bool = False, down: DownLora | None = None,
                 t_in_pass: bool = False, splits: int | None = None,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> ActBwdLoraGrads:
    """The one-pass activation backward (module docstring). ``p``, ``rescale``, ``seed``: the knowledge
    mask as in masked_gated_act_bwd (``seed`` the MASK stream key). ``gate``/``up``: each side's LoRA or
    None. ``shared_t``: the fused gate_up layout (both sides share S and one t). ``down``: the down
    LoRA whose dA to compute, or None. ``t_in_pass``: also compute t here (module docstring: off by
    default). ``splits``: row splits (None: chosen from the device; any value gives the
    same result up to fp32 summation order). ``out``: optional (dg, du) to write into (unit column
    stride, e.g. the halves of one (M, 2I) buffer; must not alias an input)."""
    dh, g, u = unit_column_stride(dh, "dh"), unit_column_stride(g, "g"), unit_column_stride(u, "u")
    for name, t in (("u", u), ("dh", dh)):
        if t.shape != g.shape:
            raise ValueError(f"{name}: expected shape {tuple(g.shape)} like g, got {tuple(t.shape)}")
    M, I = g.shape
    rg, ru = _check_side(gate, "gate", M, I), _check_side(up, "up", M, I)
    if shared_t and (gate is None or up is None or gate.s.dtype != up.s.dtype or rg != ru):
        raise ValueError("shared_t: needs LoRA on both sides with one rank and dtype (the fused gate_up layout)")
    rd = 0
    if down is not None:
        check_2d(down.t, "down.t")
        dtype_code(down.t, "down.t")
        rd = down.t.shape[1]
        if down.t.shape[0] != M or not 1 <= rd <= MAX_RANK:
            raise ValueError(f"down.t: expected shape ({M}, r) with r in [1, {MAX_RANK}], got {tuple(down.t.shape)}")
        if not 0.0 <= down.dropout < 1.0:
            raise ValueError(f"down.dropout: expected a probability in [0, 1), got {down.dropout}")
        if down.dropout > 0 and down.seed is None:
            raise ValueError("down.seed: required when down.dropout > 0")
    device = check_same_device(dh=dh, g=g, u=u, gate_s=gate and gate.s, gate_b=gate and gate.b,
                               up_s=up and up.s, up_b=up and up.b, down_t=down and down.t)
    has_mask, threshold, c = _mask_scalars(p, rescale, g.dtype, seed)
    if out is None:
        dg = torch.empty((M, I), dtype=g.dtype, device=device)
        du = torch.empty((M, I), dtype=u.dtype, device=device)
    else:
        dg, du = out
        check_out(dg, (M, I), g.dtype, "out[0]")
        check_out(du, (M, I), u.dtype, "out[1]")
        if dg.stride(1) != 1 or du.stride(1) != 1:
            raise ValueError("out: expected unit column strides")
    rank = max(rg, ru)
    t_in_pass = bool(t_in_pass) and rank > 0

    def zeros(shape, like):
        return torch.zeros(shape, dtype=like.dtype, device=device)

    if M == 0 or I == 0:
        return ActBwdLoraGrads(
            dg, du,
            zeros((M, rg), gate.s) if gate is not None and t_in_pass else None,
            zeros((M, ru), up.s) if up is not None and t_in_pass and not shared_t else None,
            zeros((I, rg), gate.s) if gate is not None else None,
            zeros((I, ru), up.s) if up is not None else None,
            zeros((rd, I), down.t) if down is not None else None)
    contiguous = lambda t: None if t is None else t.contiguous()  # rank-sized: copies are cheap
    sg, bg = (contiguous(gate.s), contiguous(gate.b)) if gate is not None else (dh, dh)
    su, bu = (contiguous(up.s), contiguous(up.b)) if up is not None else (dh, dh)
    td = contiguous(down.t) if down is not None else dh
    has_drop = down is not None and down.dropout > 0
    dseed = seed_on(down.seed, device, "down.seed") if has_drop else dh
    seed_t = seed_on(seed, device) if has_mask else dh
    block_r, block_rd = pow2_at_least(rank), pow2_at_least(rd)
    fp32 = torch.float32

    def launch(config, n_splits=splits, keep=None):
        meta = config.kwargs()
        meta["BLOCK_N"] = _block_n(meta["BLOCK_N"], rank)
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        n_col = triton.cdiv(I, bn)
        if n_splits is None:
            n_splits = configs.token_splits(n_col, M, bm, device)
        per_split = triton.cdiv(triton.cdiv(M, n_splits), bm) * bm
        n_splits = triton.cdiv(M, per_split)
        tg = torch.empty((n_col, M, rg), dtype=fp32, device=device) if gate is not None and t_in_pass else None
        tu = torch.empty((n_col, M, ru), dtype=fp32, device=device) if up is not None and t_in_pass and not shared_t else None
        dbg = torch.empty((n_splits, I, rg), dtype=fp32, device=device) if gate is not None else None
        dbu = torch.empty((n_splits, I, ru), dtype=fp32, device=device) if up is not None else None
        dad = torch.empty((n_splits, rd, I), dtype=fp32, device=device) if down is not None else None
        act_bwd_lora_kernel[(n_col, n_splits)](
            dh, g, u, dg, du, seed_t,
            sg, bg, tg if tg is not None else dh, dbg if dbg is not None else dh,
            su, bu, tu if tu is not None else dh, dbu if dbu is not None else dh,
            td, dad if dad is not None else dh, dseed,
            M, I, rg, ru, rd, per_split,
            dh.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0),
            threshold, c,
            float(gate.scaling) if gate is not None else 1.0, float(up.scaling) if up is not None else 1.0,
            float(down.scaling) if down is not None else 1.0,
            keep_threshold(down.dropout) if has_drop else 0,
            rounded_to(1.0 / (1.0 - down.dropout), down.t.dtype) if has_drop else 1.0,
            ACT=ACT_CODES[activation], HAS_MASK=has_mask, LORA_G=gate is not None, LORA_U=up is not None,
            T_IN_PASS=t_in_pass, SHARED_T=bool(shared_t), LORA_D=down is not None, D_DROPOUT=has_drop,
            G_DTYPE=dtype_code(sg, "gate.s"), U_DTYPE=dtype_code(su, "up.s"), D_DTYPE=dtype_code(td, "down.t"),
            UPCAST=upcast_dots(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r, BLOCK_RD=block_rd,
            num_warps=config.num_warps, num_stages=config.num_stages)
        return tg, tu, dbg, dbu, dad

    key = ("act_bwd_lora", configs.bucket(M), I, rg, ru, rd, g.dtype, activation, has_mask, t_in_pass, bool(shared_t),
           has_drop, None if gate is None else gate.s.dtype, None if up is None else up.s.dtype,
           None if down is None else down.t.dtype, configs.layout_key(dh, g, u, dg, du))
    tg, tu, dbg, dbu, dad = launch(configs.choose(configs.ACT_BWD_LORA, device, key, g.element_size(), launch))

    def total(part, like):  # fixed-order sum of the fp32 partials, then the adapter dtype
        return None if part is None else (part[0] if part.shape[0] == 1 else part.sum(0)).to(like.dtype)

    return ActBwdLoraGrads(dg, du, total(tg, sg), total(tu, su), total(dbg, sg), total(dbu, su), total(dad, td))
