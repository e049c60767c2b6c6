"""The gated MLP's activation backward in one pass over (M, I), together with the LoRA gradients that
read the same tiles: dg and du are not read back for the gate/up dB, and h' (for the down LoRA's dA) is
rebuilt in registers and never written.

Shapes: dh', g, u, dg, du (M, I), each with its own row stride (unit column stride). Per gate/up side
with LoRA: S (M, r) the forward's shrink and s its scaling. The down projection's LoRA:
t_d = cast_A(dY) B_d (M, r_d), s_d, its dropout q and seed. Math in fp32, with the roundings of the
reference (keep, c as in masked_gated_act):

    dg   = round_x(dh' keep c u act'(g))            du = round_x(dh' keep c act(g))
    dB_g = s_g cast_A(dg)^T S_g         (I, r)      dB_u = s_u cast_A(du)^T S_u
    h'   = round_x(act(g) u keep c)                 bit-identical to the forward's h'
    dA_d = s_d t_d^T D_q(cast_A(h'))    (r_d, I)    D_q: the down LoRA's dropout, keep x 1/(1-q)

With ``down.a`` (the dh' fold; 16-bit adapters, every rank of the pass, gate, up and down, at most
FOLD_MAX_RANK of the architecture: ``fold_supported``) dh holds cuBLAS's dY W_d alone and the pass first forms
dh' = round_dh(dh + s_d D_q(t_d A_d)), lora_expand_add's arithmetic, from the t_d tile
and the keep mask that dA_d uses as well: no (M, I) write of the LoRA term before the GEMM, no separate
launch, and the down LoRA's dropout mask regenerated once instead of twice.

The fused gate_up layout is two sides sharing S (dB of its B is [dB_g; dB_u]). The LoRA products run on
the tensor cores in the adapter's precision (``_common.lora_dot``).

Tiling and determinism: program (n, s) owns the columns n*BLOCK_N .. of row split s. It walks its
rows in BLOCK_M steps and keeps dB^T and dA for its columns in fp32 registers for the whole walk.
Partials go to fp32 buffers (dB: splits x I x r; dA: splits x r_d x I), summed afterwards in a fixed
order: no atomics, the same bits on every run with the same config.

Not in the pass: t = cast_A(dg) B (lora_shrink reads dg and du once more). Computing it here was built
and measured: its dots have (BLOCK_M, r) outputs, 16 x 16 at r 16, that keep few warps busy while every
warp gathers the whole (BLOCK_M, BLOCK_N) operand; in the static sm_90 SASS the loop went from 78 to 118
instructions per element with fp32 adapters (65 to 77 with bf16), more issue time than the re-read's
bytes cost, plus 8 r / BLOCK_N bytes of fp32 partials per element, and the fp32 variants spilled
(96-168 B): benchmarks/results/sass_act_bwd_lora_options.json. The dh' fold, left out twice for spills
(16-96 B at ranks 16 and 32 with 128 columns), takes 64 columns: A_d's (r_d, 64) tile is loaded once per
program and t_d's tile serves both dots; static sm_90 SASS at r 16 with bf16 adapters 672 instructions
per 8 elements (84 per element, 167 registers) against 879 per 16 (55) without it, no spills on sm_80 or
sm_90 up to rank 32, nor at rank 64 on sm_90, with 16-row tiles (rank 64 spilled 8-32 B on sm_80, and 32-row
tiles 24 / 48 B on sm_90 at ranks 32 / 64; fp32 adapters 120 B at rank 64, and the model gains nothing for them). By the
model that is 0.06-0.09 ms less per Llama-3-8B MLP step at r 16 and r 64 (sm_90).
Ranks up to 64 (register accumulators); BLOCK_N is halved above rank 32, and above rank 16 unless every
adapter is fp32, and with the fold (``block_n_for_rank``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..launch_args import ACT_CODES, ActBwdLoraGrads, unit_column_stride, unit_columns
from . import configs, direct_launch, plans
from .split_sum import split_sum
from ._common import (FP32, cast_like, cdiv, check_2d, check_same_device, dot_operand, dtype_code, lora_code, lora_dot,
                      lora_dot_exact, philox_keep, pow2_at_least, rounded_to, seed_on, to_code, upcast_dots)
from .activations import act_fwd_and_grad
from .masked_gated_act import _mask_scalars, grad_outputs
from ...reference.philox import keep_threshold

MAX_RANK = 64


@triton.jit
def _rank_tile_t(ptr, rows64, row_ok, R, BLOCK_R: tl.constexpr):
    """The (BLOCK_R, len(rows)) transpose of rows ``rows`` of a contiguous (rows, R) rank-sized tensor,
    read transposed from memory, zero outside."""
    rr = tl.arange(0, BLOCK_R)
    return tl.load(ptr + rows64[None, :] * R + rr[:, None], mask=row_ok[None, :] & (rr < R)[:, None], other=0.0)


@triton.jit
def _store_rank_tile_t(ptr, xt, rows64, row_ok, R, BLOCK_R: tl.constexpr):
    """Stores xt (BLOCK_R, len(rows)) transposed, into the rows of a contiguous (rows, R) tensor."""
    rr = tl.arange(0, BLOCK_R)
    tl.store(ptr + rows64[None, :] * R + rr[:, None], xt, mask=row_ok[None, :] & (rr < R)[:, None])


@triton.jit
def _db_step(acc, d, s_ptr, rows64, row_ok, R, CODE: tl.constexpr, UPCAST: tl.constexpr, X16: tl.constexpr,
             BLOCK_R: tl.constexpr):
    """acc (BLOCK_R, BLOCK_N) + S[rows]^T cast_A(d): one row step of a side's dB^T, d the stored gradient
    tile (dg or du), exact in tf32 when X16."""
    da = dot_operand(d, CODE, UPCAST)
    st = dot_operand(_rank_tile_t(s_ptr, rows64, row_ok, R, BLOCK_R), CODE, UPCAST)
    if X16:
        acc = lora_dot_exact(st, da, acc, CODE, UPCAST)
    else:
        acc = lora_dot(st, da, acc, CODE, UPCAST)
    return acc


@triton.jit(do_not_specialize=["threshold", "drop_threshold"])
def act_bwd_lora_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, seed_ptr,
    sg_ptr, dbg_ptr, su_ptr, dbu_ptr,
    td_ptr, dad_ptr, dseed_ptr, ad_ptr,
    M, I, RG, RU, RD, rows_per_split,
    stride_dh, stride_g, stride_u, stride_dg, stride_du, stride_ad,
    threshold, c, scaling_g, scaling_u, scaling_d, drop_threshold, drop_scale,
    ACT: tl.constexpr, HAS_MASK: tl.constexpr,
    LORA_G: tl.constexpr, LORA_U: tl.constexpr, LORA_D: tl.constexpr, D_DROPOUT: tl.constexpr, FOLD_D: tl.constexpr,
    G_DTYPE: tl.constexpr, U_DTYPE: tl.constexpr, D_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RD: tl.constexpr,
):
    """One (column block, row split) of the pass; see the module docstring. Rank-sized tensors are
    contiguous: S (M, r), t_d (M, r_d); partials dB (splits, I, r), dA (splits, r_d, I), all fp32.
    FOLD_D (with LORA_D): dh_ptr holds dY W_d only and the pass adds the down LoRA's term, A_d (r_d, I)
    at ad_ptr with row stride stride_ad."""
    X16: tl.constexpr = dg_ptr.dtype.element_ty != tl.float32  # dg, du, h' exact in tf32
    D_EXACT: tl.constexpr = X16 and (D_DTYPE == 0 or D_DTYPE == 3)  # fp32 adapters: 1/(1-q) after the sum
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
    if LORA_G:
        acc_bg = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)  # dB_g^T
    if LORA_U:
        acc_bu = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    if LORA_D:
        acc_ad = tl.zeros((BLOCK_RD, BLOCK_N), dtype=tl.float32)
    if FOLD_D:  # A_d's columns of this program, loaded once for the whole row walk
        rd = tl.arange(0, BLOCK_RD)
        ad = dot_operand(tl.load(ad_ptr + rd.to(tl.int64)[:, None] * stride_ad + c64[None, :],
                                 mask=(rd < RD)[:, None] & col_ok[None, :], other=0.0), D_DTYPE, UPCAST)
    for r0 in range(row_start, row_stop, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_stop
        r64 = rows.to(tl.int64)
        inb = row_ok[:, None] & col_ok[None, :]
        dh = tl.load(dh_ptr + r64[:, None] * stride_dh + c64[None, :], mask=inb, other=0.0).to(tl.float32)
        if FOLD_D:
            # dh' = round_dh(dY W_d + s_d D_q(t_d A_d)), lora_expand_add's arithmetic; t_d's tile and the
            # dropout's keep serve dA_d below as well
            td = _rank_tile_t(td_ptr, r64, row_ok, RD, BLOCK_RD)
            z = lora_dot(dot_operand(tl.trans(td), D_DTYPE, UPCAST), ad, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                         D_DTYPE, UPCAST)
            if D_DROPOUT:
                keep_d = philox_keep(dseed, rows, col0, I, drop_threshold, BLOCK_N)
                z = tl.where(keep_d, z * drop_scale, 0.0)
            dh = cast_like(dh + scaling_d * z, dh_ptr).to(tl.float32)
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
            acc_bg = _db_step(acc_bg, dg, sg_ptr, r64, row_ok, RG, G_DTYPE, UPCAST, X16, BLOCK_R)
        if LORA_U:
            acc_bu = _db_step(acc_bu, du, su_ptr, r64, row_ok, RU, U_DTYPE, UPCAST, X16, BLOCK_R)
        if LORA_D:
            # h' as the forward rounded it: act(g) from act_fwd_and_grad is act_fwd's bit for bit (the same
            # operations in the same order for every activation; for erf-gelu a factor 0.5 moved is exact)
            h = cast_like(a * u * scale, g_ptr)
            hq = to_code(h, D_DTYPE)
            if not FOLD_D:  # folded, the fold loaded t_d's tile and drew the keep mask already
                td = _rank_tile_t(td_ptr, r64, row_ok, RD, BLOCK_RD)
                if D_DROPOUT:
                    keep_d = philox_keep(dseed, rows, col0, I, drop_threshold, BLOCK_N)
            tdt = dot_operand(td, D_DTYPE, UPCAST)
            if D_EXACT:
                # fp32 adapters over a 16-bit base: the dropout's keep here, its scale 1/(1-q) after the sum,
                # so that the dot's h' operand stays exact in tf32
                if D_DROPOUT:
                    hq = tl.where(keep_d, hq, 0.0)
                acc_ad = lora_dot_exact(tdt, dot_operand(hq, D_DTYPE, UPCAST), acc_ad, D_DTYPE, UPCAST)
            else:
                if D_DROPOUT:
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
    """One gate/up side's LoRA for the backward: s (M, r) the forward's shrink, in the adapter dtype,
    and the ``scaling``."""

    s: torch.Tensor
    scaling: float


class DownLora(NamedTuple):
    """The down projection's LoRA for its dA: t (M, r_d) = cast_A(dY) B_d in the adapter dtype, the
    scaling, and its lora dropout probability with the seed of its stream (None when dropout is 0).
    ``a``: A_d (r_d, I), to add the LoRA term of dh' in the pass (``dh`` is then dY W_d alone), where
    ``fold_supported`` says so."""

    t: torch.Tensor
    scaling: float
    dropout: float = 0.0
    seed: torch.Tensor | None = None
    a: torch.Tensor | None = None


# The dh' fold: 16-bit adapters, every rank of the pass (gate, up and down) up to FOLD_MAX_RANK of the
# architecture, 64 columns per program (static SASS, compiled beside the committed set: at rank 64 it spilled
# 8-32 B on sm_80 in every config, none on sm_90 with 16-row tiles, 48 B there with 32, and 24 B with 32 at
# rank 32 (``config_fits``);
# with 128 columns 16 B at rank 16 on sm_90; fp32 adapters spilled at rank 64 and the model has no gain for
# them: their expand is compute, not the pass's bytes). The interpreter runs what sm_90 runs.
FOLD_MAX_RANK = {"sm_90": 64, "sm_80": 32, "interp": 64}
FOLD_DTYPES = (torch.bfloat16, torch.float16)


def fold_supported(adapter_dtype: torch.dtype, max_rank: int, device: torch.device) -> bool:
    """Whether the pass can add the down LoRA's term of dh' (``DownLora.a``) on ``device``: 16-bit adapters,
    and the largest LoRA rank among gate, up and down at most FOLD_MAX_RANK of its architecture."""
    return adapter_dtype in FOLD_DTYPES and max_rank <= FOLD_MAX_RANK[configs.arch_of(device)]


def config_fits(config, rank: int, fold: bool) -> bool:
    """Whether ``config`` compiles without spills for the pass at LoRA rank ``rank`` (the largest of the
    three): the fold above rank 16 keeps 16-row tiles (32 x 64 spilled 24 B at rank 32 and 48 B at rank 64
    on sm_90). Every architecture's default fits (python_tests/test_triton_configs.py)."""
    return not (fold and rank > 16 and config["BLOCK_M"] > 16)


def block_n_for_rank(block_n: int, rank: int, all_fp32: bool, fold: bool = False) -> int:
    """BLOCK_N for LoRA rank ``rank``: at most 64 above rank 32, and above rank 16 unless every adapter
    is fp32 with tf32x3 dots (the rank x BLOCK_N fp32 accumulators; static sm_80 / sm_90 SASS: at rank 64
    and 128 columns both spilled; at rank 32 the 16-bit adapters spilled 8 bytes on sm_90, and fp32 ones
    as single tf32 products 16, while tf32x3 ones fit in 254 registers, and 64 columns cost 105
    instructions per element against 81). ``fold``: the dh' fold, 64 columns at every rank."""
    return min(block_n, 64) if fold or rank > 32 or (rank > 16 and not all_fp32) else block_n


def _check_side(side: LoraSide | None, name: str, M: int) -> int:
    if side is None:
        return 0
    check_2d(side.s, f"{name}.s")
    dtype_code(side.s, f"{name}.s")
    if side.s.shape[0] != M or not 1 <= side.s.shape[1] <= MAX_RANK:
        raise ValueError(f"{name}.s: expected shape ({M}, r) with r in [1, {MAX_RANK}], got {tuple(side.s.shape)}")
    return side.s.shape[1]


def _check_fold(a: torch.Tensor, t: torch.Tensor, I: int, max_rank: int) -> None:
    """down.a for the dh' fold: A_d (r_d, I) in t's 16-bit dtype, on t's device, unit column stride
    (``fold_supported``)."""
    check_2d(a, "down.a")
    if a.dtype != t.dtype or a.dtype not in FOLD_DTYPES:
        raise TypeError(f"down.a: expected down.t's dtype, torch.bfloat16 or torch.float16 (the fold takes 16-bit "
                        f"adapters), got {a.dtype} with down.t {t.dtype}")
    if a.shape != (t.shape[1], I):
        raise ValueError(f"down.a: expected shape ({t.shape[1]}, {I}), got {tuple(a.shape)}")
    if not fold_supported(a.dtype, max_rank, t.device):
        arch = configs.arch_of(t.device)
        raise ValueError(f"down.a: the fold takes LoRA ranks <= {FOLD_MAX_RANK[arch]} on {arch} (gate, up and down), "
                         f"got {max_rank}")
    if a.stride(1) != 1 and I > 1:
        raise ValueError(f"down.a: expected a unit column stride, got strides {a.stride()}")


_PLANS = plans.plan_cache("act_bwd_lora")


def act_bwd_lora(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str, p: float = 0.0,
                 rescale: bool = False, seed: torch.Tensor | None = None, gate: LoraSide | None = None,
                 up: LoraSide | None = None, down: DownLora | None = None, splits: int | None = None,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> ActBwdLoraGrads:
    """The one-pass activation backward (module docstring). ``p``, ``rescale``, ``seed``: the knowledge
    mask as in masked_gated_act_bwd (``seed`` the MASK stream key). ``gate``/``up``: each side's LoRA or
    None. ``down``: the down LoRA whose dA to compute, or None. ``splits``: row splits (None: chosen from the device; any value gives the
    same result up to fp32 summation order). ``out``: optional (dg, du) to write into (unit column
    stride, e.g. the halves of one (M, 2I) buffer; must not alias an input)."""
    sig = plans.signature
    key = (sig(dh), sig(g), sig(u), activation, p, rescale, seed is None,
           None if gate is None else sig(gate.s), None if up is None else sig(up.s),
           None if down is None else (sig(down.t), down.dropout, down.seed is None, sig(down.a)),
           splits,
           None if out is None else (sig(out[0]), sig(out[1])), plans.tuning_state())
    plan = _PLANS.get(key, lambda: _plan(dh, g, u, activation, p, rescale, seed, gate, up, down, splits, out))
    dh, g, u = unit_columns(dh), unit_columns(g), unit_columns(u)
    dg, du = grad_outputs(g, u, out)
    M, I = g.shape
    if plan.empty:
        def zeros(shape, like):
            return torch.zeros(shape, dtype=like.dtype, device=g.device)

        return ActBwdLoraGrads(
            dg, du,
            zeros((I, gate.s.shape[1]), gate.s) if gate is not None else None,
            zeros((I, up.s.shape[1]), up.s) if up is not None else None,
            zeros((down.t.shape[1], I), down.t) if down is not None else None)
    dbg, dbu, dad = _run(plan, (dh, g, u, dg, du), gate, up, down, seed if p > 0 else None)

    def total(part, like):  # fixed-order sum of the fp32 partials and the cast to the adapter dtype, one launch
        if part is None:
            return None
        return part[0].to(like.dtype) if part.shape[0] == 1 else split_sum(part, like.dtype)

    return ActBwdLoraGrads(dg, du, total(dbg, gate and gate.s), total(dbu, up and up.s), total(dad, down and down.t))


def _run(plan: plans.LaunchPlan, act: tuple, gate, up, down, mask_seed) -> tuple:
    """One launch of ``plan``: act = (dh, g, u, dg, du); ``mask_seed`` None without the knowledge mask.
    ``plan.head``: the arguments between the fourteen pointers and the three scalings. Returns the fresh
    fp32 partials (dB_g, dB_u, dA_d; None for an absent side)."""
    dh, g = act[0], act[1]
    dbg, dbu, dad = _partials(plan.n_splits, g.shape[1], gate, up, down, g.device)
    sg = gate.s.contiguous() if gate is not None else dh  # rank-sized: copies are cheap
    su = up.s.contiguous() if up is not None else dh
    td = down.t.contiguous() if down is not None else dh
    dseed = seed_on(down.seed, g.device, "down.seed") if down is not None and down.dropout > 0 else dh
    ad = down.a if down is not None and down.a is not None else dh
    direct_launch.launch(
        act_bwd_lora_kernel, plan,
        (*act, seed_on(mask_seed, g.device) if mask_seed is not None else dh,
         sg, dbg if dbg is not None else dh, su, dbu if dbu is not None else dh,
         td, dad if dad is not None else dh, dseed, ad),
        (float(gate.scaling) if gate is not None else 1.0, float(up.scaling) if up is not None else 1.0,
         float(down.scaling) if down is not None else 1.0))
    return dbg, dbu, dad


def _partials(n_splits, I, gate, up, down, device):
    """The fp32 partial sums of dB_g (splits, I, r_g), dB_u and dA_d (splits, r_d, I); None for an absent side."""
    fp32 = torch.float32
    return (torch.empty((n_splits, I, gate.s.shape[1]), dtype=fp32, device=device) if gate is not None else None,
            torch.empty((n_splits, I, up.s.shape[1]), dtype=fp32, device=device) if up is not None else None,
            torch.empty((n_splits, down.t.shape[1], I), dtype=fp32, device=device) if down is not None else None)


def _plan(dh, g, u, activation, p, rescale, seed, gate, up, down, splits, out) -> plans.LaunchPlan:
    dh, g, u = unit_column_stride(dh, "dh"), unit_column_stride(g, "g"), unit_column_stride(u, "u")
    for name, t in (("u", u), ("dh", dh)):
        if t.shape != g.shape:
            raise ValueError(f"{name}: expected shape {tuple(g.shape)} like g, got {tuple(t.shape)}")
    M, I = g.shape
    rg, ru = _check_side(gate, "gate", M), _check_side(up, "up", M)
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
        if down.a is not None:
            _check_fold(down.a, down.t, I, max(rg, ru, rd))
    device = check_same_device(dh=dh, g=g, u=u, gate_s=gate and gate.s, up_s=up and up.s, down_t=down and down.t,
                               down_a=down and down.a)
    has_mask, threshold, c = _mask_scalars(p, rescale, g.dtype, seed)
    if out is not None:
        grad_outputs(g, u, out)  # checks out; fresh gradients are contiguous (M, I)
    stride_dg, stride_du = (out[0].stride(0), out[1].stride(0)) if out is not None else (I, I)
    has_drop = down is not None and down.dropout > 0
    fold = down is not None and down.a is not None
    if M == 0 or I == 0:
        return plans.NOTHING
    rank = max(rg, ru)
    block_r, block_rd = pow2_at_least(rank), pow2_at_least(rd)
    codes = dict(G_DTYPE=lora_code(gate.s if gate else dh, "gate.s"), U_DTYPE=lora_code(up.s if up else dh, "up.s"),
                 D_DTYPE=lora_code(down.t if down else dh, "down.t"))
    # tf32x3 only: single tf32 dots (TF32) spilled 16 B at rank 32 with 128 columns (sm_90)
    all_fp32 = all(codes[k] == FP32 for k, t in (("G_DTYPE", gate), ("U_DTYPE", up), ("D_DTYPE", down)) if t is not None)

    def plan_for(config, n_splits) -> plans.LaunchPlan:
        meta = config.kwargs()
        meta["BLOCK_N"] = block_n_for_rank(meta["BLOCK_N"], max(rank, rd), all_fp32, fold)
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        n_col = cdiv(I, bn)
        if n_splits is None:
            n_splits = configs.token_splits(n_col, M, bm, device)
        per_split = cdiv(cdiv(M, n_splits), bm) * bm
        n_splits = cdiv(M, per_split)
        return plans.LaunchPlan(
            (n_col, n_splits),
            (M, I, rg, ru, rd, per_split, dh.stride(0), g.stride(0), u.stride(0), stride_dg, stride_du,
             down.a.stride(0) if fold else 0, threshold, c),
            (keep_threshold(down.dropout) if has_drop else 0,
             rounded_to(1.0 / (1.0 - down.dropout), down.t.dtype) if has_drop else 1.0),
            dict(ACT=ACT_CODES[activation], HAS_MASK=has_mask, LORA_G=gate is not None, LORA_U=up is not None,
                 LORA_D=down is not None, D_DROPOUT=has_drop, FOLD_D=fold, **codes, UPCAST=upcast_dots(), BLOCK_M=bm,
                 BLOCK_N=bn, BLOCK_R=block_r, BLOCK_RD=block_rd, num_warps=config.num_warps,
                 num_stages=config.num_stages),
            n_splits)

    tuned = []  # the gradients the tuner writes, allocated only when it runs

    def launch(config):
        if not tuned:
            tuned.extend(grad_outputs(g, u, out))
        _run(plan_for(config, splits), (dh, g, u, *tuned), gate, up, down, seed if has_mask else None)

    key = ("act_bwd_lora", configs.bucket(M), I, rg, ru, rd, g.dtype, activation, has_mask, has_drop, fold,
           None if gate is None else gate.s.dtype, None if up is None else up.s.dtype,
           None if down is None else down.t.dtype, tuple(codes.values()),
           configs.layout_key(dh, g, u, *(out or (None, None)), down.a if fold else None))
    return plan_for(configs.choose(configs.ACT_BWD_LORA, device, key, g.element_size(), launch,
                                   fits=lambda c: config_fits(c, max(rank, rd), fold)), splits)
