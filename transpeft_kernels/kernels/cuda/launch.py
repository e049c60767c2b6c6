"""Tensor-level wrappers of libtranspeft_cuda: check arguments, allocate fresh outputs, fill each C
function's argument struct (abi.py, by field name) with ``data_ptr()``s, strides and dtype codes, and
call it on the current CUDA stream (capi.h).

Shapes: M tokens, I intermediate width, K/N feature widths, R rank. Seeds are the Philox keys of
the stream in question (int64 one-element tensors, ``specs.sub_seed`` already applied); they are
copied to the tensors' device and read there by the kernels. Masks (see reference/philox.py):
    knowledge mask   keep = keep_mask(mask_seed, M, I, p), scale c = 1 or 1/(1-p)
    LoRA dropout     keep = keep_mask(drop_seed, M, K, q), scale 1/(1-q)
(16-bit lanes, 8 per Philox call, compared with the integer threshold keep_threshold(p); the C
interface gets the threshold.)
Scales are rounded to the dtype the reference multiplies in (``rounded_to``). No output aliases an
input; ``lora_expand_`` writes into the tensor it is given, which must be fresh (a GEMM output
created by the caller, never a saved tensor or an incoming gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..launch_args import (ACT_CODES, ActBwdLoraGrads, check_2d, check_same_device, dtype_code, rounded_to, seed_on,
                           unit_column_stride)
from ...reference.philox import keep_threshold
from .abi import ActBwdArgs, ActBwdLoraArgs, ActFwdArgs, LoraTokenReduceArgs, LoraDropoutCastArgs, LoraExpandArgs, LoraShrinkArgs, RandomMask
from .library import load

MAX_FUSED_RANK = 64  # the act kernels keep the down projection's rank-sized sums in registers or mma tiles


@dataclass(frozen=True)
class Dropout:
    """A LoRA dropout mask: probability q, the projection's Philox key (None when q == 0)."""

    q: float
    seed: torch.Tensor | None


def _ld(t: torch.Tensor) -> int:
    return t.stride(0)


def _call(name: str, args, device: torch.device) -> None:
    """Call C entry point ``name`` on ``device``'s current stream, with that device current for the
    call. The device switch and the stream object are what cost host time (microseconds per launch on
    a path that launches several kernels per op), so the switch happens only when another device is
    current and the stream is read as a raw handle."""
    lib = load()
    if device.type != "cuda":  # the host emulation: no streams
        lib.call(name, args, 0)
        return
    current = torch.cuda.current_device()
    index = current if device.index is None else device.index
    if index == current:
        lib.call(name, args, _raw_stream(index))
        return
    with torch.cuda.device(index):
        lib.call(name, args, _raw_stream(index))


def _raw_stream(index: int) -> int:
    """The current CUDA stream of device ``index`` as a cudaStream_t value (what torch.compile's
    generated code reads too; through the public Stream object where that binding is missing)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


def _mask_args(p: float, kept: float, seed: torch.Tensor | None, device: torch.device, what: str):
    """The RandomMask for the C interface, and the device seed tensor to keep alive over the call."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{what}: expected a probability in [0, 1), got {p}")
    if p == 0.0:
        return RandomMask.off(), None
    if seed is None:
        raise ValueError(f"seed: required when the {what} probability is > 0")
    s = seed_on(seed, device)
    return RandomMask(threshold=keep_threshold(p), kept=float(kept), seed=s.data_ptr(), on=1), s


def _dropout_args(drop: Dropout | None, dtype: torch.dtype, device: torch.device):
    if drop is None or drop.q == 0.0:
        return _mask_args(0.0, 1.0, None, device, "lora dropout")
    return _mask_args(drop.q, rounded_to(1.0 / (1.0 - drop.q), dtype), drop.seed, device, "lora dropout")


def _knowledge_mask_args(p: float, rescale: bool, seed, dtype: torch.dtype, device: torch.device):
    kept = rounded_to(1.0 / (1.0 - p), dtype) if rescale and p > 0 else 1.0
    return _mask_args(p, kept, seed, device, "masking")


# the forward's gate/up expands, by adapter dtype: their staging fits the block's 48 KB up to rank 32 with
# fp32 adapters, up to 64 with 16-bit ones
MAX_GATE_UP_RANK = {torch.float32: 32, torch.float16: 64, torch.bfloat16: 64}
GATE_UP_RANK_STEP = 8  # the gate/up rank: whole groups of 8 ranks per 16-byte load of B's rows


@dataclass(frozen=True)
class GateUpLora:
    """The gate and up projections' LoRA expands for masked_gated_act_fwd to add to g and u in place:
    S_g (M, r) = dropout(cast_A(x)) A_g^T, B_g (I, r), scaling s_g; likewise S_u, B_u, s_u (S_u may be S_g,
    as for one fused gate_up projection whose B is [B_g; B_u])."""

    s_g: torch.Tensor
    b_g: torch.Tensor
    scaling_g: float
    s_u: torch.Tensor
    b_u: torch.Tensor
    scaling_u: float


def masked_gated_act_fwd(g, u, activation: str, p: float, rescale: bool, mask_seed,
                         down_a: torch.Tensor | None = None, down_drop: Dropout | None = None,
                         gate_up: GateUpLora | None = None):
    """h' = act(g) * u * keep * c, (M, I) in g's dtype; with ``down_a`` = A_d (r, I), r <= 64, also
    S_d = dropout_qd(cast_A(h')) A_d^T, (M, r) in A_d's dtype, returned as (h', S_d).

    ``gate_up``: first g = T(g + TA(TA(S_g B_g^T) s_g)) and u likewise, written into g and u IN PLACE (fresh
    GEMM outputs of the caller, with unit column stride; not copied), in the same pass: the tensor-core
    forward only (``gate_up_supported``), ranks <= MAX_GATE_UP_RANK[A_d's dtype] (the down rank too), S and B in
    A_d's dtype."""
    if down_a is not None:
        down_a = _rows_in_groups(unit_column_stride(down_a, "down_a"))
    if gate_up is not None:
        _check_gate_up(g, u, down_a, gate_up)
    g, u = unit_column_stride(g, "g"), unit_column_stride(u, "u")
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"u: expected {tuple(g.shape)} {g.dtype} like g, got {tuple(u.shape)} {u.dtype}")
    device = check_same_device(g=g, u=u, down_a=down_a)
    M, I = g.shape
    h = torch.empty((M, I), dtype=g.dtype, device=device)
    mask, _keep1 = _knowledge_mask_args(p, rescale, mask_seed, g.dtype, device)
    fused, s, part = {}, None, None
    if down_a is not None:
        if down_a.shape[1] != I or not 1 <= down_a.shape[0] <= MAX_FUSED_RANK:
            raise ValueError(f"down_a: expected (r <= {MAX_FUSED_RANK}, {I}), got {tuple(down_a.shape)}")
        r = down_a.shape[0]
        s = torch.empty((M, r), dtype=down_a.dtype, device=device)
        drop, _keep2 = _dropout_args(down_drop, down_a.dtype, device)
        fused = dict(a=down_a.data_ptr(), lda=_ld(down_a), rank=r, a_dtype=dtype_code(down_a, "down_a"),
                     drop=drop, s=s.data_ptr(), lds=_ld(s))
        splits, per_split = _col_splits(M, I, device) if act_bwd_lora_supported(g, u, h) else (1, I)
        if splits > 1:  # the tensor-core forward, its column range split: fp32 partials of S_d
            part = torch.empty((splits, M, r), dtype=torch.float32, device=device)
            fused.update(s_part=part.data_ptr(), col_splits=splits, cols_per_split=per_split)
    if gate_up is not None:
        gu = gate_up
        fused.update(sg=gu.s_g.data_ptr(), ldsg=_ld(gu.s_g), bg=gu.b_g.data_ptr(), ldbg=_ld(gu.b_g),
                     su=gu.s_u.data_ptr(), ldsu=_ld(gu.s_u), bu=gu.b_u.data_ptr(), ldbu=_ld(gu.b_u),
                     rank_gu=gu.s_g.shape[1], scaling_g=float(gu.scaling_g), scaling_u=float(gu.scaling_u))
    args = ActFwdArgs(g=g.data_ptr(), ldg=_ld(g), u=u.data_ptr(), ldu=_ld(u), h=h.data_ptr(), ldh=_ld(h), M=M, I=I,
                      dtype=dtype_code(g, "g"), activation=ACT_CODES[activation], mask=mask, **fused)
    _call("transpeft_masked_gated_act_fwd", args, device)
    if part is not None:
        s = part.sum(0).to(down_a.dtype)  # fixed order over the splits, then one rounding, as unsplit
    return h if down_a is None else (h, s)


def gate_up_supported(g: torch.Tensor, u: torch.Tensor, gate_up: GateUpLora | None = None) -> bool:
    """Whether masked_gated_act_fwd can add gate/up expands to these g, u in place: the tensor-core forward's
    operands, as they are (act_bwd_lora_supported: unit column stride, I % 8 == 0, aligned rows); with
    ``gate_up`` also what its column loop stages with 16-byte loads only: B_g's and B_u's rows aligned
    (``_aligned_rows``), the gate/up rank a multiple of 8. (A_d's rows: copied where they are not.)"""
    if not act_bwd_lora_supported(g, u):
        return False
    return gate_up is None or (gate_up.s_g.dim() == 2 and gate_up.s_g.shape[1] % GATE_UP_RANK_STEP == 0
                               and all(_aligned_rows(b) for b in (gate_up.b_g, gate_up.b_u)))


def _aligned_rows(t: torch.Tensor) -> bool:
    """Rows that the CUDA kernels read in groups of 8 with 16-byte loads, as csrc's ``aligned_rows`` has them:
    unit column stride, a 16-byte aligned start, a row stride that is a multiple of 8 elements."""
    return (t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1) and t.data_ptr() % 16 == 0
            and t.stride(0) % 8 == 0)


def _rows_in_groups(a: torch.Tensor) -> torch.Tensor:
    """A_d as the tensor-core forward reads it (16-byte groups of its rows, ``act_fwd_lora_takes``): a fresh
    copy where its rows are not aligned (a view whose start is not 16-byte aligned, or whose row stride is
    not a multiple of 8; r x I elements, small), else itself."""
    if a.shape[1] % 8 != 0 or _aligned_rows(a):
        return a
    return a.clone(memory_format=torch.contiguous_format)


def _check_gate_up(g, u, down_a, gu: GateUpLora) -> None:
    if down_a is None:
        raise ValueError("gate_up: needs down_a (the tensor-core forward adds the expands)")
    check_2d(g, "g")
    check_2d(u, "u")
    if not gate_up_supported(g, u):
        raise ValueError("gate_up: g and u must have unit column stride, a column count divisible by 8 and "
                         "16-byte aligned rows (they are written in place)")
    M, I = g.shape
    r_d = down_a.shape[0] if down_a.dim() == 2 else -1
    max_r = MAX_GATE_UP_RANK.get(down_a.dtype, 0)
    if r_d > max_r:
        raise ValueError(f"gate_up: needs the down rank <= {max_r} with {down_a.dtype} adapters, got {r_d}")
    r = gu.s_g.shape[1] if gu.s_g.dim() == 2 else -1
    for name, t, rows in (("S_g", gu.s_g, M), ("B_g", gu.b_g, I), ("S_u", gu.s_u, M), ("B_u", gu.b_u, I)):
        if (t.dim() != 2 or tuple(t.shape) != (rows, r) or not 1 <= r <= max_r or t.dtype != down_a.dtype
                or (r > 1 and t.stride(1) != 1)):
            raise ValueError(f"gate_up {name}: expected ({rows}, r <= {max_r}) with unit column stride "
                             f"in down_a's dtype {down_a.dtype} (r like S_g's), got {tuple(t.shape)} {t.dtype} "
                             f"strides {t.stride()}")
        if t.device != g.device:
            raise ValueError(f"gate_up {name}: expected device {g.device}, got {t.device}")
    if r % GATE_UP_RANK_STEP != 0:
        raise ValueError(f"gate_up S_g: expected a rank that is a multiple of {GATE_UP_RANK_STEP} (B's rows are "
                         f"staged 8 ranks per 16-byte load), got {r}")
    for name, b in (("B_g", gu.b_g), ("B_u", gu.b_u)):
        if not _aligned_rows(b):
            raise ValueError(f"gate_up {name}: expected 16-byte aligned rows (a 16-byte aligned start, a row "
                             f"stride that is a multiple of 8), got a start {b.data_ptr() % 16} bytes past 16 "
                             f"and row stride {b.stride(0)}")


def _col_splits(M: int, I: int, device: torch.device) -> tuple[int, int]:
    """(splits, columns per split) of the tensor-core forward's I range: enough (32-row blocks x splits)
    to fill the GPU three times over (three blocks fit on an SM), each split at least 4 steps of 64
    columns; on the CPU (the emulation) 2 when I has at least 4 steps, so tests cover the split."""
    steps = -(-I // 64)
    if device.type != "cuda":
        n = 2 if steps >= 4 else 1
    else:
        blocks = -(-M // SPLIT_ROWS)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        n = max(1, min(-(-3 * sms // blocks), steps // 4, 64))
    per_split = -(-steps // n) * 64
    return -(-I // per_split), per_split


def _act_bwd_args(dh_base, g, u, activation: str, p: float, rescale: bool, mask_seed, down_t, down_a,
                  down_scaling: float, down_drop: Dropout | None, want_h: bool, want_xd: bool, out):
    """The checked ActBwdArgs of an activation backward, its fresh outputs (dg, du, h', xd; unrequested
    ones None) and the device tensors the call reads (kept alive by the caller until it returns)."""
    dh_base, g, u = unit_column_stride(dh_base, "dh_base"), unit_column_stride(g, "g"), unit_column_stride(u, "u")
    for name, t in (("u", u), ("dh_base", dh_base)):
        if t.shape != g.shape or t.dtype != g.dtype:
            raise ValueError(f"{name}: expected {tuple(g.shape)} {g.dtype} like g, got {tuple(t.shape)} {t.dtype}")
    if down_t is not None and down_a is None:
        raise ValueError("down_t: needs down_a")
    if want_xd and down_a is None:
        raise ValueError("want_xd: needs down_a (its dtype is xd's dtype)")
    device = check_same_device(dh_base=dh_base, g=g, u=u, down_t=down_t, down_a=down_a)
    M, I = g.shape
    if out is None:
        dg = torch.empty((M, I), dtype=g.dtype, device=device)
        du = torch.empty((M, I), dtype=u.dtype, device=device)
    else:
        dg, du = out
        for name, t in (("out[0]", dg), ("out[1]", du)):
            if tuple(t.shape) != (M, I) or t.dtype != g.dtype or (M > 0 and I > 1 and t.stride(1) != 1):
                raise ValueError(f"{name}: expected ({M}, {I}) {g.dtype} with unit column stride")
    h = torch.empty((M, I), dtype=g.dtype, device=device) if want_h else None
    xd = torch.empty((M, I), dtype=down_a.dtype, device=device) if want_xd else None
    mask, keep1 = _knowledge_mask_args(p, rescale, mask_seed, g.dtype, device)
    lora = {}
    if down_a is not None:
        down_a = unit_column_stride(down_a, "down_a")
        lora.update(a=down_a.data_ptr(), lda=_ld(down_a), rank=down_a.shape[0], a_dtype=dtype_code(down_a, "down_a"))
    if down_t is not None:
        down_t = unit_column_stride(down_t, "down_t")
        r = down_a.shape[0]
        if down_t.shape != (M, r) or down_t.dtype != down_a.dtype or down_a.shape[1] != I or r > MAX_FUSED_RANK:
            raise ValueError(f"down_t, down_a: expected ({M}, r) and (r <= {MAX_FUSED_RANK}, {I}) in one dtype, got "
                             f"{tuple(down_t.shape)} {down_t.dtype} and {tuple(down_a.shape)} {down_a.dtype}")
        lora.update(t=down_t.data_ptr(), ldt=_ld(down_t))
    drop, keep2 = _dropout_args(down_drop, down_a.dtype if down_a is not None else g.dtype, device)
    outputs = {}
    if h is not None:
        outputs.update(h_out=h.data_ptr(), ldh_out=_ld(h))
    if xd is not None:
        outputs.update(xd_out=xd.data_ptr(), ldxd=_ld(xd))
    args = ActBwdArgs(dh=dh_base.data_ptr(), lddh=_ld(dh_base), g=g.data_ptr(), ldg=_ld(g), u=u.data_ptr(), ldu=_ld(u),
                      dg=dg.data_ptr(), lddg=_ld(dg), du=du.data_ptr(), lddu=_ld(du), M=M, I=I,
                      dtype=dtype_code(g, "g"), activation=ACT_CODES[activation], mask=mask,
                      scaling=float(down_scaling), drop=drop, **lora, **outputs)
    return args, (dg, du, h, xd), (dh_base, g, u, down_t, down_a, keep1, keep2)


def masked_gated_act_bwd(dh_base, g, u, activation: str, p: float, rescale: bool, mask_seed,
                         down_t: torch.Tensor | None = None, down_a: torch.Tensor | None = None,
                         down_scaling: float = 0.0, down_drop: Dropout | None = None,
                         want_h: bool = False, want_xd: bool = False, out=None):
    """(dg, du, h', xd) for h' = act(g) * u * keep * c, with dh' = dh_base + cast(s * D(t_d A_d)).

    dh_base, g, u: (M, I) in one dtype. down_t: t_d = cast_A(dY) B_d (M, r), down_a: A_d (r, I), r <= 64,
    or both None. want_h: also return h' (M, I) (for dW_d); want_xd: also return
    xd = dropout_qd(cast_A(h')) (M, I) in A_d's dtype (for dA_d; needs down_a). Unrequested ones are None.
    out: optional (dg, du) (M, I) views with unit column stride to write into (e.g. two halves of one
    (M, 2I) buffer), which must not alias an input."""
    args, outs, _alive = _act_bwd_args(dh_base, g, u, activation, p, rescale, mask_seed, down_t, down_a,
                                       down_scaling, down_drop, want_h, want_xd, out)
    device = outs[0].device
    _call("transpeft_masked_gated_act_bwd", args, device)
    return outs


SPLIT_ROWS = 32  # the tensor-core passes' rows per step: a row split's row count is a multiple of it


def row_splits(M: int, N: int, device: torch.device) -> int:
    """Row splits of the tensor-core token reductions (act_bwd_lora's dA_d, lora_token_reduce): enough
    (64-column tiles x splits) blocks to fill the GPU about four times over (three blocks fit on an
    SM), each split at least 4 steps of rows; on the CPU (the emulation) up to 8, so tests cover the
    split sum."""
    steps = -(-M // SPLIT_ROWS)
    if device.type != "cuda":
        return max(1, min(steps, 8))
    cols = -(-N // 64)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-4 * sms // cols), steps // 4, 64))


MAX_DB_RANK = 32  # act_bwd_lora's gate/up dB: three sets of rank-sized accumulators per block


def act_bwd_lora(dh_base, g, u, activation: str, p: float, rescale: bool, mask_seed, down_t: torch.Tensor,
                 down_a: torch.Tensor, down_scaling: float, down_drop: Dropout | None = None, out=None,
                 splits: int | None = None, gate_up: tuple | None = None) -> ActBwdLoraGrads:
    """ActBwdLoraGrads (dg, du, dB_g, dB_u, dA_d): masked_gated_act_bwd with its LoRA term (same arguments and dg, du)
    and, in the same pass on the tensor cores, dA_d = s_d t_d^T dropout_qd(cast_A(h')) (r, I) in A_d's
    dtype, without writing h' or xd. Needs I % 8 == 0, 16-byte aligned rows (``act_bwd_lora_supported``).
    ``gate_up`` = (S_g, s_g, S_u, s_u): also dB_g = s_g cast_A(dg)^T S_g and dB_u likewise, (I, r) in
    A_d's dtype, from the dg and du the pass writes (S_g, S_u (M, r) in A_d's dtype, r <= 32, r_d <= 32,
    16-bit activations). The kernel writes fp32 partials per row split (``splits``: None to choose), summed here
    in a fixed order: any split count gives the same result up to fp32 summation order."""
    if down_t is None or down_a is None:
        raise ValueError("down_t, down_a: required (the pass computes dA_d)")
    args, (dg, du, _, _), _alive = _act_bwd_args(dh_base, g, u, activation, p, rescale, mask_seed, down_t, down_a,
                                                 down_scaling, down_drop, False, False, out)
    M, I = dg.shape
    r, device, adt = down_a.shape[0], dg.device, down_a.dtype
    if I % 8 != 0:
        raise ValueError(f"g: expected a column count divisible by 8, got {I}")
    sides = _gate_up_sides(gate_up, M, r, adt, dg.dtype, device)
    if M == 0 or I == 0:
        zeros = None if sides is None else torch.zeros((I, sides[0].shape[1]), dtype=adt, device=device)
        return ActBwdLoraGrads(dg, du, zeros, None if zeros is None else zeros.clone(),
                               torch.zeros((r, I), dtype=adt, device=device))
    n, per_split = _split_rows(M, I, device, splits)
    part = torch.empty((n, r, I), dtype=torch.float32, device=device)
    fused = {}
    if sides is not None:
        sg, scale_g, su, scale_u = sides
        rgu = sg.shape[1]
        dbg, dbu = (torch.empty((n, rgu, I), dtype=torch.float32, device=device) for _ in range(2))
        fused = dict(sg=sg.data_ptr(), ldsg=_ld(sg), su=su.data_ptr(), ldsu=_ld(su), rank_gu=rgu,
                     scaling_g=float(scale_g), scaling_u=float(scale_u), dbg_part=dbg.data_ptr(), dbu_part=dbu.data_ptr())
    largs = ActBwdLoraArgs(act=args, da_part=part.data_ptr(), splits=n, rows_per_split=per_split, **fused)
    _call("transpeft_act_bwd_lora", largs, device)

    def total(p):  # fixed order over the splits, then one rounding, as unsplit
        return (p[0] if n == 1 else p.sum(0)).to(adt)

    if sides is None:
        return ActBwdLoraGrads(dg, du, None, None, total(part))
    return ActBwdLoraGrads(dg, du, total(dbg).t().contiguous(), total(dbu).t().contiguous(), total(part))


def _gate_up_sides(gate_up, M: int, r_d: int, adt: torch.dtype, act_dtype: torch.dtype, device: torch.device):
    """act_bwd_lora's ``gate_up`` checked: (S_g, s_g, S_u, s_u) with unit column strides, or None."""
    if gate_up is None:
        return None
    sg, scale_g, su, scale_u = gate_up
    sg, su = unit_column_stride(sg, "gate_up S_g"), unit_column_stride(su, "gate_up S_u")
    for name, s in (("S_g", sg), ("S_u", su)):
        if s.device != device:
            raise ValueError(f"gate_up {name}: expected device {device}, got {s.device}")
        if s.dim() != 2 or s.shape[0] != M or not 1 <= s.shape[1] <= MAX_DB_RANK or s.shape != sg.shape or s.dtype != adt:
            raise ValueError(f"gate_up {name}: expected ({M}, r <= {MAX_DB_RANK}) like S_g, in down_a's dtype {adt}, "
                             f"got {tuple(s.shape)} {s.dtype}")
    if r_d > MAX_DB_RANK:
        raise ValueError(f"gate_up: the gate/up dB needs the down rank <= {MAX_DB_RANK}, got {r_d}")
    if act_dtype == torch.float32:
        raise ValueError("gate_up: the gate/up dB needs 16-bit activations (g, u, dh_base), got float32")
    return sg, scale_g, su, scale_u


def _split_rows(M: int, N: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(splits, rows per split) for M rows: a multiple of SPLIT_ROWS per split, no split empty."""
    steps = -(-M // SPLIT_ROWS)
    n = row_splits(M, N, device) if splits is None else splits
    if n < 1:
        raise ValueError(f"splits: expected a positive count, got {splits}")
    per_split = -(-steps // min(n, steps)) * SPLIT_ROWS
    return -(-M // per_split), per_split


MAX_REDUCE_RANK = 64  # lora_token_reduce keeps (rank, 64) accumulators per block


def lora_token_reduce(l: torch.Tensor, x: torch.Tensor, scaling: float, drop: Dropout | None = None,
                      splits: int | None = None) -> torch.Tensor:
    """scaling * l^T dropout_q(cast_A(x)), (R, N) in l's dtype (the adapter dtype): the LoRA gradients'
    token sums without an (M, N) copy of x in the adapter dtype. l (M, R), R <= 64; x (M, N).
    dB = lora_token_reduce(S, dY, s).t() and dA = lora_token_reduce(t, x, s, dropout). fp32 partials
    per row split (``splits``: None to choose) are summed here in a fixed order."""
    l, x = unit_column_stride(l, "l"), unit_column_stride(x, "x")
    M, R = l.shape
    if x.shape[0] != M or not 1 <= R <= MAX_REDUCE_RANK:
        raise ValueError(f"l, x: expected (M, R <= {MAX_REDUCE_RANK}) and (M, N), got {tuple(l.shape)} and "
                         f"{tuple(x.shape)}")
    if l.dtype != torch.float32 and l.dtype != x.dtype:
        raise ValueError(f"l: a 16-bit adapter dtype must be x's ({x.dtype}), got {l.dtype}")
    device = check_same_device(l=l, x=x)
    N = x.shape[1]
    if M == 0 or N == 0:
        return torch.zeros((R, N), dtype=l.dtype, device=device)
    n, per_split = _split_rows(M, N, device, splits)
    part = torch.empty((n, R, N), dtype=torch.float32, device=device)
    d, _keep = _dropout_args(drop, l.dtype, device)
    args = LoraTokenReduceArgs(l=l.data_ptr(), ldl=_ld(l), x=x.data_ptr(), ldx=_ld(x), part=part.data_ptr(), M=M, N=N,
                               R=R, x_dtype=dtype_code(x, "x"), l_dtype=dtype_code(l, "l"), scaling=float(scaling),
                               drop=d, splits=n, rows_per_split=per_split)
    _call("transpeft_lora_token_reduce", args, device)
    return (part[0] if n == 1 else part.sum(0)).to(l.dtype)


def act_bwd_lora_supported(*tensors: torch.Tensor) -> bool:
    """Whether act_bwd_lora takes these (M, I) operands as they are: I % 8 == 0 and rows it reads in 16-byte
    groups (``_aligned_rows``)."""
    return all(t.dim() == 2 and t.shape[1] % 8 == 0 and _aligned_rows(t) for t in tensors)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, drop: Dropout | None = None,
                splits: int | None = None) -> torch.Tensor:
    """S = dropout_q(cast_A(x)) a^T: x (M, K), a (R, K), any strides -> S (M, R) in a's dtype.
    Pass ``a = B.t()`` (and no dropout) for t = cast_A(dY) B. The tensor-core shrink (R <= 64, x with unit
    column stride) may split K (``splits``: None to choose, see ``shrink_splits``) into fp32 partials,
    summed here in a fixed order: any split count gives the same result up to fp32 summation order."""
    for name, t in (("x", x), ("a", a)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    if a.shape[1] != x.shape[1]:
        raise ValueError(f"a: expected {x.shape[1]} columns to match x, got shape {tuple(a.shape)}")
    device = check_same_device(x=x, a=a)
    M, K = x.shape
    R = a.shape[0]
    s = torch.empty((M, R), dtype=a.dtype, device=device)
    d, _keep = _dropout_args(drop, a.dtype, device)
    tile = 1 <= R <= MAX_FUSED_RANK and (K <= 1 or x.stride(1) == 1)  # what the tensor-core shrink takes
    n, per_split = _k_splits(M, K, device, splits) if tile and M > 0 else (1, K)
    part, split = None, {}
    if n > 1:
        part = torch.empty((n, M, R), dtype=torch.float32, device=device)
        split = dict(s_part=part.data_ptr(), k_splits=n, cols_per_split=per_split)
    args = LoraShrinkArgs(x=x.data_ptr(), sxm=x.stride(0), sxk=x.stride(1), a=a.data_ptr(), sar=a.stride(0),
                          sak=a.stride(1), s=s.data_ptr(), lds=max(R, 1), M=M, K=K, R=R, x_dtype=dtype_code(x, "x"),
                          a_dtype=dtype_code(a, "a"), drop=d, **split)
    _call("transpeft_lora_shrink", args, device)
    return s if part is None else part.sum(0).to(a.dtype)  # fixed order over the splits, then one rounding


SHRINK_ROWS = 64  # the tensor-core shrink's rows per block


def shrink_splits(M: int, K: int, device: torch.device) -> int:
    """K splits of the tensor-core shrink: enough (64-row blocks x splits) to fill the GPU three times over
    (three blocks fit on an SM), each split at least 8 steps of 64 columns; on the CPU (the emulation) 2
    when K has at least 4 steps, so tests cover the split sum."""
    steps = -(-K // 64)
    if device.type != "cuda":
        return 2 if steps >= 4 else 1
    blocks = -(-M // SHRINK_ROWS)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-3 * sms // blocks), steps // 8, 64))


def _k_splits(M: int, K: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(splits, columns per split, a multiple of 64) for K columns, no split empty."""
    steps = -(-K // 64)
    n = shrink_splits(M, K, device) if splits is None else splits
    if n < 1:
        raise ValueError(f"splits: expected a positive count, got {splits}")
    if steps == 0:
        return 1, K
    per_split = -(-steps // min(n, steps)) * 64
    return -(-K // per_split), per_split


def lora_expand_(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor, scaling: float, grad: bool = False,
                 drop: Dropout | None = None) -> torch.Tensor:
    """In place on a fresh y (M, N): y = T(y + s * (S b^T)) (forward) or, with ``grad``,
    y = T(y + T(s * D(S b^T))) with D the dropout mask over (M, N) (dX). S (M, R), b (N, R), any strides,
    one dtype. Returns y."""
    y = unit_column_stride(y, "y")
    if s.dim() != 2 or b.dim() != 2 or s.shape[0] != y.shape[0] or b.shape[0] != y.shape[1] or s.shape[1] != b.shape[1]:
        raise ValueError(f"s, b: expected ({y.shape[0]}, R) and ({y.shape[1]}, R), got {tuple(s.shape)} {tuple(b.shape)}")
    if s.dtype != b.dtype:
        raise ValueError(f"b: expected dtype {s.dtype} like s, got {b.dtype}")
    device = check_same_device(y=y, s=s, b=b)
    M, N = y.shape
    d, _keep = _dropout_args(drop if grad else None, s.dtype, device)
    args = LoraExpandArgs(y=y.data_ptr(), ldy=_ld(y), s=s.data_ptr(), ssm=s.stride(0), ssr=s.stride(1), b=b.data_ptr(),
                          sbn=b.stride(0), sbr=b.stride(1), M=M, N=N, R=s.shape[1], y_dtype=dtype_code(y, "y"),
                          lora_dtype=dtype_code(s, "s"), scaling=float(scaling), grad_mode=int(grad), drop=d)
    _call("transpeft_lora_expand", args, device)
    return y


def lora_dropout_cast(x: torch.Tensor, dtype: torch.dtype, drop: Dropout) -> torch.Tensor:
    """dropout_q(x.to(dtype)), (M, K) fresh, keep from (drop.seed, m * K + k)."""
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor, got shape {tuple(x.shape)}")
    M, K = x.shape
    out = torch.empty((M, K), dtype=dtype, device=x.device)
    d, _keep = _dropout_args(drop, dtype, x.device)
    args = LoraDropoutCastArgs(x=x.data_ptr(), sxm=x.stride(0), sxk=x.stride(1), out=out.data_ptr(), ldo=max(K, 1),
                               M=M, K=K, x_dtype=dtype_code(x, "x"), out_dtype=dtype_code(out, "out"), drop=d)
    _call("transpeft_lora_dropout_cast", args, x.device)
    return out
