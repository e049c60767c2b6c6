"""Every compiled variant of the Triton kernels, for ``python -m transpeft_kernels compile-check``.

A variant is one kernel with its constexprs fixed (dtypes, layout flags, block sizes) and its launch
options (warps, stages). The set covers each I/O dtype and layout of every kernel with the default
config of the architecture, and every autotune candidate of the architecture with bf16 operands (the
performance dtype) — candidates whose shared-memory estimate exceeds the limit for a dtype are
dropped by the tuner at run time, so they are compiled only where the tuner could pick them. The
tables (ACT_CASES, ..., EPILOGUE_CASES) hold one record
per case, built with keywords; a record with ``tuned=True`` is compiled with every candidate.

Each variant is compiled as a real launch specialises it: pointers 16-byte aligned, the int arguments
that the launch passes as 1 turned into the constant 1 (the launcher's JIT makes an int argument
equal to 1 a constexpr), every other int argument divisible by 16 (the realistic shapes: d = 4096,
I = 14336, ...; the strides of an absent operand, passed as 0, are divisible too). That is the code
that runs, with vectorised loads and cp.async pipelining, so its shared memory is what the limit
check needs. Which arguments are 1 is given per kernel and phase by ``unit_strides``: the launchers
pass the column stride of each row-major operand (1) and the backward passes transposed views
(W^T, A^T, B^T: the 1 is on their first dimension); python_tests/test_variants_specialisation.py
checks the table against the arguments of real launches.

Run as a module (``python -m transpeft_kernels.kernels.triton.variants --arch 90``) in a process
WITHOUT TRITON_INTERPRET: it compiles each variant with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` (no GPU needed) and prints one JSON line per variant. With
``--sass`` each line also carries the SASS metrics of the variant's cubin (kernels/sass.py), with
``--only TEXT`` only the variants whose "kernel label" contains TEXT are compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

from ..launch_args import ACT_CODES
from . import configs
from ._common import BF16, CODE_NAMES, FP16, FP32, TF32, TORCH_DTYPES
from .act_bwd_lora import block_n_for_rank, config_fits

_PTR = {FP32: "*fp32", FP16: "*fp16", BF16: "*bf16", TF32: "*fp32"}  # TF32: fp32 adapters, single tf32 dots
SILU, GELU, GELU_TANH = ACT_CODES["silu"], ACT_CODES["gelu"], ACT_CODES["gelu_tanh"]

# The fp32 scalar arguments of each kernel. Every other argument that is neither a pointer nor a
# constexpr is an int (i32, or the constant 1 for a unit stride); compile_variant refuses a name here
# that is not an argument of the kernel.
FLOAT_ARGS = {
    "masked_gated_act.masked_gated_act_fwd_kernel": ("c",),
    "masked_gated_act.masked_gated_act_bwd_kernel": ("c",),
    "lora_shrink.lora_shrink_kernel": ("drop_scale",),
    "gemm_lora_expand.gemm_lora_expand_kernel": ("scaling", "drop_scale"),
    "gate_up_act.gate_up_act_kernel": ("scaling_g", "scaling_u", "c"),
    "token_reduce.token_reduce_kernel": ("scale", "drop_scale"),
    "act_bwd_lora.act_bwd_lora_kernel": ("c", "scaling_g", "scaling_u", "scaling_d", "drop_scale"),
    "lora_epilogue.lora_expand_add_kernel": ("scaling", "scaling2", "drop_scale", "drop_scale2"),
    "lora_epilogue.gate_up_lora_act_kernel": ("scaling_g", "scaling_u", "c"),
    "split_sum.split_sum_kernel": (),
}
# The integer mask thresholds (reference.philox.keep_threshold, in [0, 65536]): plain i32 values,
# declared ``do_not_specialize`` by their kernels, so compiled without the divisibility-by-16 hint of
# the shape and stride arguments (and never as the constant 1).
THRESHOLD_ARGS = ("threshold", "drop_threshold", "drop_threshold2")


@dataclass(frozen=True)
class Variant:
    kernel: str  # module.function
    label: str
    pointers: dict  # pointer arg -> signature type
    constexprs: dict
    num_warps: int
    num_stages: int
    phase: str  # "forward" or "backward": the launch it stands for (decides the transposed operands)
    unit_strides: tuple  # the int args a real launch passes as 1 (compiled as the constant 1)
    floats: tuple  # the fp32 scalar args (FLOAT_ARGS[kernel])

    def load(self):
        import importlib

        mod, fn = self.kernel.rsplit(".", 1)
        return getattr(importlib.import_module(f"{__package__}.{mod}"), fn)

    @property
    def elements_per_thread(self) -> int | None:
        """Elements one thread handles per program, for the elementwise kernels (masked_gated_act:
        a BLOCK_M x BLOCK_N tile over 32 * num_warps threads); None for the others."""
        if not self.kernel.startswith("masked_gated_act."):
            return None
        return self.constexprs["BLOCK_M"] * self.constexprs["BLOCK_N"] // (32 * self.num_warps)


def unit_strides(kernel: str, phase: str, constexprs: dict) -> tuple[str, ...]:
    """The stride arguments that the launcher passes as 1 for ``kernel`` ("function" or
    "module.function") in ``phase``, with row-major contiguous tensors (as the ops layer passes them).

    masked_gated_act fwd/bwd, act_bwd_lora: none (the kernels take row strides only; the column stride
        is 1 by construction, and rank-sized operands are contiguous with their rank as row stride).
    split_sum: none (contiguous partials and result, no strides).
    lora_shrink: forward S = x A^T with x (M, K), A (R, K): stride_xk, stride_ak, stride_sr;
        backward t = dy B, where "A" is the view B^T (R, N) of B (N, R): stride_xk, stride_ar, stride_sr.
    gemm_lora_expand: forward y = x W^T (+ S B^T): stride_xk, stride_wk, stride_yn (+ stride_sr,
        stride_br); backward dX = dy W (+ t A) through the views W^T and A^T: stride_xk, stride_wn,
        stride_yn (+ stride_sr, stride_bn). Without LoRA the S and B strides are passed as 0.
    gate_up_act: x, Wg, Wu, g, u, h' (split halves of the fused layout keep a unit column stride),
        plus S and B of each side that has LoRA (0 strides otherwise).
    lora_expand_add: S (M, R) and B (N, R): stride_sr and stride_br forward (y += s S B^T), stride_sr
        and stride_bn backward (dX += s D(t A), B the view A^T); the second term's alike.
    gate_up_lora_act: the S and B of each side with LoRA (stride_sgr, stride_lbgr, stride_sur, stride_lbur).
    token_reduce (dW, dA, dB): P (T, A), Q (T, B), out (splits, A, B): stride_pa, stride_qb,
        stride_ob, plus stride_ca of the (splits, A) column sum when HAS_COLSUM (0 strides otherwise).
    """
    fn = kernel.rsplit(".", 1)[-1]
    c = constexprs
    fwd = phase == "forward"
    if phase not in ("forward", "backward"):
        raise ValueError(f"phase: expected 'forward' or 'backward', got {phase!r}")
    if fn in ("masked_gated_act_fwd_kernel", "masked_gated_act_bwd_kernel", "act_bwd_lora_kernel", "split_sum_kernel"):
        return ()
    if fn == "lora_shrink_kernel":
        return ("stride_xk", "stride_ak" if fwd else "stride_ar", "stride_sr")
    if fn == "gemm_lora_expand_kernel":
        units = ("stride_xk", "stride_wk" if fwd else "stride_wn", "stride_yn")
        if c["HAS_LORA"]:
            units += ("stride_sr", "stride_br" if fwd else "stride_bn")
        return units
    if fn == "gate_up_act_kernel":
        units = ("stride_xk", "stride_wgk", "stride_wuk", "stride_gn", "stride_un", "stride_hn")
        if c["LORA_G"]:
            units += ("stride_sgr", "stride_lbgr")
        if c["LORA_U"]:
            units += ("stride_sur", "stride_lbur")
        return units
    if fn == "lora_expand_add_kernel":
        units = ("stride_sr", "stride_br" if fwd else "stride_bn")
        return units + (("stride_s2r", "stride_b2r" if fwd else "stride_b2n") if c["SECOND"] else ())
    if fn == "gate_up_lora_act_kernel":
        return (("stride_sgr", "stride_lbgr") if c["LORA_G"] else ()) + (("stride_sur", "stride_lbur") if c["LORA_U"] else ())
    if fn == "token_reduce_kernel":
        return ("stride_pa", "stride_qb", "stride_ob") + (("stride_ca",) if c["HAS_COLSUM"] else ())
    raise KeyError(f"no unit-stride rule for kernel {kernel!r}")


# ---- the variant tables ---------------------------------------------------------------------------
# One record per compiled case of a kernel family, built with keywords. Each record compiles with its
# family's default config of the architecture, and with ``tuned=True`` also with every other autotune
# candidate of the family. ``label`` is the variant's name in compile-check's table and --only.

def _names(*codes) -> str:
    return ",".join(CODE_NAMES[c] if c is not None else "-" for c in codes)


@dataclass(frozen=True, kw_only=True)
class _Case:
    tuned: bool = False
    archs: tuple[str, ...] | None = None  # the architectures whose launchers run the case (None: every one)
    family = ""  # configs.CONFIG_SETS key
    kernel = ""  # module.function
    phase = "forward"

    @property
    def label(self) -> str:
        raise NotImplementedError

    def pointers(self) -> dict:
        raise NotImplementedError

    def constexprs(self) -> dict:
        raise NotImplementedError

    def meta(self) -> dict:
        """Block sizes fixed by the case (the config sets the others); they override the config's."""
        return {}

    @property
    def elem_bytes(self) -> int | None:
        """The element size the launcher passes to ``configs.choose`` (None where no family default
        depends on it)."""
        return None

    def fits(self, config) -> bool:
        """Whether the launcher lets the tuner try ``config`` for this case (an autotune candidate that
        spills there is left out by the launcher, and so here)."""
        return True

    def variants(self, default, extra: list) -> list[Variant]:
        out = []
        for config in [default] + ([c for c in extra if self.fits(c)] if self.tuned else []):
            consts = {**self.constexprs(), **config.kwargs(), **self.meta()}
            out.append(Variant(kernel=self.kernel, label=self.label, pointers=self.pointers(), constexprs=consts,
                               num_warps=config.num_warps, num_stages=config.num_stages, phase=self.phase,
                               unit_strides=unit_strides(self.kernel, self.phase, consts),
                               floats=FLOAT_ARGS[self.kernel]))
        return out


@dataclass(frozen=True, kw_only=True)
class ActFwd(_Case):
    """h' = act(g) * u * mask."""

    dtype: int
    act: int
    mask: bool
    family = "elementwise"
    kernel = "masked_gated_act.masked_gated_act_fwd_kernel"
    _name = "act_fwd"
    _ptrs = ("g_ptr", "u_ptr", "h_ptr")

    @property
    def label(self) -> str:
        return f"{self._name} {CODE_NAMES[self.dtype]} act={self.act} mask={self.mask}"

    def pointers(self) -> dict:
        return {n: _PTR[self.dtype] for n in self._ptrs} | {"seed_ptr": "*i64"}

    def constexprs(self) -> dict:
        return dict(ACT=self.act, HAS_MASK=self.mask)


@dataclass(frozen=True, kw_only=True)
class ActBwd(ActFwd):
    """dg, du of h' = act(g) * u * mask."""

    kernel = "masked_gated_act.masked_gated_act_bwd_kernel"
    phase = "backward"
    _name = "act_bwd"
    _ptrs = ("dh_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr")


@dataclass(frozen=True, kw_only=True)
class Shrink(_Case):
    """S = dropout(x) A^T. Without dropout it stands for the backward's t = dy B, whose "A" is the
    transposed view B^T (unit stride along the rank)."""

    x: int
    adapter: int  # the dtype of A and S (and of the tl.dot)
    dropout: bool
    block_r: int = 16
    family = "shrink"
    kernel = "lora_shrink.lora_shrink_kernel"

    @property
    def phase(self) -> str:
        return "forward" if self.dropout else "backward"

    @property
    def label(self) -> str:
        return f"shrink x={CODE_NAMES[self.x]} A={CODE_NAMES[self.adapter]} drop={self.dropout} R={self.block_r}"

    @property
    def elem_bytes(self) -> int:
        return TORCH_DTYPES[self.adapter].itemsize  # the launcher passes a.element_size()

    def pointers(self) -> dict:
        return {"x_ptr": _PTR[self.x], "a_ptr": _PTR[self.adapter], "s_ptr": _PTR[self.adapter], "seed_ptr": "*i64"}

    def constexprs(self) -> dict:
        return dict(HAS_DROPOUT=self.dropout, DOT_DTYPE=self.adapter, UPCAST=False)

    def meta(self) -> dict:
        return dict(BLOCK_R=self.block_r)


@dataclass(frozen=True, kw_only=True)
class Expand(_Case):
    """y = x W^T (+ b) (+ s S B^T): the forward with a bias, or dX = dy W + s t A with the dropout mask in
    the epilogue (both weights transposed views, unit stride on their first dimension)."""

    x: int  # the dtype of x, W, the bias and y
    lora: int | None  # the dtype of S and B; None: no LoRA term
    bias: bool
    dropout_mask: bool  # the backward's dX (dropout mask on the LoRA term)
    family = "gemm"
    kernel = "gemm_lora_expand.gemm_lora_expand_kernel"

    @property
    def phase(self) -> str:
        return "backward" if self.dropout_mask else "forward"

    @property
    def elem_bytes(self) -> int:
        return TORCH_DTYPES[self.x].itemsize  # the launcher passes x.element_size()

    @property
    def label(self) -> str:
        if self.lora is None:
            return f"expand x={CODE_NAMES[self.x]} no-lora"
        return f"expand x={CODE_NAMES[self.x]} lora={CODE_NAMES[self.lora]} bias={self.bias} dropmask={self.dropout_mask}"

    def pointers(self) -> dict:
        lora = self.x if self.lora is None else self.lora
        return {"x_ptr": _PTR[self.x], "w_ptr": _PTR[self.x], "bias_ptr": _PTR[self.x], "s_ptr": _PTR[lora],
                "b_ptr": _PTR[lora], "y_ptr": _PTR[self.x], "seed_ptr": "*i64"}

    def constexprs(self) -> dict:
        return dict(HAS_BIAS=self.bias, HAS_LORA=self.lora is not None, LORA_DROPOUT=self.dropout_mask,
                    X_DTYPE=self.x, LORA_DTYPE=self.x if self.lora is None else self.lora, UPCAST=False)

    def meta(self) -> dict:
        return dict(BLOCK_R=16)


@dataclass(frozen=True, kw_only=True)
class GateUp(_Case):
    """g, u = x Wg^T, x Wu^T (+ biases, + LoRA per side) with h' = act(g) * u * mask in the epilogue. The
    fused layout (one adapter and one bias for both halves) compiles the same kernel; it is its own
    case so that the table says which combinations a fused projection reaches."""

    x: int
    layout: str  # "split" or "fused"
    act: int
    gate_lora: int | None  # the gate adapter's dtype; None: no LoRA on the gate
    up_lora: int | None
    gate_bias: bool
    up_bias: bool
    mask: bool
    family = "gate_up"
    kernel = "gate_up_act.gate_up_act_kernel"

    @property
    def label(self) -> str:
        return (f"gate_up {self.layout} x={CODE_NAMES[self.x]} act={self.act} lora=({_names(self.gate_lora, self.up_lora)}) "
                f"bias=({self.gate_bias},{self.up_bias}) mask={self.mask}")

    @property
    def elem_bytes(self) -> int:
        return TORCH_DTYPES[self.x].itemsize  # the launcher passes x.element_size()

    def _lora_dtypes(self) -> tuple[int, int]:
        return tuple(self.x if c is None else c for c in (self.gate_lora, self.up_lora))

    def pointers(self) -> dict:
        g, u = self._lora_dtypes()
        x = _PTR[self.x]
        return {"x_ptr": x, "wg_ptr": x, "wu_ptr": x, "bg_ptr": x, "bu_ptr": x, "sg_ptr": _PTR[g], "lbg_ptr": _PTR[g],
                "su_ptr": _PTR[u], "lbu_ptr": _PTR[u], "g_ptr": x, "u_ptr": x, "h_ptr": x, "seed_ptr": "*i64"}

    def constexprs(self) -> dict:
        g, u = self._lora_dtypes()
        return dict(ACT=self.act, BIAS_G=self.gate_bias, BIAS_U=self.up_bias, LORA_G=self.gate_lora is not None,
                    LORA_U=self.up_lora is not None, HAS_MASK=self.mask, X_DTYPE=self.x, LORA_G_DTYPE=g,
                    LORA_U_DTYPE=u, UPCAST=False)

    def meta(self) -> dict:
        return dict(BLOCK_R=64 if self.act == GELU else 16)


@dataclass(frozen=True, kw_only=True)
class TokenReduce(_Case):
    """out = P^T Q summed over tokens: dA (narrow A, dropout on Q), dB (narrow B), dW + db (wide, with
    the column sum of P)."""

    what: str  # "dA", "dB" or "dW"
    p: int
    q: int
    dot: int
    q_dropout: bool
    colsum: bool
    block_a: int | None = None  # a narrow side's block size (None: the config's)
    block_b: int | None = None
    family = "token_reduce"
    kernel = "token_reduce.token_reduce_kernel"
    phase = "backward"

    @property
    def label(self) -> str:
        return f"token_reduce {self.what} P={CODE_NAMES[self.p]} Q={CODE_NAMES[self.q]} dot={CODE_NAMES[self.dot]}"

    def pointers(self) -> dict:
        return {"p_ptr": _PTR[self.p], "q_ptr": _PTR[self.q], "out_ptr": _PTR[self.dot], "colsum_ptr": _PTR[self.p],
                "seed_ptr": "*i64"}

    def constexprs(self) -> dict:
        return dict(Q_DROPOUT=self.q_dropout, HAS_COLSUM=self.colsum, DOT_DTYPE=self.dot, UPCAST=False,
                    LORA_DOT=self.what != "dW")

    def meta(self) -> dict:
        return {k: v for k, v in (("BLOCK_A", self.block_a), ("BLOCK_B", self.block_b)) if v is not None}


@dataclass(frozen=True, kw_only=True)
class ActBwdLora(_Case):
    """The one-pass activation backward with the LoRA partials: dg, du; dB per gate/up side with LoRA;
    dA of the down LoRA (h' rebuilt in registers, its dropout regenerated)."""

    x: int
    act: int
    gate_lora: int | None  # the gate adapter's dtype; None: no LoRA on the gate
    up_lora: int | None
    down_lora: int | None
    rank: int = 16
    mask: bool = True
    dropout: bool = True  # the down LoRA's dropout
    fold: bool = False    # the down LoRA's term of dh' added in the pass
    family = "act_bwd_lora"
    kernel = "act_bwd_lora.act_bwd_lora_kernel"
    phase = "backward"

    @property
    def label(self) -> str:
        return (f"act_bwd_lora x={CODE_NAMES[self.x]} act={self.act} lora=({_names(self.gate_lora, self.up_lora, self.down_lora)}) "
                f"r={self.rank} mask={self.mask}" + (" fold" if self.fold else ""))

    @property
    def elem_bytes(self) -> int:
        return TORCH_DTYPES[self.x].itemsize  # the launcher passes g.element_size()

    def _codes(self) -> tuple[int, int, int]:
        return tuple(self.x if c is None else c for c in (self.gate_lora, self.up_lora, self.down_lora))

    def pointers(self) -> dict:
        x, (g, u, d) = _PTR[self.x], self._codes()
        f32 = _PTR[FP32]
        return {"dh_ptr": x, "g_ptr": x, "u_ptr": x, "dg_ptr": x, "du_ptr": x, "seed_ptr": "*i64",
                "sg_ptr": _PTR[g], "dbg_ptr": f32, "su_ptr": _PTR[u], "dbu_ptr": f32,
                "td_ptr": _PTR[d], "dad_ptr": f32, "dseed_ptr": "*i64", "ad_ptr": _PTR[d]}

    def constexprs(self) -> dict:
        g, u, d = self._codes()
        return dict(ACT=self.act, HAS_MASK=self.mask, LORA_G=self.gate_lora is not None, LORA_U=self.up_lora is not None,
                    LORA_D=self.down_lora is not None, D_DROPOUT=self.down_lora is not None and self.dropout,
                    FOLD_D=self.fold, G_DTYPE=g, U_DTYPE=u, D_DTYPE=d, UPCAST=False)

    def fits(self, config) -> bool:
        return config_fits(config, self.rank, self.fold)

    def meta(self) -> dict:
        block_r = max(16, self.rank)
        meta = dict(BLOCK_R=block_r, BLOCK_RD=block_r)
        all_fp32 = all(c == FP32 for c in (self.gate_lora, self.up_lora, self.down_lora) if c is not None)
        if block_n_for_rank(128, self.rank, all_fp32, self.fold) == 64:  # the launcher halves BLOCK_N for these ranks
            meta["BLOCK_N"] = 64
        return meta


@dataclass(frozen=True, kw_only=True)
class ExpandAdd(_Case):
    """y += s D(S B^T) in place over a cuBLAS output: the forward (no mask) and dX (the dropout mask);
    with ``accumulate=False`` the C operand of a cuBLAS addmm_ (bias + one or two terms, y not read)."""

    x: int
    lora: int
    dropout: bool
    block_r: int = 16  # the launcher's BLOCK_R: the rank rounded up to a power of two, 16 to 64
    accumulate: bool = True
    bias: bool = False
    terms: int = 1  # two: the gate and up dX terms of one MLP input, each with its own mask
    family = "epilogue"
    kernel = "lora_epilogue.lora_expand_add_kernel"

    @property
    def phase(self) -> str:
        return "backward" if self.dropout else "forward"

    @property
    def label(self) -> str:
        head = "expand_add" if self.accumulate else "expand_into"
        return (f"{head} x={CODE_NAMES[self.x]} lora={CODE_NAMES[self.lora]} mask={self.dropout}"
                + (f" terms={self.terms}" if self.terms != 1 else "") + (" bias" if self.bias else "")
                + (f" r={self.block_r}" if self.block_r != 16 else ""))

    @property
    def elem_bytes(self) -> int:
        return TORCH_DTYPES[self.x].itemsize

    def pointers(self) -> dict:
        lora = _PTR[self.lora]
        return {"y_ptr": _PTR[self.x], "s_ptr": lora, "b_ptr": lora, "seed_ptr": "*i64", "s2_ptr": lora,
                "b2_ptr": lora, "seed2_ptr": "*i64", "bias_ptr": _PTR[self.x]}

    def constexprs(self) -> dict:
        second = self.terms == 2
        return dict(ACCUMULATE=self.accumulate, HAS_BIAS=self.bias, SECOND=second, LORA_DROPOUT=self.dropout,
                    LORA_DROPOUT2=second and self.dropout, LORA_DTYPE=self.lora, UPCAST=False)

    def meta(self) -> dict:
        return dict(BLOCK_R=self.block_r)


@dataclass(frozen=True, kw_only=True)
class GateUpLoraAct(_Case):
    """g, u += LoRA expands in place over the cuBLAS gate/up outputs, and h' = act(g) u mask."""

    x: int
    act: int
    gate_lora: int | None
    up_lora: int | None
    mask: bool
    block_r: int = 16
    family = "epilogue"
    kernel = "lora_epilogue.gate_up_lora_act_kernel"

    @property
    def label(self) -> str:
        return (f"gate_up_lora_act x={CODE_NAMES[self.x]} act={self.act} lora=({_names(self.gate_lora, self.up_lora)}) "
                f"mask={self.mask}" + (f" r={self.block_r}" if self.block_r != 16 else ""))

    @property
    def elem_bytes(self) -> int:
        return TORCH_DTYPES[self.x].itemsize

    def pointers(self) -> dict:
        x = _PTR[self.x]
        g, u = (_PTR[self.x if c is None else c] for c in (self.gate_lora, self.up_lora))
        return {"g_ptr": x, "u_ptr": x, "h_ptr": x, "sg_ptr": g, "lbg_ptr": g, "su_ptr": u, "lbu_ptr": u,
                "seed_ptr": "*i64"}

    def constexprs(self) -> dict:
        g, u = (self.x if c is None else c for c in (self.gate_lora, self.up_lora))
        return dict(ACT=self.act, LORA_G=self.gate_lora is not None, LORA_U=self.up_lora is not None, HAS_MASK=self.mask,
                    LORA_G_DTYPE=g, LORA_U_DTYPE=u, UPCAST=False)

    def meta(self) -> dict:
        return dict(BLOCK_R=self.block_r)


# masked gated activation: every dtype, every activation (cycled over dtypes), mask on and off
ACT_CASES = (
    ActFwd(dtype=FP32, act=SILU, mask=True),
    ActBwd(dtype=FP32, act=SILU, mask=True),
    ActFwd(dtype=FP16, act=GELU, mask=True),
    ActBwd(dtype=FP16, act=GELU, mask=True),
    ActFwd(dtype=BF16, act=GELU_TANH, mask=True, tuned=True),
    ActBwd(dtype=BF16, act=GELU_TANH, mask=True, tuned=True),
    ActFwd(dtype=BF16, act=SILU, mask=False),
    ActBwd(dtype=BF16, act=SILU, mask=False),
    # the benchmark's activation (Llama: silu) with the mask, and gelu_tanh without it: with the rows
    # above, the mask's own cost per element (perf/roofline.py reads it off these)
    ActFwd(dtype=BF16, act=SILU, mask=True),
    ActBwd(dtype=BF16, act=SILU, mask=True),
    ActFwd(dtype=BF16, act=GELU_TANH, mask=False),
    ActBwd(dtype=BF16, act=GELU_TANH, mask=False),
)

# LoRA shrink: (x dtype, adapter dtype), the forward with dropout and the backward's t = dy B without
SHRINK_CASES = (
    Shrink(x=FP32, adapter=FP32, dropout=True),
    Shrink(x=BF16, adapter=FP32, dropout=True),
    Shrink(x=BF16, adapter=BF16, dropout=True, tuned=True),
    Shrink(x=BF16, adapter=BF16, dropout=True, block_r=64),  # rank 64 in one block
    Shrink(x=FP16, adapter=FP32, dropout=False),
    Shrink(x=FP16, adapter=FP16, dropout=True),
    Shrink(x=BF16, adapter=FP32, dropout=False),
    Shrink(x=BF16, adapter=FP32, dropout=True, block_r=32),  # rank 32 (the launcher's block_r)
    Shrink(x=BF16, adapter=BF16, dropout=True, block_r=32),
    Shrink(x=BF16, adapter=FP32, dropout=False, block_r=64),
    Shrink(x=BF16, adapter=FP32, dropout=True, block_r=64),
    # fp32 adapters under torch's "high" fp32 matmul precision: one tf32 MMA per product (_common.TF32);
    # the forward's shrink and the backward's t = dY B
    Shrink(x=BF16, adapter=TF32, dropout=True),
    Shrink(x=BF16, adapter=TF32, dropout=False),
)

# base GEMM + LoRA expand: the forward (bias, no epilogue mask), dX (epilogue mask), no LoRA
EXPAND_CASES = (
    Expand(x=FP32, lora=FP32, bias=True, dropout_mask=False),
    Expand(x=BF16, lora=FP32, bias=True, dropout_mask=False, tuned=True),
    Expand(x=BF16, lora=BF16, bias=True, dropout_mask=False),
    Expand(x=FP16, lora=FP32, bias=True, dropout_mask=False),
    Expand(x=FP16, lora=FP16, bias=True, dropout_mask=False),
    Expand(x=BF16, lora=FP32, bias=False, dropout_mask=True),
    Expand(x=BF16, lora=BF16, bias=False, dropout_mask=True),
    Expand(x=FP16, lora=FP16, bias=False, dropout_mask=True),
    Expand(x=BF16, lora=None, bias=False, dropout_mask=False),
    Expand(x=BF16, lora=TF32, bias=True, dropout_mask=False),  # single tf32 rank steps
    Expand(x=BF16, lora=TF32, bias=False, dropout_mask=True),
)

# gate/up GEMM + masked activation epilogue: every I/O dtype x layout x activation; LoRA on both, one
# or neither side (the adapter in fp32 or the I/O dtype), biases and masking vary across the rows
GATE_UP_CASES = (
    GateUp(x=FP32, layout="split", act=SILU, gate_lora=FP32, up_lora=FP32, gate_bias=True, up_bias=True, mask=True),
    GateUp(x=FP32, layout="split", act=GELU, gate_lora=FP32, up_lora=None, gate_bias=True, up_bias=False, mask=True),
    GateUp(x=FP32, layout="split", act=GELU_TANH, gate_lora=None, up_lora=None, gate_bias=False, up_bias=False,
           mask=False),
    GateUp(x=FP16, layout="split", act=SILU, gate_lora=None, up_lora=FP32, gate_bias=False, up_bias=True, mask=True),
    GateUp(x=FP16, layout="split", act=GELU, gate_lora=FP16, up_lora=FP16, gate_bias=True, up_bias=True, mask=False),
    GateUp(x=FP16, layout="split", act=GELU_TANH, gate_lora=FP32, up_lora=FP32, gate_bias=False, up_bias=False,
           mask=True),
    GateUp(x=BF16, layout="split", act=SILU, gate_lora=FP32, up_lora=FP32, gate_bias=True, up_bias=True, mask=True,
           tuned=True),
    GateUp(x=BF16, layout="split", act=GELU, gate_lora=BF16, up_lora=BF16, gate_bias=False, up_bias=False, mask=True),
    GateUp(x=BF16, layout="split", act=GELU_TANH, gate_lora=FP32, up_lora=BF16, gate_bias=True, up_bias=False,
           mask=False),
    GateUp(x=FP32, layout="fused", act=SILU, gate_lora=FP32, up_lora=FP32, gate_bias=True, up_bias=True, mask=True),
    GateUp(x=FP32, layout="fused", act=GELU, gate_lora=None, up_lora=None, gate_bias=False, up_bias=False, mask=False),
    GateUp(x=FP32, layout="fused", act=GELU_TANH, gate_lora=FP32, up_lora=FP32, gate_bias=False, up_bias=False,
           mask=True),
    GateUp(x=FP16, layout="fused", act=SILU, gate_lora=FP16, up_lora=FP16, gate_bias=False, up_bias=False, mask=True),
    GateUp(x=FP16, layout="fused", act=GELU, gate_lora=FP32, up_lora=FP32, gate_bias=True, up_bias=True, mask=True),
    GateUp(x=FP16, layout="fused", act=GELU_TANH, gate_lora=None, up_lora=None, gate_bias=True, up_bias=True,
           mask=False),
    GateUp(x=BF16, layout="fused", act=SILU, gate_lora=FP32, up_lora=FP32, gate_bias=False, up_bias=False, mask=True),
    GateUp(x=BF16, layout="fused", act=GELU, gate_lora=BF16, up_lora=BF16, gate_bias=True, up_bias=True, mask=True),
    GateUp(x=BF16, layout="fused", act=GELU_TANH, gate_lora=None, up_lora=None, gate_bias=False, up_bias=False,
           mask=False),
    GateUp(x=BF16, layout="split", act=SILU, gate_lora=TF32, up_lora=TF32, gate_bias=False, up_bias=False, mask=True),
)

# token reductions: dA (narrow A, dropout on Q), dB (narrow B), dW + db (wide, column sum)
TOKEN_REDUCE_CASES = (
    TokenReduce(what="dA", p=FP32, q=FP32, dot=FP32, q_dropout=True, colsum=False, block_a=16),
    TokenReduce(what="dA", p=BF16, q=BF16, dot=BF16, q_dropout=True, colsum=False, block_a=16),
    TokenReduce(what="dB", p=BF16, q=FP32, dot=FP32, q_dropout=False, colsum=False, block_b=16),
    TokenReduce(what="dW", p=BF16, q=BF16, dot=BF16, q_dropout=False, colsum=True, tuned=True),
    TokenReduce(what="dW", p=FP16, q=FP16, dot=FP16, q_dropout=False, colsum=True),
    TokenReduce(what="dW", p=FP32, q=FP32, dot=FP32, q_dropout=False, colsum=True),
    # ranks 32 and 64 of dA and dB
    *(TokenReduce(what="dA", p=x, q=x, dot=x, q_dropout=True, colsum=False, block_a=ba) for ba in (32, 64)
      for x in (FP32, BF16)),
    *(TokenReduce(what="dB", p=BF16, q=FP32, dot=FP32, q_dropout=False, colsum=False, block_b=bb) for bb in (32, 64)),
    # dA of fp32 adapters over a 16-bit base: x exact in tf32 (two MMAs), the dropout scale after the sum
    *(TokenReduce(what="dA", p=FP32, q=BF16, dot=FP32, q_dropout=True, colsum=False, block_a=ba) for ba in (16, 32, 64)),
    TokenReduce(what="dA", p=FP32, q=FP16, dot=FP32, q_dropout=False, colsum=False, block_a=16),
    # fp32 adapters with single tf32 dots (torch's "high" fp32 matmul precision)
    TokenReduce(what="dA", p=TF32, q=BF16, dot=TF32, q_dropout=True, colsum=False, block_a=16),
    TokenReduce(what="dB", p=BF16, q=TF32, dot=TF32, q_dropout=False, colsum=False, block_b=16),
)

# one-pass activation backward: the Llama shapes' cases (bf16 base, fp32 or bf16 adapters, r 16 and 64),
# mixed adapter dtypes, fp32 and fp16 bases, partial LoRA, none
ACT_BWD_LORA_CASES = (
    ActBwdLora(x=BF16, act=SILU, gate_lora=FP32, up_lora=FP32, down_lora=FP32, tuned=True),
    ActBwdLora(x=BF16, act=SILU, gate_lora=BF16, up_lora=BF16, down_lora=BF16, tuned=True),
    ActBwdLora(x=BF16, act=SILU, gate_lora=FP32, up_lora=FP32, down_lora=FP32, rank=64),
    ActBwdLora(x=BF16, act=SILU, gate_lora=BF16, up_lora=BF16, down_lora=BF16, rank=64),
    ActBwdLora(x=BF16, act=GELU_TANH, gate_lora=FP32, up_lora=FP32, down_lora=BF16),
    ActBwdLora(x=FP32, act=SILU, gate_lora=FP32, up_lora=FP32, down_lora=FP32),
    ActBwdLora(x=FP16, act=GELU, gate_lora=FP16, up_lora=None, down_lora=FP16, mask=False, dropout=False),
    ActBwdLora(x=BF16, act=SILU, gate_lora=None, up_lora=None, down_lora=FP32),
    ActBwdLora(x=BF16, act=SILU, gate_lora=None, up_lora=None, down_lora=None),
    ActBwdLora(x=BF16, act=SILU, gate_lora=FP32, up_lora=FP32, down_lora=FP32, rank=32),
    ActBwdLora(x=BF16, act=SILU, gate_lora=BF16, up_lora=BF16, down_lora=BF16, rank=32),
    # fp32 adapters with single tf32 dots (torch's "high" fp32 matmul precision), ranks 16, 32 and 64
    *(ActBwdLora(x=BF16, act=SILU, gate_lora=TF32, up_lora=TF32, down_lora=TF32, rank=r) for r in (16, 32, 64)),
    # the dh' fold (16-bit adapters, ranks 16 and 32; 64 on sm_90 only), and fp16 without the mask or the
    # down LoRA's dropout
    ActBwdLora(x=BF16, act=SILU, gate_lora=BF16, up_lora=BF16, down_lora=BF16, fold=True, tuned=True),
    ActBwdLora(x=BF16, act=SILU, gate_lora=BF16, up_lora=BF16, down_lora=BF16, rank=32, fold=True, tuned=True),
    ActBwdLora(x=FP16, act=GELU_TANH, gate_lora=FP16, up_lora=FP16, down_lora=FP16, mask=False, dropout=False, fold=True),
    ActBwdLora(x=BF16, act=SILU, gate_lora=BF16, up_lora=BF16, down_lora=BF16, rank=64, fold=True, tuned=True,
               archs=("sm_90",)),
    ActBwdLora(x=FP16, act=GELU_TANH, gate_lora=FP16, up_lora=FP16, down_lora=FP16, rank=64, mask=False, dropout=False,
               fold=True, archs=("sm_90",)),
)

# LoRA passes over cuBLAS outputs: forward expand, dX expand with the mask, the gate/up pass per dtype
EPILOGUE_CASES = (
    ExpandAdd(x=BF16, lora=FP32, dropout=False, tuned=True),
    ExpandAdd(x=BF16, lora=FP32, dropout=True, tuned=True),
    ExpandAdd(x=BF16, lora=BF16, dropout=False),
    ExpandAdd(x=BF16, lora=BF16, dropout=True),
    ExpandAdd(x=FP32, lora=FP32, dropout=True),
    ExpandAdd(x=FP16, lora=FP16, dropout=False),
    # the C operand of cuBLAS's addmm_: forward (with a bias below), dX of one projection and of gate + up
    ExpandAdd(x=BF16, lora=FP32, dropout=False, accumulate=False, tuned=True),
    ExpandAdd(x=BF16, lora=FP32, dropout=True, accumulate=False, terms=2, tuned=True),
    ExpandAdd(x=BF16, lora=BF16, dropout=True, accumulate=False, terms=2),
    ExpandAdd(x=BF16, lora=BF16, dropout=False, accumulate=False, bias=True),
    ExpandAdd(x=FP32, lora=FP32, dropout=True, accumulate=False),
    GateUpLoraAct(x=BF16, act=SILU, gate_lora=FP32, up_lora=FP32, mask=True, tuned=True),
    GateUpLoraAct(x=BF16, act=GELU_TANH, gate_lora=BF16, up_lora=BF16, mask=True),
    GateUpLoraAct(x=FP32, act=SILU, gate_lora=FP32, up_lora=None, mask=True),
    GateUpLoraAct(x=FP16, act=GELU, gate_lora=None, up_lora=FP16, mask=False),
    GateUpLoraAct(x=BF16, act=SILU, gate_lora=None, up_lora=None, mask=True),
    # ranks 32 and 64 (BLOCK_R 32 / 64) of the Llama cases: the launchers' rank tiles past 16
    # (16-bit adapters only: fp32 ones step 16 ranks whatever BLOCK_R, the same code as at rank 16);
    # the silu gate/up pass at all three (perf/ledger.py reads its weights off them)
    *(ExpandAdd(x=BF16, lora=BF16, dropout=drop, block_r=br) for br in (32, 64) for drop in (False, True)),
    *(ExpandAdd(x=BF16, lora=BF16, dropout=True, accumulate=False, terms=2, block_r=br) for br in (32, 64)),
    *(GateUpLoraAct(x=BF16, act=SILU, gate_lora=BF16, up_lora=BF16, mask=True, block_r=br) for br in (16, 32, 64)),
    # fp32 adapters with single tf32 dots (torch's "high" fp32 matmul precision): the Llama cases' passes
    ExpandAdd(x=BF16, lora=TF32, dropout=False),
    ExpandAdd(x=BF16, lora=TF32, dropout=False, accumulate=False),  # the forward's C operand
    ExpandAdd(x=BF16, lora=TF32, dropout=True, accumulate=False),  # a lora_linear's dX
    ExpandAdd(x=BF16, lora=TF32, dropout=True, accumulate=False, terms=2),
    GateUpLoraAct(x=BF16, act=SILU, gate_lora=TF32, up_lora=TF32, mask=True),
)

@dataclass(frozen=True, kw_only=True)
class SplitSum(_Case):
    """The fixed-order sum of a split reduction's fp32 partials, cast to ``out``'s dtype."""

    out: int
    family = "split_sum"
    kernel = "split_sum.split_sum_kernel"
    phase = "forward"  # no operand is a transposed view (its callers run in the backward)

    @property
    def label(self) -> str:
        return f"split_sum out={CODE_NAMES[self.out]}"

    def pointers(self) -> dict:
        return {"part_ptr": _PTR[FP32], "out_ptr": _PTR[self.out]}

    def constexprs(self) -> dict:
        return {}


# the sum of split partials: the adapters' and the weights' dtypes
SPLIT_SUM_CASES = tuple(SplitSum(out=c) for c in (FP32, BF16, FP16))

CASES = (*ACT_CASES, *SHRINK_CASES, *EXPAND_CASES, *GATE_UP_CASES, *TOKEN_REDUCE_CASES, *ACT_BWD_LORA_CASES,
         *EPILOGUE_CASES, *SPLIT_SUM_CASES)


def variants(arch: str) -> list[Variant]:
    out: list[Variant] = []
    for case in CASES:
        if case.archs is not None and arch not in case.archs:
            continue
        family = configs.CONFIG_SETS[case.family]
        default, *others = family.configs(arch, case.elem_bytes)
        out += case.variants(default, others)
    return out


def matches(v: Variant, only) -> bool:
    """True when ``only`` (a list of substrings; empty: everything) has one in "kernel label"."""
    text = f"{v.kernel.rsplit('.', 1)[1]} {v.label}"
    return not only or any(o in text for o in only)


def sass_fields(cubin: bytes, kernel_name: str, elements_per_thread: int | None) -> dict:
    """The SASS metrics of a Triton cubin's kernel (kernels/sass.py), plus instructions_per_element
    for the elementwise kernels (None for the others)."""
    from .. import sass

    found = sass.cubin_metrics(cubin)
    m = found.get(kernel_name) or (next(iter(found.values())) if len(found) == 1 else None)
    if m is None:
        raise RuntimeError(f"no function {kernel_name} in the cubin (found {sorted(found)})")
    return dict(m, elements_per_thread=elements_per_thread,
                instructions_per_element=sass.instructions_per_element(m, elements_per_thread))


def compile_variant(v: Variant, arch: int, sass: bool = False) -> dict:
    """Compile for sm_<arch>; returns a JSON-able row (ok, shared bytes, limit, seconds, error) and,
    with ``sass``, the SASS metrics of the cubin (``sass_fields``; a failure there fails the row)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = v.load()
    units, floats = set(v.unit_strides), set(v.floats)
    for what, names in (("unit strides", units), ("float arguments", floats)):
        unknown = names - set(fn.arg_names)
        if unknown:
            raise ValueError(f"{v.label}: {what} {sorted(unknown)} are not arguments of {fn.__name__}")
    sig, constexprs, attrs = {}, dict(v.constexprs), {}
    aligned = [["tt.divisibility", 16]]
    for i, name in enumerate(fn.arg_names):
        if name in v.constexprs:
            sig[name] = "constexpr"
        elif name in v.pointers:
            sig[name] = v.pointers[name]
            attrs[(i,)] = aligned
        elif name in floats:
            sig[name] = "fp32"
        elif name in units:
            sig[name] = "constexpr"
            constexprs[name] = 1
        elif name in THRESHOLD_ARGS:
            sig[name] = "i32"
        else:
            sig[name] = "i32"
            attrs[(i,)] = aligned
    limit = configs.SHARED_LIMIT[f"sm_{arch}"]
    row = dict(arch=arch, kernel=v.kernel.rsplit(".", 1)[1], label=v.label,
               config=",".join(f"{k}={val}" for k, val in sorted(v.constexprs.items()) if k.startswith(("BLOCK", "GROUP")))
               + f",w={v.num_warps},s={v.num_stages}", limit=limit, phase=v.phase, unit_strides=list(v.unit_strides))
    t0 = time.time()
    try:
        compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
        shared = int(compiled.metadata.shared)
        row.update(shared=shared, ok=shared <= limit, error="" if shared <= limit else "shared memory over the limit")
        if sass:
            row["sass"] = sass_fields(compiled.asm["cubin"], compiled.metadata.name, v.elements_per_thread)
    except Exception as e:  # report every failure in the table instead of stopping at the first
        root = e
        while root.__cause__ is not None:  # the compiler wraps the real error (e.g. a NameError)
            root = root.__cause__
        lines = [ln for ln in str(root).splitlines() if ln.strip()]
        row.update(shared=row.get("shared"), ok=False, error=f"{type(root).__name__}: {lines[-1][:300] if lines else ''}")
    row["seconds"] = round(time.time() - t0, 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, required=True, choices=(80, 90))
    ap.add_argument("--sass", action="store_true", help="also record the SASS metrics of each cubin")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help='compile only the variants whose "kernel label" contains TEXT (repeatable)')
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile variants in a process without TRITON_INTERPRET", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default; silences 3.9's notice
    bad = 0
    for v in variants("sm_90" if args.arch == 90 else "sm_80"):
        if not matches(v, args.only):
            continue
        row = compile_variant(v, args.arch, sass=args.sass)
        bad += not row["ok"]
        print(json.dumps(row), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
