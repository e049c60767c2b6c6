"""Pieces shared by the Triton kernels: dtype codes, the regenerated Philox keep mask, the dot
operand cast that works around the interpreter's bf16 ``tl.dot``, and launcher-side checks.

Why a dtype *code* (int constexpr) rather than a ``tl.dtype`` constexpr: ints travel unchanged
through ``triton.compile(ASTSource(...))`` in the compile check and through the interpreter on both
supported Triton versions (3.6 on the GPU machine, 3.9 here).
"""
from __future__ import annotations

from ..env import interpreting
from ..launch_args import (  # noqa: F401  (re-exported for the kernel modules)
    DTYPE_CODES, check_2d, check_out, check_same_device, dtype_code, rounded_to, seed_on,
)
import triton
import triton.language as tl

# dtype codes used as constexprs: 0 float32, 1 float16, 2 bfloat16 (launch_args.DTYPE_CODES)
FP32, FP16, BF16 = 0, 1, 2
CODE_NAMES = {FP32: "fp32", FP16: "fp16", BF16: "bf16"}
TORCH_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


def upcast_dots() -> bool:
    """The interpreter multiplies raw bf16 bit patterns in ``tl.dot`` (Triton issue 11584), so
    interpreted runs feed every dot fp32 operands; compiled runs keep the native dtype."""
    return interpreting()


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Next power of two >= max(n, floor); tl.dot needs every block dimension >= 16."""
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


# ---- device-side helpers ------------------------------------------------------------------------
# The interpreter converts float32 -> bfloat16 by truncation; compiled kernels round to nearest even.
# Kernels read this flag (a constexpr global, so compiled code carries no trace of it).
_INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def to_bf16(x):
    """x rounded to bfloat16, to nearest even, in compiled and interpreted runs alike."""
    if _INTERPRETED:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        y = x.to(tl.bfloat16)
    return y


@triton.jit
def cast_like(x, ptr):
    """x cast to the element type of ``ptr`` (round to nearest even for bfloat16)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        y = to_bf16(x)
    else:
        y = x.to(ptr.dtype.element_ty)
    return y


@triton.jit
def to_code(x, CODE: tl.constexpr):
    """Cast a block to the dtype with code CODE (0 fp32, 1 fp16, 2 bf16)."""
    if CODE == 1:
        y = x.to(tl.float16)
    elif CODE == 2:
        y = to_bf16(x)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def dot_operand(x, CODE: tl.constexpr, UPCAST: tl.constexpr):
    """x rounded to the dtype the reference multiplies in, then widened to fp32 when UPCAST
    (interpreter), so a bf16 product is computed on bf16-rounded values either way."""
    y = to_code(x, CODE)
    if UPCAST:
        y = y.to(tl.float32)
    return y


@triton.jit
def philox_keep(seed, rows, cols, n_cols, p):
    """Bool block: keep[i, j] = tl.rand(seed, rows[i] * n_cols + cols[j]) >= p (fp32 compare).

    rows: (BM,) int, cols: (BN,) int, n_cols: the matrix width. Offsets are int64 so that
    tokens x features past 2**31 do not wrap; this is the exact recipe of reference.keep_mask.
    """
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols.to(tl.int64)[None, :]
    return tl.rand(seed, offsets) >= p
