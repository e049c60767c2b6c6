"""Pieces shared by the Triton kernels: dtype codes, the regenerated Philox keep mask, the dot
operand cast that works around the interpreter's bf16 ``tl.dot``, and launcher-side checks.

Why a dtype *code* (int constexpr) rather than a ``tl.dtype`` constexpr: ints travel unchanged
through ``triton.compile(ASTSource(...))`` in the compile check and through the interpreter on both
supported Triton versions (3.6 on the GPU machine, 3.9 here).
"""
from __future__ import annotations

from ..env import cuda_fp32_matmul_is_tf32, interpreting
from ..launch_args import (  # noqa: F401  (re-exported for the kernel modules)
    DTYPE_CODES, cdiv, check_2d, check_out, check_same_device, dtype_code, next_pow2, rounded_to, seed_on,
)
import triton
import triton.language as tl

# dtype codes used as constexprs: 0 float32, 1 float16, 2 bfloat16 (launch_args.DTYPE_CODES), and for
# the LoRA dots of fp32 adapters a fourth, 3: fp32 values multiplied as single tf32 products, the code
# ``lora_code`` gives fp32 adapters where torch allows TF32 for its fp32 matmuls. The kernels treat TF32 as
# fp32 storage (``to_code``, ``dot_operand``, pointer types, the fp32 tile steps); only the dot
# (``lora_dot_split``) and what depends on the tf32x3 split (the exact-operand paths, act_bwd_lora's
# block_n_for_rank) tell the two apart.
FP32, FP16, BF16, TF32 = 0, 1, 2, 3
CODE_NAMES = {FP32: "fp32", FP16: "fp16", BF16: "bf16", TF32: "tf32"}
TORCH_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
TORCH_DTYPES[TF32] = TORCH_DTYPES[FP32]


def fp32_lora_precision() -> str:
    """How the LoRA dots of fp32 adapters are multiplied, following the precision torch gives its own
    fp32 matmuls on CUDA (``env.cuda_fp32_matmul_is_tf32``; read for every launch plan's key, so a change
    takes effect on the next call): full fp32 (torch's default) gives "tf32x3", near-fp32 accuracy; TF32
    allowed gives "tf32", one tensor-core product, the precision vanilla PEFT's fp32 LoRA matmuls then
    run in."""
    return "tf32" if cuda_fp32_matmul_is_tf32() else "tf32x3"


def lora_dot_code(code: int) -> int:
    """The code the LoRA dots of adapter dtype code ``code`` compile with: TF32 for fp32 adapters when
    ``fp32_lora_precision()`` is "tf32", else ``code``."""
    return TF32 if code == FP32 and fp32_lora_precision() == "tf32" else code


def lora_code(t, name: str) -> int:
    """``lora_dot_code`` of a LoRA operand's dtype code (``dtype_code``: checks it)."""
    return lora_dot_code(dtype_code(t, name))


def upcast_dots() -> bool:
    """The interpreter multiplies raw bf16 bit patterns in ``tl.dot`` (Triton issue 11584), so
    interpreted runs feed every dot fp32 operands; compiled runs keep the native dtype."""
    return interpreting()


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Next power of two >= max(n, floor); tl.dot needs every block dimension >= 16."""
    return max(floor, next_pow2(max(int(n), 1)))


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
    """Cast a block to the dtype with code CODE (0 fp32, 1 fp16, 2 bf16, 3 fp32)."""
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


# ---- LoRA dots on the tensor cores ---------------------------------------------------------------
# Every LoRA product (shrink, expand, the rank-sized token reductions) goes through ``lora_dot``, with
# the precision chosen by the adapter dtype (CODE):
#   bf16 / fp16 adapters: the native 16-bit tensor-core dot with fp32 accumulation (operands are
#       already in the adapter dtype, as the reference multiplies them).
#   fp32 adapters (PEFT's default): tf32x3 (3xTF32, as CUTLASS and Triton's "tf32x3"):
#       a = a_big + a_small with a_big = a rounded to tf32 (|a - a_big| <= 2^-11 |a|; _tf32_rna), and
#       a b ~ a_small b_big + a_big b_small + a_big b_big, three tf32 MMAs (HMMA on sm_80, HGMMA
#       on sm_90). The MMA reads the small part with 10 mantissa bits (the low 13 bits ignored:
#       error <= 2^-10 |a_small| <= 2^-21 |a|) and a_small b_small (<= 2^-22 |a b|) is dropped, so
#       each product is within (2^-21 + 2^-21 + 2^-22) |a b| = 2.5 * 2^-21 |a b| of a b: about 20
#       fp32 ulps per product, not the 2^-8 of bf16 operands. That keeps fp32 adapters near fp32
#       accuracy (the reference, the spec, computes them in fp32) at 3 tensor-core passes, instead
#       of "ieee" FFMA on the CUDA cores (1024 FFMA per thread per tile, 254-255 registers, spills).
#       tests: python_tests/budget.py (TF32X3_ROUNDOFF).
#       The split is written out here rather than left to input_precision="tf32x3": Triton 3.9's
#       F32DotTC pass sums the three products in a fresh zero tile and adds it to the accumulator
#       afterwards (plus a NaN select), i.e. a second (BLOCK_M, BLOCK_N) fp32 tile, the one thing
#       the expand-as-rank-steps design removes. Here all three MMAs chain into ``acc`` (small
#       products first). A non-finite operand gives a non-finite result, inf or NaN depending on
#       the signs of the partial products (with an exact operand that is inf, inf b_small + inf b_big),
#       where the reference gives +-inf or NaN: which of the two is not specified.
# The interpreter ignores input_precision (always IEEE fp32), so interpreted runs (UPCAST) emulate
# the split and the MMA's truncation with bit operations: the CPU tests see the error the GPU makes.
# The precision lora_dot compiles a LoRA dot in, per adapter dtype code (perf/ledger.py charges by it,
# one tf32 product fewer per operand that lora_dot_split knows to hold 16-bit values).
LORA_DOT_PRECISION = {FP32: "tf32x3", FP16: "fp16", BF16: "bf16", TF32: "tf32"}


@triton.jit
def _tf32_rna(x):
    """x rounded to tf32 (10 mantissa bits), to nearest with ties away from zero: half a tf32 ulp added to
    the bit pattern, the 13 low bits cleared (two integer instructions, compiled and interpreted alike).
    cvt.rna.tf32.f32, which this replaced, costs four on sm_90 (ptxas adds a compare and a select that
    keep inf and NaN): in the fp32-adapter expand's rank loop that was 75 of its 258 instructions per 16
    ranks. Here inf stays inf, a NaN may become inf or a zero (its small part x - big stays NaN), and a
    finite |x| within half a tf32 ulp of the fp32 maximum rounds to inf: the product is then non-finite,
    as it is for a non-finite operand anyway (lora_dot_split)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b as one tf32 tensor-core product: the MMA reads the top 19 bits of each fp32
    operand (sign, exponent, 10 mantissa bits); the interpreter drops the low 13 bits by hand."""
    if UPCAST:
        a = (((a.to(tl.uint32, bitcast=True)) >> 13) << 13).to(tl.float32, bitcast=True)
        b = (((b.to(tl.uint32, bitcast=True)) >> 13) << 13).to(tl.float32, bitcast=True)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    return acc


@triton.jit
def lora_dot_split(a, b, acc, CODE: tl.constexpr, UPCAST: tl.constexpr, A_EXACT: tl.constexpr,
                   B_EXACT: tl.constexpr):
    """acc + a @ b on the tensor cores for operands prepared by ``dot_operand(.., CODE, UPCAST)``, fp32
    accumulation. bf16/fp16 adapters (CODE 1, 2): the native 16-bit dot. fp32 adapters (CODE 0): tf32x3,
    small products first: a_small b_big + a_big b_small + a_big b_big. An operand flagged EXACT holds
    values of a 16-bit dtype (fp16 or bf16: a gradient, an activation or an input stored in the base's
    dtype, at most 10 mantissa bits), which tf32 represents exactly: its small part is zero, so its
    product is not issued and it is not split. One exact operand: two MMAs, within 2^-21 |a b| (the other
    operand's small part read truncated), inside TF32X3_ROUNDOFF; both exact: one MMA, exact products.
    fp32 adapters under torch's "high" / "medium" fp32 matmul precision (CODE 3, ``lora_code``): one tf32
    MMA of the operands as they are, each read truncated to 10 mantissa bits (within 2^-10 of each operand;
    an EXACT operand is not truncated), the precision of torch's own TF32 matmuls; budget TF32_ROUNDOFF."""
    if CODE == 3:
        acc = _tf32_dot(a, b, acc, UPCAST)
    elif CODE == 0:
        if A_EXACT:
            a_big = a
        else:
            a_big = _tf32_rna(a)
        if B_EXACT:
            b_big = b
        else:
            b_big = _tf32_rna(b)
        if not A_EXACT:
            acc = _tf32_dot(a - a_big, b_big, acc, UPCAST)
        if not B_EXACT:
            acc = _tf32_dot(a_big, b - b_big, acc, UPCAST)
        acc = _tf32_dot(a_big, b_big, acc, UPCAST)
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")  # 16-bit operands (fp32 only when UPCAST)
    return acc


@triton.jit
def lora_dot(a, b, acc, CODE: tl.constexpr, UPCAST: tl.constexpr):
    """``lora_dot_split`` with neither operand known exact: tf32x3 (three MMAs) for fp32 adapters (one
    under code TF32)."""
    return lora_dot_split(a, b, acc, CODE, UPCAST, False, False)


@triton.jit
def lora_dot_exact(a, b, acc, CODE: tl.constexpr, UPCAST: tl.constexpr):
    """``lora_dot_split`` where ``b`` holds 16-bit values: two MMAs for fp32 adapters (one under code TF32)."""
    return lora_dot_split(a, b, acc, CODE, UPCAST, False, True)


@triton.jit
def philox4x32_10(seed, offsets):
    """(c0, c1, c2, c3) of Philox4x32-10 at int64 ``offsets``: the words of ``tl.randint4x(seed,
    offsets)`` (reference.philox.philox_randint4x), with each round's two 32 x 32 -> 64-bit products
    written as one 64-bit multiply, which ptxas emits as one IMAD.WIDE.U32 (high and low word)
    instead of separate IMAD.HI and IMAD instructions."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = offsets.to(tl.uint32)
    c1 = (offsets >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(10):
        pa = c0.to(tl.uint64) * 0xD2511F53
        pb = c2.to(tl.uint64) * 0xCD9E8D57
        c0, c1, c2, c3 = (pb >> 32).to(tl.uint32) ^ c1 ^ k0, pb.to(tl.uint32), (pa >> 32).to(tl.uint32) ^ c3 ^ k1, pa.to(tl.uint32)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def philox_keep(seed, rows, col0, n_cols, threshold, BLOCK_N: tl.constexpr):
    """Bool (BM, BLOCK_N) block of the keep mask over rows ``rows`` (BM,) and columns
    col0 .. col0 + BLOCK_N - 1 of a matrix ``n_cols`` wide: the spec of reference.keep_mask.

    Element (i, j) is lane j % 8 of the Philox4x32-10 call at int64 offset i * ceil(n_cols / 8) + j // 8,
    v = (c[l // 2] >> 16 * (l % 2)) & 0xFFFF, kept iff v >= threshold (unsigned integer compare;
    threshold = reference.keep_threshold(p), in [0, 65536]). One Philox call (``philox4x32_10``, the
    words of ``tl.randint4x``) per 8 elements: the
    (BM, BLOCK_N // 8) words are split into 16-bit lanes and interleaved back into natural column
    order 8 g + l with tl.join / tl.reshape. col0 must be a multiple of 8 (every caller's tile starts at
    a multiple of its power-of-two width) and BLOCK_N a multiple of 8; columns past n_cols are drawn
    from the row's last (partial) group or beyond and must be masked by the caller, as for loads.
    """
    tl.static_assert(BLOCK_N % 8 == 0, "philox_keep: BLOCK_N must be a multiple of 8")
    groups = (n_cols + 7) // 8
    g = tl.arange(0, BLOCK_N // 8).to(tl.int64) + col0 // 8
    offsets = rows.to(tl.int64)[:, None] * groups + g[None, :]
    c0, c1, c2, c3 = philox4x32_10(seed, offsets)
    lo = 0xFFFF
    # Lanes v0..v7 = lo/hi halves of c0..c3. join adds a new last axis of 2, so in
    # join(join(join(v0, v4), join(v2, v6)), join(join(v1, v5), join(v3, v7))) the innermost join's
    # index is the most significant: element [x, y, z] is lane 4x + 2y + z, and the row-major reshape
    # puts lane l of group g at column 8 g + l.
    v = tl.join(tl.join(tl.join(c0 & lo, c2 & lo), tl.join(c1 & lo, c3 & lo)),
                tl.join(tl.join(c0 >> 16, c2 >> 16), tl.join(c1 >> 16, c3 >> 16)))
    v = tl.reshape(v, (rows.shape[0], BLOCK_N))
    return v >= threshold  # uint32 vs an int32 (or int) threshold: Triton promotes to uint32, an unsigned compare
