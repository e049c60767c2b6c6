"""Every compiled variant of the Triton kernels, for ``python -m transpeft_kernels compile-check``.

A variant is one kernel with its constexprs fixed (dtypes, layout flags, block sizes) and its launch
options (warps, stages). The set covers each I/O dtype and layout of every kernel with the default
config of the architecture, and every autotune candidate of the architecture with bf16 operands (the
performance dtype) — candidates whose shared-memory estimate exceeds the limit for a dtype are
dropped by the tuner at run time, so they are compiled only where the tuner could pick them.

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

from . import configs
from ._common import BF16, CODE_NAMES, FP16, FP32

_PTR = {FP32: "*fp32", FP16: "*fp16", BF16: "*bf16"}
_FLOAT_ARGS = {"p", "c", "scaling", "drop_p", "drop_scale", "scale", "scaling_g", "scaling_u"}


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

    masked_gated_act fwd/bwd: none (the kernels take row strides only; the column stride is 1 by
        construction, not an argument).
    lora_shrink: forward S = x A^T with x (M, K), A (R, K): stride_xk, stride_ak, stride_sr;
        backward t = dy B, where "A" is the view B^T (R, N) of B (N, R): stride_xk, stride_ar, stride_sr.
    gemm_lora_expand: forward y = x W^T (+ S B^T): stride_xk, stride_wk, stride_yn (+ stride_sr,
        stride_br); backward dX = dy W (+ t A) through the views W^T and A^T: stride_xk, stride_wn,
        stride_yn (+ stride_sr, stride_bn). Without LoRA the S and B strides are passed as 0.
    gate_up_act: x, Wg, Wu, g, u, h' (split halves of the fused layout keep a unit column stride),
        plus S and B of each side that has LoRA (0 strides otherwise).
    token_reduce (dW, dA, dB): P (T, A), Q (T, B), out (splits, A, B): stride_pa, stride_qb,
        stride_ob, plus stride_ca of the (splits, A) column sum when HAS_COLSUM (0 strides otherwise).
    """
    fn = kernel.rsplit(".", 1)[-1]
    c = constexprs
    fwd = phase == "forward"
    if phase not in ("forward", "backward"):
        raise ValueError(f"phase: expected 'forward' or 'backward', got {phase!r}")
    if fn in ("masked_gated_act_fwd_kernel", "masked_gated_act_bwd_kernel"):
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
    if fn == "token_reduce_kernel":
        return ("stride_pa", "stride_qb", "stride_ob") + (("stride_ca",) if c["HAS_COLSUM"] else ())
    raise KeyError(f"no unit-stride rule for kernel {kernel!r}")


def _v(kernel, label, pointers, constexprs, config, phase="forward", **extra):
    meta = {**config.kwargs(), **extra}
    consts = {**constexprs, **meta}
    return Variant(kernel, label, pointers, consts, config.num_warps, config.num_stages, phase,
                   unit_strides(kernel, phase, consts))


def variants(arch: str) -> list[Variant]:
    fam = configs.FAMILIES
    out: list[Variant] = []
    default = {name: f.default[arch] for name, f in fam.items()}
    extra = {name: [c for c in f.configs(arch) if c != f.default[arch]] for name, f in fam.items()}

    # masked gated activation: every dtype, every activation (cycled over dtypes), mask on and off
    for code, act in ((FP32, 0), (FP16, 1), (BF16, 2), (BF16, 0)):
        has_mask = not (code == BF16 and act == 0)
        for kern, ptrs in (("fwd", ("g_ptr", "u_ptr", "h_ptr")), ("bwd", ("dh_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr"))):
            p = {n: _PTR[code] for n in ptrs} | {"seed_ptr": "*i64"}
            configs_here = [default["elementwise"]] + (extra["elementwise"] if code == BF16 and act == 2 else [])
            for c in configs_here:
                out.append(_v(f"masked_gated_act.masked_gated_act_{kern}_kernel",
                              f"act_{kern} {CODE_NAMES[code]} act={act} mask={has_mask}", p,
                              dict(ACT=act, HAS_MASK=has_mask), c, "forward" if kern == "fwd" else "backward"))

    # LoRA shrink: (x dtype, adapter dtype), with and without dropout. Without dropout the variant is
    # the backward's t = dy B: its "A" is the transposed view B^T, unit stride along the rank.
    for xc, ac, drop in ((FP32, FP32, True), (BF16, FP32, True), (BF16, BF16, True), (FP16, FP32, False),
                         (FP16, FP16, True), (BF16, FP32, False)):
        p = {"x_ptr": _PTR[xc], "a_ptr": _PTR[ac], "s_ptr": _PTR[ac], "seed_ptr": "*i64"}
        for c in [default["shrink"]] + (extra["shrink"] if (xc, ac) == (BF16, BF16) else []):
            for br in ((16, 64) if c is default["shrink"] and (xc, ac) == (BF16, BF16) else (16,)):
                out.append(_v("lora_shrink.lora_shrink_kernel",
                              f"shrink x={CODE_NAMES[xc]} A={CODE_NAMES[ac]} drop={drop} R={br}", p,
                              dict(HAS_DROPOUT=drop, DOT_DTYPE=ac, UPCAST=False), c,
                              "forward" if drop else "backward", BLOCK_R=br))

    # base GEMM + LoRA expand: forward (bias, no epilogue mask) and dX (epilogue mask: dy W^T-view
    # + s t A^T-view, both weights transposed views with the unit stride on their first dim), no-LoRA
    gemm_cases = [(FP32, FP32, True, False), (BF16, FP32, True, False), (BF16, BF16, True, False),
                  (FP16, FP32, True, False), (FP16, FP16, True, False), (BF16, FP32, False, True),
                  (BF16, BF16, False, True), (FP16, FP16, False, True)]
    for xc, lc, bias, drop in gemm_cases:
        p = {"x_ptr": _PTR[xc], "w_ptr": _PTR[xc], "bias_ptr": _PTR[xc], "s_ptr": _PTR[lc], "b_ptr": _PTR[lc],
             "y_ptr": _PTR[xc], "seed_ptr": "*i64"}
        for c in [default["gemm"]] + (extra["gemm"] if (xc, lc, drop) == (BF16, FP32, False) else []):
            out.append(_v("gemm_lora_expand.gemm_lora_expand_kernel",
                          f"expand x={CODE_NAMES[xc]} lora={CODE_NAMES[lc]} bias={bias} dropmask={drop}", p,
                          dict(HAS_BIAS=bias, HAS_LORA=True, LORA_DROPOUT=drop, X_DTYPE=xc, LORA_DTYPE=lc, UPCAST=False),
                          c, "backward" if drop else "forward", BLOCK_R=16))
    p = {n: "*bf16" for n in ("x_ptr", "w_ptr", "bias_ptr", "s_ptr", "b_ptr", "y_ptr")} | {"seed_ptr": "*i64"}
    out.append(_v("gemm_lora_expand.gemm_lora_expand_kernel", "expand x=bf16 no-lora", p,
                  dict(HAS_BIAS=False, HAS_LORA=False, LORA_DROPOUT=False, X_DTYPE=BF16, LORA_DTYPE=BF16, UPCAST=False),
                  default["gemm"], BLOCK_R=16))

    # gate/up GEMM + masked activation epilogue: every I/O dtype x layout x activation with the
    # default config; LoRA (on both, one or neither side, with the adapter in fp32 or the I/O dtype),
    # biases and masking vary across the rows. Fused layout: one adapter and one bias for both halves.
    #   (x dtype, layout, act, gate adapter, up adapter (None: no LoRA), bias g, bias u, mask)
    gate_up_cases = [
        (FP32, "split", 0, FP32, FP32, True, True, True), (FP32, "split", 1, FP32, None, True, False, True),
        (FP32, "split", 2, None, None, False, False, False), (FP16, "split", 0, None, FP32, False, True, True),
        (FP16, "split", 1, FP16, FP16, True, True, False), (FP16, "split", 2, FP32, FP32, False, False, True),
        (BF16, "split", 0, FP32, FP32, True, True, True), (BF16, "split", 1, BF16, BF16, False, False, True),
        (BF16, "split", 2, FP32, BF16, True, False, False),
        (FP32, "fused", 0, FP32, FP32, True, True, True), (FP32, "fused", 1, None, None, False, False, False),
        (FP32, "fused", 2, FP32, FP32, False, False, True), (FP16, "fused", 0, FP16, FP16, False, False, True),
        (FP16, "fused", 1, FP32, FP32, True, True, True), (FP16, "fused", 2, None, None, True, True, False),
        (BF16, "fused", 0, FP32, FP32, False, False, True), (BF16, "fused", 1, BF16, BF16, True, True, True),
        (BF16, "fused", 2, None, None, False, False, False),
    ]
    for xc, layout, act, lcg, lcu, bias_g, bias_u, mask in gate_up_cases:
        gcode, ucode = lcg if lcg is not None else xc, lcu if lcu is not None else xc
        p = {"x_ptr": _PTR[xc], "wg_ptr": _PTR[xc], "wu_ptr": _PTR[xc], "bg_ptr": _PTR[xc], "bu_ptr": _PTR[xc],
             "sg_ptr": _PTR[gcode], "lbg_ptr": _PTR[gcode], "su_ptr": _PTR[ucode], "lbu_ptr": _PTR[ucode],
             "g_ptr": _PTR[xc], "u_ptr": _PTR[xc], "h_ptr": _PTR[xc], "seed_ptr": "*i64"}
        consts = dict(ACT=act, BIAS_G=bias_g, BIAS_U=bias_u, LORA_G=lcg is not None, LORA_U=lcu is not None,
                      HAS_MASK=mask, X_DTYPE=xc, LORA_G_DTYPE=gcode, LORA_U_DTYPE=ucode, UPCAST=False)
        lora = ",".join(CODE_NAMES[c] if c is not None else "-" for c in (lcg, lcu))
        tuned = (xc, layout, act) == (BF16, "split", 0)
        for c in [default["gate_up"]] + (extra["gate_up"] if tuned else []):
            out.append(_v("gate_up_act.gate_up_act_kernel",
                          f"gate_up {layout} x={CODE_NAMES[xc]} act={act} lora=({lora}) bias=({bias_g},{bias_u}) "
                          f"mask={mask}", p, consts, c, BLOCK_R=64 if act == 1 else 16))

    # token reductions: dA (narrow A, dropout on Q), dB (narrow B), dW + db (wide, colsum)
    tr_cases = [("dA", FP32, FP32, FP32, True, False, {"BLOCK_A": 16}), ("dA", BF16, BF16, BF16, True, False, {"BLOCK_A": 16}),
                ("dB", BF16, FP32, FP32, False, False, {"BLOCK_B": 16}), ("dW", BF16, BF16, BF16, False, True, {}),
                ("dW", FP16, FP16, FP16, False, True, {}), ("dW", FP32, FP32, FP32, False, True, {})]
    for what, pc, qc, dc, drop, colsum, narrow in tr_cases:
        p = {"p_ptr": _PTR[pc], "q_ptr": _PTR[qc], "out_ptr": _PTR[dc], "colsum_ptr": _PTR[pc], "seed_ptr": "*i64"}
        for c in [default["token_reduce"]] + (extra["token_reduce"] if (what, dc) == ("dW", BF16) else []):
            out.append(_v("token_reduce.token_reduce_kernel",
                          f"token_reduce {what} P={CODE_NAMES[pc]} Q={CODE_NAMES[qc]} dot={CODE_NAMES[dc]}", p,
                          dict(Q_DROPOUT=drop, HAS_COLSUM=colsum, DOT_DTYPE=dc, UPCAST=False), c, "backward",
                          **narrow))
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
    units = set(v.unit_strides)
    unknown = units - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{v.label}: unit strides {sorted(unknown)} are not arguments of {fn.__name__}")
    sig, constexprs, attrs = {}, dict(v.constexprs), {}
    aligned = [["tt.divisibility", 16]]
    for i, name in enumerate(fn.arg_names):
        if name in v.constexprs:
            sig[name] = "constexpr"
        elif name in v.pointers:
            sig[name] = v.pointers[name]
            attrs[(i,)] = aligned
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in units:
            sig[name] = "constexpr"
            constexprs[name] = 1
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
