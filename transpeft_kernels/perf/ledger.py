"""The launch ledger: what a code path would launch on a GPU, recorded without doing the arithmetic.

Run a forward and backward on tensors of the meta device inside ``recording(target)``. Every device
operation lands in the ledger as one ``Launch``:

  * ATen ops through a TorchDispatchMode (cuBLAS GEMMs, elementwise ops, copies, reductions); views,
    allocations and metadata queries launch nothing and are left out;
  * our Triton kernels: each ``kernel[grid](...)`` call is intercepted and recorded with its grid,
    config and arguments instead of being run (kernels/env.dry_running makes the launchers choose
    configs and splits as on the target GPU, and the backends treat meta tensors as covered);
  * our CUDA C functions: each ``lib.call(...)`` is recorded instead of run, with the tensors of the
    Python wrapper that issued it.

Bytes are a lower bound on HBM traffic: each operand counted once per launch (numel x element size
of the view the launch reads or writes), as if every re-read hit in L2. FLOPs are counted per unit:
``tc_bf16``/``tc_fp16``/``tc_tf32`` (tensor cores) or ``fp32`` (CUDA-core FMA: fp32 "ieee" dots and
fp32 cuBLAS GEMMs). The LoRA dots of our Triton kernels follow the precision the kernels compile them
in (``kernels/triton/_common.LORA_DOT_PRECISION``): the adapter's 16-bit unit, or for fp32 adapters
tf32x3, charged as three tf32 tensor-core products (``tc_tf32``, 3x the FLOPs; one fewer per operand
stored in a 16-bit dtype), or one where torch allows TF32 for fp32 matmuls (code TF32, ``model --tf32``);
ATen's fp32 matmuls go to ``fp32`` or, where TF32 is allowed, ``tc_tf32``. ``elements`` counts the elementwise work of fused epilogues and elementwise
kernels, and ``philox`` the mask elements regenerated (a measure of RNG work). Host-side work that
stalls a GPU stream is counted too: syncs (``.item()``, a device-to-host copy) and host-to-device
copies (each pageable copy also blocks CUDA-graph capture).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..kernels.env import DryRunTarget, dry_running

UNITS = ("tc_bf16", "tc_fp16", "tc_tf32", "fp32")


@dataclass
class Launch:
    """One device launch. ``kind``: "aten", "triton", "cuda" or "attention" (a modelled FlashAttention call)."""

    name: str
    kind: str
    bytes_read: int = 0
    bytes_written: int = 0
    flops: dict = field(default_factory=dict)  # unit -> FLOPs
    elements: int = 0                          # elementwise work (epilogue or elementwise kernel)
    philox: int = 0                            # mask elements regenerated
    grid: tuple | None = None
    detail: str = ""                           # config / dtypes, for reading the ledger

    @property
    def gemm(self) -> bool:
        """A launch whose time is mostly its matrix product (tensor-core FLOPs dominate its bytes)."""
        return sum(self.flops.values()) > 64 * max(self.bytes_read + self.bytes_written, 1)


@dataclass
class Ledger:
    launches: list[Launch] = field(default_factory=list)
    host_syncs: int = 0
    h2d_copies: int = 0

    def total(self, attr: str) -> int:
        return sum(getattr(x, attr) for x in self.launches)

    def flops_by_unit(self) -> dict:
        out = dict.fromkeys(UNITS, 0)
        for x in self.launches:
            for unit, f in x.flops.items():
                out[unit] += f
        return out


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _unit(dtype: torch.dtype) -> str:
    """The unit an ATen dot of these operands runs on (fp32: the CUDA cores at torch's default fp32
    matmul precision, the tf32 tensor cores where torch allows TF32: ``env.cuda_fp32_matmul_is_tf32``)."""
    from ..kernels.env import cuda_fp32_matmul_is_tf32

    fp32 = "tc_tf32" if cuda_fp32_matmul_is_tf32() else "fp32"
    return {torch.bfloat16: "tc_bf16", torch.float16: "tc_fp16"}.get(dtype, fp32)


# ---- ATen ops ------------------------------------------------------------------------------------
_FREE = {  # no kernel: views, allocations, metadata
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape",
    "_reshape_alias", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze",
    "as_strided", "alias", "detach", "split", "split_with_sizes", "chunk", "unbind", "narrow", "lift_fresh",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "set_", "resize_",
}


def _mm_flops(name: str, args, out) -> dict:
    """FLOPs of the matrix-product ATen ops (2 per multiply-add), by the unit of their operand dtype."""
    name = name.rstrip("_")  # addmm_ and friends: the same product, written in place
    if name in ("mm", "addmm"):
        a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        return {_unit(a.dtype): 2 * a.shape[0] * a.shape[1] * b.shape[1]}
    if name in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return {_unit(a.dtype): 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]}
    return {}


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, ledger: Ledger):
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if name == "_local_scalar_dense" and ins[0].device.type == "meta":
            self.ledger.host_syncs += 1  # .item() of a device tensor: the host waits for the stream
            return 0 if not ins[0].is_floating_point() else 0.0
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name in ("_to_copy", "copy_") and ins and ins[0].device.type == "meta" and outs and outs[0].device.type == "cpu":
            self.ledger.host_syncs += 1
            return out
        if name in ("_to_copy", "copy_") and any(t.device.type == "cpu" for t in ins) and \
                any(t.device.type == "meta" for t in outs):
            self.ledger.h2d_copies += 1
            return out
        if name in _FREE or not outs or all(t.device.type != "meta" for t in ins + outs):
            return out  # host-side tensor work (scalars rounded on the CPU) launches nothing
        # in-place and out= ops: the output is also an input; count it once each way
        # (addmm_ with beta = 0 never reads its output: cuBLAS skips C)
        reads_out = name.endswith("_") and not (name == "addmm_" and kwargs.get("beta", 1) == 0)
        read = sum(nbytes(t) for t in ins if not any(t is o for o in outs)) + \
            sum(nbytes(o) for o in outs if reads_out and any(o is t for t in ins))
        written = sum(nbytes(t) for t in outs)
        flops = _mm_flops(name, args, out)
        elements = 0 if flops else max((t.numel() for t in outs), default=0)
        self.ledger.launches.append(Launch(name, "aten", read, written, flops, elements,
                                           detail=",".join(str(t.dtype).replace("torch.", "") for t in outs)))
        return out


# ---- our Triton kernels --------------------------------------------------------------------------
def _dot_unit(code: int) -> str:
    """The unit of a base-operand dot of our Triton kernels (fp32: "ieee", on the CUDA cores)."""
    return ("fp32", "tc_fp16", "tc_bf16")[code]


def _lora_flops(code: int, flops: int, exact: int = 0) -> dict:
    """{unit: FLOPs} of one LoRA dot of our Triton kernels with adapter dtype code ``code``, in the
    precision the kernels use (``_common.lora_dot_split``): tf32x3 is three tf32 tensor-core products,
    one fewer for each of the ``exact`` operands the kernel knows to hold 16-bit values."""
    from ..kernels.triton._common import LORA_DOT_PRECISION  # triton is loaded whenever its kernels are recorded

    precision = LORA_DOT_PRECISION[code]
    if precision == "tf32x3":
        return {"tc_tf32": (3 - exact) * flops}
    if precision == "ieee":
        return {"fp32": flops}
    return {f"tc_{precision}": flops}


def _fp32_key(codes) -> bool | str:
    """The adapter part of an issue-weight key from the LoRA dot codes of a launch: True for fp32 adapters
    as tf32x3 (code 0; also when codes mix it with 16-bit ones: the larger), "tf32" for fp32 adapters as
    single tf32 products (code 3, torch's "high" fp32 matmul precision), False for 16-bit adapters. Both
    fp32 forms step 16 ranks at a time in the epilogues (truthy)."""
    codes = set(codes)
    return True if 0 in codes else "tf32" if 3 in codes else False


def _is16(t) -> int:
    """1 when tensor ``t`` holds a 16-bit float dtype (exact in tf32), else 0."""
    return int(t.dtype in (torch.float16, torch.bfloat16))


def _add(into: dict, more: dict) -> dict:
    for unit, f in more.items():
        into[unit] = into.get(unit, 0) + f
    return into


# act_bwd_lora's issue work per (M, I) element, in elementwise-kernel elements (the roofline's
# ELEMENTWISE_INSTR = 24 instructions each), keyed by (every adapter fp32: True for tf32x3, "tf32" for single
# tf32 products (_fp32_key); rank tile 16 / 32 / 64): the loop
# body of its static sm_90 SASS in the default config (loop_body_instructions; python_tests/
# test_ledger_weights.py recompiles them): 1049 / 881 per iteration of 16 elements per thread for fp32 /
# bf16 adapters at r 16 (fp32 1098 before stop 26's integer tf32 rounding, 1250 / 1036 before the MUFU
# sigmoid of kernels/triton/activations.py); r 32: 1190 per 16 (fp32, 128 columns; 1302 before), 545 per 8
# (bf16, 64 columns: 128 spilled); r 64: 705 / 541 per 8 (753 / 541 before; 831 / 606 before the
# sigmoid)), less the two mask streams the model charges as Philox work (2 x 18.4), over 24. fp32 adapters
# as single tf32 products (key "tf32", _fp32_key): 952 per 16 at r 16, 589 per 8 at r 32 (64 columns: 128 spilled
# 16 B), 654 per 8 at r 64 (968, 597, 662 before dA_d's dropout scale moved after the sum).
# Every warp gathers each dot's rank-sized operand and stages its share of the (BLOCK_M, BLOCK_N) tile
# through shared memory per dot: 0.8-2.4x an elementwise kernel's work per element.
ACT_BWD_LORA_ELEMENT_WEIGHT = {(True, 16): 1.20, (False, 16): 0.76, (True, 32): 1.57, (False, 32): 1.31,
                               (True, 64): 2.14, (False, 64): 1.28,
                               ("tf32", 16): 0.95, ("tf32", 32): 1.53, ("tf32", 64): 1.87}
# The same with the dh' fold (FOLD_D: the down LoRA's term s_d D(t_d A_d) added to dY W_d in the pass; 16-bit
# adapters, ranks <= 32, 64 on sm_90, 64 columns), keyed by rank tile: 672 / 710 / 707 per 8 elements at
# r 16 / 32 / 64 (bf16 adapters, sm_90; 879 per 16 without the fold at r 16), the same two mask streams off,
# over 24. About 29 instructions per element more: the (BLOCK_M, BLOCK_N) product leaves the dot in its own
# register layout and goes through shared memory to the element-wise one.
ACT_BWD_LORA_FOLD_WEIGHT = {16: 1.97, 32: 2.16, 64: 2.15}


# The lora_epilogue passes' issue work per element, in elementwise-kernel elements, from their static
# sm_90 SASS in the default config (32 elements per thread; python_tests/test_ledger_weights.py
# recompiles each), less 18.4 per mask stream the model charges as Philox work, over ELEMENTWISE_INSTR =
# 24. Keyed by (kernel, two terms, an fp32 adapter (_fp32_key: True tf32x3, "tf32" single tf32 products),
# rank tile). Each term's rank loop steps 16 ranks with fp32 adapters (tf32x3 holds both parts of both
# operand tiles; the single-tf32 form keeps the same step) and BLOCK_R ranks with 16-bit ones, so a static
# count holds one trip; EPILOGUE_RANK_TRIP_WEIGHT charges each further trip its loop body.
#   lora_expand_add, one term (the forward's y, dh', one dX; its C-operand form without reading y is charged
#     the same; the dX mask is charged as Philox work): fp32 adapters 515 instructions (16.1 per element;
#     579 before stop 26's integer tf32 rounding, _common._tf32_rna); bf16 at rank tiles 16 / 32 / 64:
#     367 / 388 / 515.
#   two terms, each with its dX mask (the gate + up dX of one MLP input): fp32 1924 (60.1 per element,
#     2 x 18.4 of them the masks'; 2051 before); bf16 1659 / 1762 / 2010.
#   gate_up_lora_act, both sides, silu, the mask: fp32 1694 (52.9 per element, 18.4 of them the mask's;
#     1823 before, 2128 before the MUFU sigmoid); bf16 1381 / 1437 / 1688.
#   fp32 adapters as single tf32 products (key "tf32": torch's "high" fp32 matmul precision, _fp32_key):
#     one term 389, two terms 1782, the gate/up pass 1438.
# Until stop 26 every case was charged the fp32 rank-16 count: the fp32 rank-64 passes (three more trips
# of each rank loop) were undercharged and the bf16 ones overcharged.
EPILOGUE_ELEMENT_WEIGHT = {
    ("lora_expand_add_kernel", False, True, 16): 0.67,
    ("lora_expand_add_kernel", False, False, 16): 0.48, ("lora_expand_add_kernel", False, False, 32): 0.51,
    ("lora_expand_add_kernel", False, False, 64): 0.67,
    ("lora_expand_add_kernel", True, True, 16): 0.97,
    ("lora_expand_add_kernel", True, False, 16): 0.63, ("lora_expand_add_kernel", True, False, 32): 0.76,
    ("lora_expand_add_kernel", True, False, 64): 1.08,
    ("gate_up_lora_act_kernel", True, True, 16): 1.44,
    ("gate_up_lora_act_kernel", True, False, 16): 1.03, ("gate_up_lora_act_kernel", True, False, 32): 1.10,
    ("gate_up_lora_act_kernel", True, False, 64): 1.43,
    ("lora_expand_add_kernel", False, "tf32", 16): 0.51, ("lora_expand_add_kernel", True, "tf32", 16): 0.79,
    ("gate_up_lora_act_kernel", True, "tf32", 16): 1.11,
}
# One further trip of one term's rank loop (ranks past 16 with fp32 adapters, past 64 with 16-bit ones),
# keyed by (kernel, two terms, an fp32 adapter): the loop body over 32 elements, over 24. fp32: 194 (one
# term), 228 (two terms: the longer of the two loops), 194 (the gate/up pass), of which 48 HMMA (258, 292
# and 259 before the integer tf32 rounding); 16-bit at rank tile 64: 122, 172, 121; single tf32 65, 101, 66.
EPILOGUE_RANK_TRIP_WEIGHT = {
    ("lora_expand_add_kernel", False, True): 0.25, ("lora_expand_add_kernel", True, True): 0.30,
    ("gate_up_lora_act_kernel", True, True): 0.25,
    ("lora_expand_add_kernel", False, False): 0.16, ("lora_expand_add_kernel", True, False): 0.22,
    ("gate_up_lora_act_kernel", True, False): 0.16,
    ("lora_expand_add_kernel", False, "tf32"): 0.085, ("lora_expand_add_kernel", True, "tf32"): 0.13,
    ("gate_up_lora_act_kernel", True, "tf32"): 0.086,
}


# the gate/up pass without a LoRA side (LoRA on the down projection only): 748 instructions, with the mask
GATE_UP_NO_LORA_WEIGHT = 0.21

# split_sum's issue work per output element (kernels/triton/split_sum.py, static sm_90 SASS of the default
# config, fp32 -> bf16, 8 elements per thread): 230 instructions, 75 of them the split loop's body, charged
# once per split: (230 - 75) / 8 / 24 per element plus 75 / 8 / 24 per split. Small either way: the
# launch is what it saves (a sum and a cast were two).
SPLIT_SUM_ELEMENT_WEIGHT = 0.81
SPLIT_SUM_SPLIT_WEIGHT = 0.39


def _epilogue_weight(kernel: str, second: bool, fp32: bool | str, block_r: int, ranks: list[int]) -> float:
    """Issue weight per element of one lora_epilogue launch whose terms have ``ranks``; ``fp32`` as
    ``_fp32_key`` gives it."""
    step = 16 if fp32 else block_r
    tile = 16 if fp32 else block_r
    trips = sum(-(-r // step) - 1 for r in ranks if r > 0)
    return EPILOGUE_ELEMENT_WEIGHT[(kernel, second, fp32, tile)] + trips * EPILOGUE_RANK_TRIP_WEIGHT[(kernel, second, fp32)]


# masked_gated_act's issue work per element, keyed by (kernel, mask on), so that with the mask charge
# (18.4, roofline.py) the total is the static sm_90 SASS count of the default config, bf16, silu (the
# benchmark's activation; "act_fwd bf16 act=0" in sass_round2_triton_mufu.json): forward 24.8 per element
# with the mask, 13.4 without; backward 33.9 and 22.1. The mask's measured increment is about 11.5
# per element (the same with gelu_tanh), under the model's 18.4, hence weights below the unmasked ones.
MASKED_ACT_ELEMENT_WEIGHT = {
    ("masked_gated_act_fwd_kernel", True): 0.27, ("masked_gated_act_fwd_kernel", False): 0.56,
    ("masked_gated_act_bwd_kernel", True): 0.65, ("masked_gated_act_bwd_kernel", False): 0.92,
}


def _triton_cost(kernel: str, a: dict) -> tuple[list, list, dict, int, int]:
    """(pointer args read, pointer args written, FLOPs by unit, elements, philox) for one launch of
    one of our kernels, from its bound arguments (tensors, ints, constexprs)."""
    if kernel in ("masked_gated_act_fwd_kernel", "masked_gated_act_bwd_kernel"):
        n = a["M"] * a["I"]
        reads, writes = (["g_ptr", "u_ptr"], ["h_ptr"]) if kernel.endswith("fwd_kernel") else \
            (["dh_ptr", "g_ptr", "u_ptr"], ["dg_ptr", "du_ptr"])
        weight = MASKED_ACT_ELEMENT_WEIGHT[(kernel, bool(a["HAS_MASK"]))]
        return reads, writes, {}, round(n * weight), n if a["HAS_MASK"] else 0
    if kernel == "act_bwd_lora_kernel":
        # the activation backward plus, per LoRA side, dB, and the down LoRA's dA; h' is rebuilt in registers
        M, I = a["M"], a["I"]
        n = M * I
        reads, writes, flops = ["dh_ptr", "g_ptr", "u_ptr"], ["dg_ptr", "du_ptr"], {}
        x16 = _is16(a["dg_ptr"])  # dg, du and h' exact in tf32: dB and dA_d take two MMAs (lora_dot_exact)
        for side, rank, dt in (("g", "RG", "G_DTYPE"), ("u", "RU", "U_DTYPE")):
            if a[f"LORA_{side.upper()}"]:
                reads.append(f"s{side}_ptr")
                writes.append(f"db{side}_ptr")
                _add(flops, _lora_flops(a[dt], 2 * n * a[rank], exact=x16))
        philox = n if a["HAS_MASK"] else 0
        if a["LORA_D"]:
            reads.append("td_ptr")
            writes.append("dad_ptr")
            _add(flops, _lora_flops(a["D_DTYPE"], 2 * n * a["RD"], exact=x16))
            philox += n if a["D_DROPOUT"] else 0  # one keep mask for dA_d and, folded, dh'
        if a["FOLD_D"]:
            reads.append("ad_ptr")
            _add(flops, _lora_flops(a["D_DTYPE"], 2 * n * a["RD"]))
        present = [x for x in ("G", "U", "D") if a[f"LORA_{x}"]]
        codes = {a[f"{x}_DTYPE"] for x in present}  # every adapter fp32, as act_bwd_lora.block_n_for_rank decides
        fp32 = True if codes == {0} else "tf32" if codes == {3} else False
        rank = max(a["RG"], a["RU"], a["RD"])
        tile = 16 if rank <= 16 else 32 if rank <= 32 else 64
        lora = a["LORA_G"] or a["LORA_U"] or a["LORA_D"]
        weight = ACT_BWD_LORA_FOLD_WEIGHT[tile] if a["FOLD_D"] else ACT_BWD_LORA_ELEMENT_WEIGHT[(fp32, tile)] if lora else 1.0
        return reads, writes, flops, round(n * weight), philox
    if kernel == "lora_expand_add_kernel":  # y <- y + s D(S B^T) over a cuBLAS output, or C for addmm_
        M, N = a["M"], a["N"]
        second = bool(a["SECOND"])
        reads = (["y_ptr"] if a["ACCUMULATE"] else []) + (["bias_ptr"] if a["HAS_BIAS"] else []) + ["s_ptr", "b_ptr"]
        flops = _lora_flops(a["LORA_DTYPE"], 2 * M * N * a["R"])
        if second:
            reads += ["s2_ptr", "b2_ptr"]
            _add(flops, _lora_flops(a["LORA_DTYPE"], 2 * M * N * a["R2"]))
        weight = _epilogue_weight(kernel, second, _fp32_key([a["LORA_DTYPE"]]), a["BLOCK_R"],
                                  [a["R"]] + ([a["R2"]] if second else []))
        philox = M * N * (bool(a["LORA_DROPOUT"]) + (second and bool(a["LORA_DROPOUT2"])))
        return reads, ["y_ptr"], flops, round(M * N * weight), philox
    if kernel == "gate_up_lora_act_kernel":  # g, u <- + LoRA expands (in place), h' written
        M, I = a["M"], a["I"]
        reads, writes, flops = ["g_ptr", "u_ptr"], ["h_ptr"], {}
        for side, rank, dt in (("g", "RG", "LORA_G_DTYPE"), ("u", "RU", "LORA_U_DTYPE")):
            if a[f"LORA_{side.upper()}"]:
                reads += [f"s{side}_ptr", f"lb{side}_ptr"]
                writes.append(f"{side}_ptr")
                _add(flops, _lora_flops(a[dt], 2 * M * I * a[rank]))
        sides = [x for x in ("G", "U") if a[f"LORA_{x}"]]
        fp32 = _fp32_key(a[f"LORA_{x}_DTYPE"] for x in sides)  # a mixed pair: charged as fp32 (the larger)
        weight = _epilogue_weight(kernel, True, fp32, a["BLOCK_R"], [a[f"R{x}"] for x in sides]) if sides \
            else GATE_UP_NO_LORA_WEIGHT
        return reads, writes, flops, round(M * I * weight), \
            M * I if a["HAS_MASK"] else 0
    if kernel == "lora_shrink_kernel":
        M, K, R = a["M"], a["K"], a["R"]
        return ["x_ptr", "a_ptr"], ["s_ptr"], _lora_flops(a["DOT_DTYPE"], 2 * M * K * R, exact=_is16(a["x_ptr"])), 0, \
            M * K if a["HAS_DROPOUT"] else 0
    if kernel == "gemm_lora_expand_kernel":
        M, N, K, R = a["M"], a["N"], a["K"], a["R"]
        flops = {_dot_unit(a["X_DTYPE"]): 2 * M * N * K}
        reads = ["x_ptr", "w_ptr"] + (["bias_ptr"] if a["HAS_BIAS"] else [])
        if a["HAS_LORA"]:
            _add(flops, _lora_flops(a["LORA_DTYPE"], 2 * M * N * R))
            reads += ["s_ptr", "b_ptr"]
        return reads, ["y_ptr"], flops, M * N, M * N if a["LORA_DROPOUT"] else 0
    if kernel == "gate_up_act_kernel":
        M, I, K = a["M"], a["I"], a["K"]
        flops = {_dot_unit(a["X_DTYPE"]): 2 * 2 * M * I * K}
        reads = ["x_ptr", "wg_ptr", "wu_ptr"] + (["bg_ptr"] if a["BIAS_G"] else []) + (["bu_ptr"] if a["BIAS_U"] else [])
        for side, rank, dt in (("G", "RG", "LORA_G_DTYPE"), ("U", "RU", "LORA_U_DTYPE")):
            if a[f"LORA_{side}"]:
                _add(flops, _lora_flops(a[dt], 2 * M * I * a[rank]))
                reads += [f"s{side.lower()}_ptr", f"lb{side.lower()}_ptr"]
        return reads, ["g_ptr", "u_ptr", "h_ptr"], flops, M * I, M * I if a["HAS_MASK"] else 0
    if kernel == "token_reduce_kernel":
        T, A, B = a["T"], a["A"], a["B"]
        n = 2 * T * A * B  # dA, dB: a LoRA dot; dW: the base weight's (IEEE for fp32)
        flops = _lora_flops(a["DOT_DTYPE"], n, exact=_is16(a["p_ptr"]) + _is16(a["q_ptr"])) if a["LORA_DOT"] \
            else {_dot_unit(a["DOT_DTYPE"]): n}
        return ["p_ptr", "q_ptr"], ["out_ptr"] + (["colsum_ptr"] if a["HAS_COLSUM"] else []), flops, 0, \
            T * B if a["Q_DROPOUT"] else 0
    if kernel == "split_sum_kernel":  # out = cast(sum over splits of the fp32 partials): memory-bound
        n = a["n"]
        return ["part_ptr"], ["out_ptr"], {}, round(n * (SPLIT_SUM_ELEMENT_WEIGHT + a["n_splits"] * SPLIT_SUM_SPLIT_WEIGHT)), 0
    raise KeyError(f"no cost rule for Triton kernel {kernel!r}: add one to perf/ledger.py")


_TRITON_KERNELS = {  # module (under kernels.triton) -> kernel attributes the launchers call
    "masked_gated_act": ("masked_gated_act_fwd_kernel", "masked_gated_act_bwd_kernel"),
    "lora_shrink": ("lora_shrink_kernel",),
    "gemm_lora_expand": ("gemm_lora_expand_kernel",),
    "gate_up_act": ("gate_up_act_kernel",),
    "token_reduce": ("token_reduce_kernel",),
    "act_bwd_lora": ("act_bwd_lora_kernel",),
    "lora_epilogue": ("lora_expand_add_kernel", "gate_up_lora_act_kernel"),
    "split_sum": ("split_sum_kernel",),
}


class _KernelRecorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kw)`` records instead of launching."""

    def __init__(self, kernel, name: str, ledger: Ledger):
        self.kernel, self.name, self.ledger = kernel, name, ledger
        self.arg_names = list(inspect.signature(kernel.fn).parameters)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound = dict(zip(self.arg_names, args)) | kwargs
            g = grid(bound) if callable(grid) else tuple(grid)
            reads, writes, flops, elements, philox = _triton_cost(self.name, bound)
            config = ",".join(f"{k}={v}" for k, v in kwargs.items() if k.startswith(("BLOCK", "GROUP", "num_")))
            self.ledger.launches.append(Launch(
                self.name, "triton", sum(nbytes(bound[p]) for p in reads), sum(nbytes(bound[p]) for p in writes),
                flops, elements, philox, g, config))

        return launch


# ---- our CUDA C functions ------------------------------------------------------------------------
# The tensor-core activation passes of csrc/kernels/act_lora.cu: issue work per (M, I) element, in
# elementwise-kernel elements (ELEMENTWISE_INSTR = 24), keyed by (pass, an fp32 adapter, rank > 32).
# From the static sm_90a SASS of the bf16 / silu variants (compile-check --cuda; loops listed per
# variant), per 32-row step of 16 elements per thread: the step's loop body plus the extra trips of its
# inner loops (the second 8-column group; the mma k-steps: 64 / k per warp-tile forward, rank / k and
# 32 / k backward, averaged over the warps that own a tile; the A_d / t_d staging loops; the scalar
# staging path, not taken, left out), over 16, less the two mask streams the model charges as Philox
# work (2 x 18.4), over 24:
#   forward   r 16: fp32 adapters 1762 / 16 = 110 per element, bf16 1779 / 16 = 111
#             r 64: 2982 / 16 = 186, bf16 2604 / 16 = 163
#   backward  r 16: 2239 / 16 = 140, bf16 1969 / 16 = 123
#             r 64: 4086 / 16 = 255 (tf32x3: 2 x 8 + 4 x 4 split-and-mma steps), bf16 2749 / 16 = 172
# less, since the MUFU sigmoid of transpeft/activations.h, what it took off the 8-column group body that
# runs twice per step (loop_body_instructions before / after, sass_round2_cuda_tiles.json /
# sass_round2_cuda_mufu.json): forward r 16 166 (fp32 adapters) and 182 (bf16), r 64 161 and 179; backward
# r 16 188 and 180, r 64 186 and 179; per element that is the difference over 8 (20-23.5).
# The activation is a template parameter there, so the static count is what runs.
# masked_gated_act.cu's kernels (ragged or unaligned rows, h' or xd wanted, no LoRA term, and
# TRANSPEFT_CUDA_ONE_PASS_BWD=0) switch on the activation at run time, so their loops carry all three
# activations' code; they are charged the static count of a copy compiled with silu fixed, a lower
# bound: per element of their column loop (rows x 8 elements), less the Philox charge. Forward with the
# shrink r 16 / r 64: 95 / 307 (fp32 adapters), 104 / 383 (bf16); backward with the LoRA term: 143 /
# 467, 184 / 552; without a LoRA term: forward 53, backward 98 (one mask stream). Those counts are from
# before the MUFU sigmoid, which takes about 20 per element off them too; not re-derived (they are
# fallbacks), so these weights now overcharge. Their rank sums are
# FFMA chains, charged again as fp32 FLOPs (the time takes the larger of issue and compute).
# Since the warps' tiles of one row share A's fragments (tile_mma_row; z_step, reduce_step), the weights of
# every tensor-core kernel here carry the change of its static count, per step: the body's change plus the
# changed k loop's further trips (trips - 1) x (its new body - the old per-tile bodies), over the
# elements per thread, over 24. sm_90a, bf16 / silu, fp32 / bf16 adapters:
#   act backward r 16  1013 -> 998 and z 2 x 64 -> 95 (1 more trip): -0.12;  bf16 944 -> 950: +0.02
#                r 64  1216 -> 1113, z 2 x 64 -> 96 (7 more), dA 247 -> 163 (3 more): -1.51;
#                      bf16 1121 -> 1029, z 64 -> 38 (3 more), dA 127 -> 61 (1 more): -0.61
#                with dB 1590 -> 1570 and z (1 more): -0.14;  bf16 1566 -> 1595: +0.08
#   act forward  (its weights re-derived whole since stop 28, below; these steps are history)
#                r 64  1035 -> 970, S_d 2 x 65 -> 98 (7 more): -0.75;  bf16 1135 -> 1084, 54 -> 32 (3 more): -0.30
#                with the expands 1852 -> 1782, z_g and z_u 4 x 64 -> 2 x 98 (1 more): -0.34;
#                bf16 1879 -> 1862: -0.04 (r 16 and 32 without them: the same code)
#   token_reduce r 64  669 -> 579, 247 -> 163 (3 more): -0.89;  bf16 621 -> 553, 127 -> 61 (1 more): -0.35
#   expand       r 16  491 -> 484, z 2 x 64 -> 98 (1 more): -0.10, dX 661 -> 644: -0.12;
#                      bf16 400 -> 392: -0.02, dX 635 -> 645: +0.03
#                r 64  493 -> 482 and 7 more trips: -0.58, dX 659 -> 643: -0.59;
#                      bf16 457 -> 440, 52 -> 32 (3 more): -0.20, dX 684 -> 661: -0.22
# The forward (act_fwd_lora_kernel, "fwd" and "fwd_gu") since stop 28: its column loop stages A_d (and
# B_g, B_u) only through 16-byte groups in a compile-time number of trips (the launcher checks the
# alignment: act_fwd_lora_takes), so its static SASS is what runs, and the weights are derived from it
# by one rule (python_tests/test_cuda_ledger_weights.py, which lists its assumptions): per 64-column step, the loop's static count plus each inner loop's further trips (the
# element loop 2 trips, the staging loops rank tile / 16, the k loops their HMMA per step over their
# body's), over 16 elements, less two mask streams (2 x 18.4), over 24 (sm_90a, bf16 base, silu;
# python_tests/test_cuda_ledger_weights.py recompiles and checks them). Before, the static count held
# about 500 instructions per step of A_d staging that never ran (an unrolled-by-4 loop with its remainder
# and an element-by-element path) and the B staging's element-by-element paths: the forward was charged
# 0.8-2.9 elementwise units per element too many. Per step: r 16 bf16 adapters 1062 (1493 with the gate/up
# expands), fp32 1042 (1472); r 64 bf16 1255 (2298), fp32 1287. They hold the exact operand already
# (fp32 adapters over a 16-bit base, the model's cases), and an fp32
# base under fp32 adapters is charged the same (its third mma per k step not counted).
CUDA_ACT_LORA_ELEMENT_WEIGHT = {
    ("fwd", True, False): 1.18, ("fwd", False, False): 1.23, ("fwd", True, True): 1.82, ("fwd", False, True): 1.74,
    # the one-pass backward, derived the same way since stop 28 (its t_d staging's element-by-element
    # fallback is a call now, out of its row loop): per step r 16 1450 / 1435 (bf16 / fp32 adapters),
    # r 64 1755 / 1916; before, the loop's static count held about 460 instructions of t_d staging that
    # never ran at rank 16 (a 16-byte path unrolled by 4 with its remainder, and the element-by-element one)
    ("bwd", True, False): 2.21, ("bwd", False, False): 2.24, ("bwd", True, True): 3.46, ("bwd", False, True): 3.04,
    ("fwd_ffma", True, False): 2.44, ("fwd_ffma", False, False): 2.81, ("fwd_ffma", True, True): 11.24,
    ("fwd_ffma", False, True): 14.41,
    ("bwd_ffma", True, False): 4.41, ("bwd_ffma", False, False): 6.13, ("bwd_ffma", True, True): 17.94,
    ("bwd_ffma", False, True): 21.48,
    # the backward with the gate/up dB (ranks <= 32, 16-bit activations; its staging element by element,
    # inline: the 16-byte one spilled there), derived the same way: per step 2484 (bf16 adapters) / 2295
    # (fp32), the two S^T cast(dg) products, the cast stores and three stagings of (32, RT) rows. It had
    # been charged 4.36 / 4.23, an undercharge: the staging loops' count was a guess.
    ("bwd_db", True, False): 4.45, ("bwd_db", False, False): 4.94,
    # the forward with the gate/up expands (ranks <= 32 with fp32 adapters, 64 with 16-bit ones; derived
    # as the forward above): B_g, B_u staged per step, z_g, z_u on the tensor cores, the sums and the g, u
    # stores; at rank 64 B_g and B_u take turns in one buffer (two more barriers per step)
    ("fwd_gu", True, False): 2.30, ("fwd_gu", False, False): 2.36, ("fwd_gu", False, True): 4.45,
}
CUDA_ACT_ELEMENT_WEIGHT = {"masked_gated_act_fwd": 1.44, "masked_gated_act_bwd": 3.32}  # no LoRA term

# lora_token_reduce (csrc/kernels/lora_reduce.cu), keyed by (an fp32 adapter, rank > 32), derived as the
# activation passes' weights since stop 28 (python_tests/test_cuda_ledger_weights.py): per 32-row step of
# 16 elements per thread, packed bf16 x, r 16: 474 instructions with fp32 adapters (the exact form: x
# unsplit), 598 with bf16; r 64: 638, 735; over 16, less one mask stream (the static count holds the
# dropout path), over 24. Before (hand-derived from the static count, with l's staging unrolled and its
# element-by-element path inline): 1.26 - 0.18, 1.15, 3.13 - 0.81, 2.14.
CUDA_TOKEN_REDUCE_ELEMENT_WEIGHT = {(True, False): 0.47, (False, False): 0.79, (True, True): 0.90, (False, True): 1.15}

# The tensor-core shrink and expand (lora_shrink.cu, lora_expand.cu), keyed by (kind, an fp32 adapter,
# rank > 32), bf16 x / y. Until stop 28, by hand: shrink (64 rows per block, every warp on the tensor cores), per
# 64-column step of 32 elements per thread (static sm_90a SASS, packed x): the step body (four groups of
# x cast and staged, a's (RT, 64) columns staged), less the scalar staging loop it does not take, plus
# the k loop's further trips (tile_mma_row: A's fragments loaded and split once per k step for all RT / 16
# tiles) and the staging loop's (RT / 16 - 1 more at rank 64): r 16 (1100 - 120 + 7 x 61) / 32 = 44.0
# (fp32 adapters), (1357 - 129 + 3 x 23) / 32 = 40.5 (bf16); r 64 (1234 - 120 + 7 x 163 + 3 x 130) / 32
# = 82.7, (1404 - 129 + 3 x 41 + 3 x 199) / 32 = 62.3. The earlier tile kernel (16 rows per block, one
# warp of four on the mma at rank 16) took 76, 89, 171 and 174 per element. expand (forward / dX with
# its mask, separate kernels), per 32-row group of 16
# elements per thread: the group body, the second group of 8, z's k-steps, S's staging and a quarter of
# b's (staged once per 128 rows): r 16 753 / 1096 per 16 (fp32 adapters), 576 / 1038 (bf16); r 64
# 2065 / 2400, 1328 / 1784. Less the mask stream where there is one (18.4; the shrink's static count
# holds its dropout path), over 24. The tf32x3 split is two integer instructions and a subtraction per
# operand element (tile_mma.cuh); a k-step of 3 x 4 HMMA.1684 is about 62 instructions with its
# fragment loads. The earlier per-column kernels keep the weight of 1 (their static counts, 185 per
# element for a 16-rank shrink chunk and 420 for an expand, hold every branch).
# shrink_exact: fp32 adapters over a 16-bit x (tile_mma's A_EXACT: two mmas per k step, x not split; since
# stop 26 under dropout too, whose path the static count held already): r 16 (1093 - 120 + 7 x 45) / 32 =
# 40.3, r 64 (1206 - 120 + 7 x 135 + 3 x 130) / 32 = 75.7; its FLOPs are charged as two tf32 products.
# Since stop 28 these are derived by the activation passes' rule (test_cuda_ledger_weights.py):
# the step loop holds only what runs (a's and S's staging in compile-time 16-byte trips, the
# element-by-element fallbacks called out of line), plus its inner loops' further trips, and for the
# expand a quarter of b's staging. Per step: shrink (32 elements per thread, one mask stream) r 16 931
# (bf16 adapters) / 844 (fp32, exact) / 852 (fp32 x), r 64 1172 / 1326 / 1382; expand (16 per thread)
# r 16 427 / 439, dX 874 / 764 (bf16 / fp32 adapters), r 64 792 / 965, dX 1230 / 1286. The figures
# above were read off static counts that still held about 370-500 instructions per step of staging
# that never ran (the remainder and unrolled forms of the 16-byte staging, next to the element-wise
# path): the shrink was charged 0.9-2.7 units, the expand 1.5-4.9, where 0.3-2.6 run.
CUDA_LORA_TILE_ELEMENT_WEIGHT = {
    ("shrink", True, False): 0.34, ("shrink", False, False): 0.45, ("shrink", True, True): 1.03,
    ("shrink", False, True): 0.76, ("shrink_exact", True, False): 0.33, ("shrink_exact", True, True): 0.96,
    ("expand", True, False): 1.14, ("expand", False, False): 1.11, ("expand", True, True): 2.51,
    ("expand", False, True): 2.06,
    ("expand_grad", True, False): 1.22, ("expand_grad", False, False): 1.51, ("expand_grad", True, True): 2.58,
    ("expand_grad", False, True): 2.44,
}


# lora_dropout_cast (lora.cu), keyed by (kernel, fp32 output): the 8-column group kernel (unit column
# stride; one Philox call per group) per element of its column loop, sm_90a, 16-bit x, aligned rows
# (sass_round2_cuda_mufu.json): 156 / 8 = 19.5 instructions to fp32, 220 / 8 = 27.5 to a 16-bit dtype;
# the per-element kernel (strided x; one call per element): 249 and 291. Less the mask charge (18.4),
# over 24. Before the group kernel every call took the per-element one and was charged 24 + 18.4.
CUDA_DROPOUT_CAST_ELEMENT_WEIGHT = {("group", True): 0.05, ("group", False): 0.38,
                                    ("element", True): 9.61, ("element", False): 11.36}


# Since stop 26 the CUDA tensor-core passes multiply an operand that holds 16-bit values (x, dY, h', dg, du
# under fp32 adapters over a 16-bit base) unsplit: tile_mma's A_EXACT / B_EXACT, two mmas per k step
# instead of three (the dropout's scale after the sum, tile_pass.cuh keep_only). Until stop 28 the weights
# above carried that as a separate change per kernel; since then they are derived from the exact variants'
# SASS themselves (test_cuda_ledger_weights.py), and an fp32 x under fp32 adapters is charged the same
# count (its third mma per k step not counted). The FLOPs still count two tf32 products for an exact dot.


def _cuda_tc_unit(dtype) -> tuple[str, int]:
    """(unit, products per FLOP) of the tensor-core LoRA products of act_lora.cu in an adapter dtype."""
    return {torch.float32: ("tc_tf32", 3), torch.float16: ("tc_fp16", 1), torch.bfloat16: ("tc_bf16", 1)}[dtype]


def _exact(adapter: torch.Tensor, operand: torch.Tensor) -> bool:
    """fp32 adapters over a 16-bit operand: the CUDA tile kernels multiply it unsplit (two tf32 mmas)."""
    return adapter.dtype == torch.float32 and operand.element_size() == 2


def _cuda_cost(wrapper: str, tensors_in: list, tensors_out: list, kw: dict) -> tuple[dict, int, int]:
    """(FLOPs by unit, elements, philox) of one CUDA wrapper call (kernels/cuda/launch.py)."""
    if wrapper == "lora_shrink" and tensors_in[1].shape[0] <= 64 and (tensors_in[0].shape[1] <= 1 or tensors_in[0].stride(1) == 1):
        x, a = tensors_in[0], tensors_in[1]  # the tensor-core shrink (lora_shrink.cu)
        drop = kw.get("drop")
        dropout = drop is not None and drop.q > 0
        unit, times = _cuda_tc_unit(a.dtype)
        exact = _exact(a, x)
        weight = CUDA_LORA_TILE_ELEMENT_WEIGHT[("shrink_exact" if exact else "shrink", a.dtype == torch.float32,
                                                a.shape[0] > 32)]
        return {unit: (2 if exact else times) * 2 * x.numel() * a.shape[0]}, round(x.numel() * weight), \
            x.numel() if dropout else 0
    if wrapper == "lora_expand_" and tensors_in[1].shape[1] <= 64 and tensors_in[0].shape[1] % 8 == 0:
        y, s = tensors_in[0], tensors_in[1]  # the tensor-core expand (lora_expand.cu)
        drop = kw.get("drop")
        unit, times = _cuda_tc_unit(s.dtype)
        kind = "expand_grad" if kw.get("grad") else "expand"
        weight = CUDA_LORA_TILE_ELEMENT_WEIGHT[(kind, s.dtype == torch.float32, s.shape[1] > 32)]
        return {unit: times * 2 * y.numel() * s.shape[1]}, round(y.numel() * weight), \
            y.numel() if kw.get("grad") and drop and drop.q > 0 else 0
    if wrapper == "lora_shrink":
        x, a = tensors_in[0], tensors_in[1]
        drop = kw.get("drop")
        return {"fp32": 2 * x.shape[0] * x.shape[1] * a.shape[0]}, 0, \
            x.numel() if drop is not None and drop.q > 0 else 0
    if wrapper == "lora_expand_":
        y, s = tensors_in[0], tensors_in[1]
        drop = kw.get("drop")
        return {"fp32": 2 * y.numel() * s.shape[1]}, y.numel(), y.numel() if kw.get("grad") and drop and drop.q > 0 else 0
    if wrapper == "masked_gated_act_fwd" and kw.get("down_a") is not None and tensors_in[0].shape[1] % 8 == 0:
        # the tensor-core forward (act_lora.cu; the ledger's meta tensors count as aligned)
        g, a = tensors_in[0], kw["down_a"]
        n, r = g.numel(), a.shape[0]
        unit, times = _cuda_tc_unit(a.dtype)
        drop = kw.get("down_drop")
        philox = n * ((kw.get("p", 0) > 0) + (drop is not None and drop.q > 0))
        gate_up = kw.get("gate_up")
        exact = _exact(a, g)  # S_d's h' operand unsplit
        s_d = (times - exact) * 2 * n * r
        if gate_up is not None:  # and the gate/up expands: two more rank-sized products per element
            weight = CUDA_ACT_LORA_ELEMENT_WEIGHT[("fwd_gu", a.dtype == torch.float32, max(r, gate_up.s_g.shape[1]) > 32)]
            return {unit: s_d + times * 2 * 2 * n * gate_up.s_g.shape[1]}, round(n * weight), philox
        weight = CUDA_ACT_LORA_ELEMENT_WEIGHT[("fwd", a.dtype == torch.float32, r > 32)]
        return {unit: s_d}, round(n * weight), philox
    if wrapper in ("masked_gated_act_fwd", "masked_gated_act_bwd"):
        g = tensors_in[1] if wrapper.endswith("bwd") else tensors_in[0]
        n = g.numel()
        a = kw.get("down_a")
        lora = a is not None and (wrapper.endswith("fwd") or kw.get("down_t") is not None)
        rank_flops = 2 * n * a.shape[0] * (2 if wrapper.endswith("bwd") else 1) if lora else 0
        drop = kw.get("down_drop")
        philox = n * ((kw.get("p", 0) > 0) + (lora and drop is not None and drop.q > 0))
        if lora:
            key = ("fwd_ffma" if wrapper.endswith("fwd") else "bwd_ffma", a.dtype == torch.float32, a.shape[0] > 32)
            weight = CUDA_ACT_LORA_ELEMENT_WEIGHT[key]
        else:
            weight = CUDA_ACT_ELEMENT_WEIGHT[wrapper]
        return ({"fp32": rank_flops} if rank_flops else {}), round(n * weight), philox
    if wrapper == "act_bwd_lora":  # the activation backward plus z = t_d A_d and dA_d, both on the tensor cores
        g, a = tensors_in[1], kw["down_a"]
        n, r = g.numel(), a.shape[0]
        unit, times = _cuda_tc_unit(a.dtype)
        drop = kw.get("down_drop")
        philox = n * ((kw.get("p", 0) > 0) + (drop is not None and drop.q > 0))
        gate_up = kw.get("gate_up")
        exact = _exact(a, g)  # dA_d's h' (and dB's dg, du) unsplit; z = t_d A_d is not
        flops = times * 2 * n * r + (times - exact) * 2 * n * r
        if gate_up is not None:  # and the gate/up dB: two more rank-sized token sums over the same tiles
            r_gu = gate_up[0].shape[1]
            weight = CUDA_ACT_LORA_ELEMENT_WEIGHT[("bwd_db", a.dtype == torch.float32, False)]
            return {unit: flops + (times - exact) * 2 * 2 * n * r_gu}, round(n * weight), philox
        weight = CUDA_ACT_LORA_ELEMENT_WEIGHT[("bwd", a.dtype == torch.float32, r > 32)]
        return {unit: flops}, round(n * weight), philox
    if wrapper == "lora_token_reduce":  # s l^T D(cast_A(x)): x staged once, the products on the tensor cores
        l, x = tensors_in[0], tensors_in[1]
        unit, times = _cuda_tc_unit(l.dtype)
        drop = kw.get("drop")
        exact = _exact(l, x)
        weight = CUDA_TOKEN_REDUCE_ELEMENT_WEIGHT[(l.dtype == torch.float32, l.shape[1] > 32)]
        return {unit: (times - exact) * 2 * x.numel() * l.shape[1]}, round(x.numel() * weight), \
            x.numel() if drop is not None and drop.q > 0 else 0
    if wrapper == "lora_dropout_cast":
        x, out = tensors_in[0], tensors_out[0]
        grouped = x.shape[1] <= 1 or x.stride(1) == 1
        weight = CUDA_DROPOUT_CAST_ELEMENT_WEIGHT[("group" if grouped else "element", out.element_size() == 4)]
        return {}, round(x.numel() * weight), x.numel()
    raise KeyError(f"no cost rule for CUDA wrapper {wrapper!r}: add one to perf/ledger.py")


class _CudaLibRecorder:
    """Stands in for the loaded CUDA library: ``call`` records the C function name for the wrapper in
    progress; a call from a wrapper that is not in _CUDA_WRAPPERS (so without a cost rule) is an error,
    not a launch the model silently leaves out."""

    emulated = False

    def __init__(self):
        self.calls: list[str] = []
        self.active = 0  # recorded wrappers in progress

    def call(self, name, *args):
        if not self.active:
            raise KeyError(f"{name}: called by a CUDA wrapper that is not in _CUDA_WRAPPERS (perf/ledger.py); "
                           "add it there with a cost rule")
        self.calls.append(name)


_CUDA_WRAPPERS = ("lora_shrink", "lora_expand_", "masked_gated_act_fwd", "masked_gated_act_bwd", "act_bwd_lora",
                  "lora_dropout_cast", "lora_token_reduce")


def _cuda_wrapper(fn, wrapper: str, lib: _CudaLibRecorder, ledger: Ledger):
    params = list(inspect.signature(fn).parameters)

    def recorded(*args, **kwargs):
        bound = dict(zip(params, args)) | kwargs
        before = len(lib.calls)
        lib.active += 1
        try:
            out = fn(*args, **kwargs)
        finally:
            lib.active -= 1
        ins = [v for v in args if isinstance(v, torch.Tensor)] + \
            [v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k != "out"]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if wrapper == "lora_expand_":  # read-modify-write of y
            outs = [ins[0]]
        elif wrapper == "masked_gated_act_fwd" and kwargs.get("gate_up") is not None:
            gu = kwargs["gate_up"]  # the expands' operands read, g and u written in place
            ins += [gu.s_g, gu.b_g, gu.s_u, gu.b_u]
            outs += [ins[0], ins[1]]
        elif kwargs.get("out") is not None:
            outs = list(kwargs["out"])
        if wrapper == "act_bwd_lora" and kwargs.get("gate_up") is not None:  # (S_g, s_g, S_u, s_u): S_g, S_u read
            ins += [t for t in kwargs["gate_up"] if isinstance(t, torch.Tensor)]
        read = sum(nbytes(t) for t in ins)
        written = sum(nbytes(t) for t in outs)
        flops, elements, philox = _cuda_cost(wrapper, ins, outs, bound)
        for name in lib.calls[before:]:
            ledger.launches.append(Launch(name.removeprefix("transpeft_"), "cuda", read, written, flops, elements,
                                          philox, detail=wrapper))
        return out

    return recorded


# ---- attention, as FlashAttention runs it --------------------------------------------------------
class _FlashAttention(torch.autograd.Function):
    """Stands in for F.scaled_dot_product_attention: one fused launch forward (reads q, k, v, writes o
    and the log-sum-exp) and one backward (reads q, k, v, o, do, lse; writes dq, dk, dv), with the
    causal FLOPs of FlashAttention-2 (half of the full S x S products)."""

    @staticmethod
    def forward(ctx, q, k, v, ledger, causal):
        ctx.ledger, ctx.causal = ledger, causal
        ctx.save_for_backward(q, k, v)
        b, h, s, d = q.shape
        frac = 0.5 if causal else 1.0
        lse = b * h * s * 4
        # grouped-query attention: k and v (fewer heads) are read once, as FlashAttention does
        ledger.launches.append(Launch("flash_attention_fwd", "attention", nbytes(q) + nbytes(k) + nbytes(v),
                                      nbytes(q) + lse, {_unit(q.dtype): int(4 * b * h * s * s * d * frac)}))
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        b, h, s, d = q.shape
        frac = 0.5 if ctx.causal else 1.0
        ctx.ledger.launches.append(Launch(
            "flash_attention_bwd", "attention", 3 * nbytes(q) + nbytes(k) + nbytes(v) + b * h * s * 4,
            nbytes(q) + nbytes(k) + nbytes(v), {_unit(q.dtype): int(10 * b * h * s * s * d * frac)}))
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None


@contextlib.contextmanager
def recording(target: DryRunTarget, backends=("triton", "cuda")):
    """Record into a fresh Ledger (yielded) everything launched inside; tensors must be on the meta device."""
    import torch.nn.functional as F

    ledger = Ledger()
    saved: list[tuple[object, str, object]] = []

    def swap(obj, attr, value):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    if "triton" in backends:
        import importlib

        for mod_name, kernels in _TRITON_KERNELS.items():
            mod = importlib.import_module(f"transpeft_kernels.kernels.triton.{mod_name}")
            for k in kernels:
                swap(mod, k, _KernelRecorder(getattr(mod, k), k, ledger))
    if "cuda" in backends:
        from ..kernels import cuda as cuda_pkg
        from ..kernels.cuda import launch as cuda_launch

        lib = _CudaLibRecorder()
        swap(cuda_launch, "load", lambda: lib)
        for w in _CUDA_WRAPPERS:
            wrapped = _cuda_wrapper(getattr(cuda_launch, w), w, lib, ledger)
            swap(cuda_launch, w, wrapped)
            swap(cuda_pkg, w, wrapped)

    # The torch backend regenerates masks with ~300 elementwise ATen ops per chunk; on meta tensors
    # each op goes through Python decompositions. A mask of a given shape always launches the same
    # sequence, so it is recorded once per shape and replayed (same launches, same counts).
    memo: dict[tuple, tuple[list, int, int]] = {}
    from ..reference import lora as ref_lora, mlp as ref_mlp, philox as ref_philox
    from ..ops import torch_backend

    real_keep_mask = ref_philox.keep_mask

    def keep_mask(seed, rows, cols, p, device="cpu"):
        device = torch.device(device)
        if device.type != "meta":
            return real_keep_mask(seed, rows, cols, p, device)
        key = (rows, cols)
        if key not in memo:
            start, syncs, copies = len(ledger.launches), ledger.host_syncs, ledger.h2d_copies
            out = real_keep_mask(seed, rows, cols, p, device)
            memo[key] = (ledger.launches[start:], ledger.host_syncs - syncs, ledger.h2d_copies - copies)
            return out
        launches, syncs, copies = memo[key]
        ledger.launches.extend(launches)
        ledger.host_syncs += syncs
        ledger.h2d_copies += copies
        return torch.empty(rows, cols, dtype=torch.bool, device=device)

    for mod in (torch_backend, ref_lora, ref_mlp):
        swap(mod, "keep_mask", keep_mask)

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _FlashAttention.apply(q, k, v, ledger, is_causal or attn_mask is not None)

    swap(F, "scaled_dot_product_attention", sdpa)
    swap(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    try:
        with dry_running(target), _AtenRecorder(ledger):
            yield ledger
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)
