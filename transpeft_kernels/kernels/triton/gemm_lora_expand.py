"""Base GEMM with the LoRA expand fused into its epilogue: ``Y = X W^T + b + s * D(S B^T)``.

Shapes: X (M, K), W (N, K), b (N,), S (M, R), B (N, R), Y (M, N); every operand with arbitrary
strides (pass transposed views for the backward). fp32 accumulation; Y in its own dtype.

    Y[m, n] = sum_k X[m, k] W[n, k]  +  b[n]  +  s * D(sum_r S[m, r] B[n, r])[m, n]
    D(z)[m, n] = z[m, n]                                     forward (dropout acts on S's input)
    D(z)[m, n] = z[m, n] * keep[m, n] * scale                backward dX of a LoRA linear
                 keep = reference.keep_mask(seed, M, N, q) (lane n % 8 of tl.randint4x(seed,
                 m * ceil(N / 8) + n // 8), 16 bits, >= keep_threshold(q)), scale = 1/(1-q)

Uses in a LoRA linear y = x W^T + b + s (dropout_q(x) A^T) B^T:
    forward   X = x,  W = W,    S = dropout_q(x) A^T,  B = B             -> y
    dX        X = dY, W = W^T,  S = t = dY B,          B = A^T, D = mask -> dx = dY W + s D(t A)
The base product runs in X's dtype (fp32 operands use IEEE fp32, like torch's default matmul), the
rank-R product on the tensor cores in the adapter's precision (``_common.lora_dot``): bf16/fp16
adapters as native 16-bit dots, fp32 adapters as tf32x3 (three tf32 MMAs, within 2.5 * 2^-21 |a b|
of each product: near fp32, where bf16 operands would lose 2^-8). Both accumulate in one fp32 tile,
rounded once at the store: the expand is the first R steps of that accumulator (then scaled, and
masked for dX), not a second fp32 tile added in the epilogue (with an fp32 base, whose IEEE product
runs on the CUDA cores in another register layout, the LoRA term is added after the K loop instead).

Each program owns one (BLOCK_M, BLOCK_N) tile of Y; programs are ordered in groups of GROUP_M
row-tiles so that consecutive programs reuse the same W columns from L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ...reference.philox import keep_threshold
from ._common import (cast_like, cdiv, check_2d, check_out, check_same_device, dot_operand, dtype_code, lora_code, lora_dot,
                      philox_keep, pow2_at_least, rounded_to, seed_on, upcast_dots)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid``: GROUP_M row tiles sweep each column tile together."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    within = pid % per_group
    return first_m + within % rows_in_group, within // rows_in_group


@triton.jit
def lora_expand_tile(acc, s_ptr, b_ptr, R, stride_sm, stride_sr, stride_bn, stride_br,
                     rows64, cols64, row_ok, col_ok,
                     LORA_DTYPE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + sum_r S[rows, r] B[cols, r]: the expand as extra rank steps of the fp32 (BLOCK_M,
    BLOCK_N) accumulator ``acc``, BLOCK_R ranks at a time, on the tensor cores (``lora_dot``).
    fp32 adapters step 16 ranks at a time: tf32x3 holds the big and small parts of both operand
    tiles, and a 64-rank step spilled on sm_80 (single tf32 products, code 3, keep the same step: not
    compiled wider, so not checked for spills)."""
    STEP_R: tl.constexpr = 16 if (LORA_DTYPE == 0 or LORA_DTYPE == 3) else BLOCK_R  # fp32 operand tiles
    for r0 in range(0, R, STEP_R):
        rs = r0 + tl.arange(0, STEP_R)
        r_ok = rs < R
        rs64 = rs.to(tl.int64)
        s = tl.load(s_ptr + rows64[:, None] * stride_sm + rs64[None, :] * stride_sr,
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + cols64[None, :] * stride_bn + rs64[:, None] * stride_br,
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        acc = lora_dot(dot_operand(s, LORA_DTYPE, UPCAST), dot_operand(bt, LORA_DTYPE, UPCAST), acc,
                       LORA_DTYPE, UPCAST)
    return acc


@triton.jit
def lora_term(acc, s_ptr, b_ptr, seed_ptr, R, N, stride_sm, stride_sr, stride_bn, stride_br,
               rows, rows64, cols64, row_ok, col_ok, pid_n, scaling, drop_threshold, drop_scale,
               LORA_DROPOUT: tl.constexpr, LORA_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """scaling * D(acc + S B^T): the LoRA term (acc is zero), masked for dX."""
    acc = lora_expand_tile(acc, s_ptr, b_ptr, R, stride_sm, stride_sr, stride_bn, stride_br,
                           rows64, cols64, row_ok, col_ok, LORA_DTYPE, UPCAST, BLOCK_R)
    if LORA_DROPOUT:
        keep = philox_keep(tl.load(seed_ptr), rows, pid_n * BLOCK_N, N, drop_threshold, BLOCK_N)
        acc = tl.where(keep, acc * drop_scale, 0.0)
    return scaling * acc


@triton.jit(do_not_specialize=["drop_threshold"])
def gemm_lora_expand_kernel(
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr, seed_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
    stride_ym, stride_yn,
    scaling, drop_threshold, drop_scale,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, LORA_DROPOUT: tl.constexpr,
    X_DTYPE: tl.constexpr, LORA_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    k_idx = tl.arange(0, BLOCK_K)

    # The LoRA term first: its rank-R steps start the accumulator, which is then scaled (and masked,
    # for dX) in place before the K loop adds the base product. No second fp32 tile is live during
    # the main loop or the epilogue; the LoRA term is rounded exactly as before (s * D(S B^T) in fp32).
    # An fp32 base product runs on the CUDA cores ("ieee", like torch's default fp32 matmul) in a
    # different register layout from the tensor-core LoRA dots: there the LoRA term comes after
    # the K loop (starting the accumulator with it spilled: 1.9 KB on sm_90).
    LORA_FIRST: tl.constexpr = HAS_LORA and X_DTYPE != 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if LORA_FIRST:
        acc = lora_term(acc, s_ptr, b_ptr, seed_ptr, R, N, stride_sm, stride_sr, stride_bn, stride_br,
                         rows, rows64, cols64, row_ok, col_ok, pid_n, scaling, drop_threshold, drop_scale,
                         LORA_DROPOUT, LORA_DTYPE, UPCAST, BLOCK_N, BLOCK_R)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + k_idx
        k_ok = ks < K
        ks64 = ks.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks64[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols64[None, :] * stride_wn + ks64[:, None] * stride_wk,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(dot_operand(x, X_DTYPE, UPCAST), dot_operand(wt, X_DTYPE, UPCAST), input_precision="ieee")
    if HAS_LORA and not LORA_FIRST:
        acc += lora_term(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), s_ptr, b_ptr, seed_ptr, R, N,
                          stride_sm, stride_sr, stride_bn, stride_br, rows, rows64, cols64, row_ok, col_ok, pid_n,
                          scaling, drop_threshold, drop_scale, LORA_DROPOUT, LORA_DTYPE, UPCAST, BLOCK_N, BLOCK_R)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols64[None, :] * stride_yn, cast_like(acc, y_ptr),
             mask=row_ok[:, None] & col_ok[None, :])


def gemm_lora_expand(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                     s: torch.Tensor | None = None, b: torch.Tensor | None = None, scaling: float = 1.0,
                     dropout: float = 0.0, seed: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Y = x w^T + bias + scaling * D(s b^T), (M, N) in x's dtype (or into ``out``, which must not alias
    an input). x (M, K) and w (N, K) share a dtype; s (M, R) and b (N, R) share the adapter dtype.
    dropout > 0 applies the Philox keep mask of ``seed`` (width N) and 1/(1-dropout) to s b^T."""
    check_2d(x, "x")
    check_2d(w, "w")
    xcode = dtype_code(x, "x")
    if w.dtype != x.dtype:
        raise TypeError(f"w: expected dtype {x.dtype} like x, got {w.dtype}")
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"w: expected shape (N, {K}) to match x (M, K), got {tuple(w.shape)}")
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"bias: expected shape ({N},) and dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    has_lora = s is not None
    if has_lora:
        if b is None:
            raise ValueError("b: required with s")
        check_2d(s, "s")
        check_2d(b, "b")
        lcode = lora_code(s, "s")
        if b.dtype != s.dtype:
            raise TypeError(f"b: expected dtype {s.dtype} like s, got {b.dtype}")
        if s.shape[0] != M or b.shape[0] != N or b.shape[1] != s.shape[1]:
            raise ValueError(f"s, b: expected shapes ({M}, R) and ({N}, R), got {tuple(s.shape)} and {tuple(b.shape)}")
        R = s.shape[1]
    else:
        lcode, R = xcode, 0
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
    lora_drop = has_lora and dropout > 0
    if lora_drop and seed is None:
        raise ValueError("seed: required when dropout > 0")
    device = check_same_device(x=x, w=w, bias=bias, s=s, b=b)
    check_out(out, (M, N), x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=device) if out is None else out
    if M == 0 or N == 0:
        return y
    seed_t = seed_on(seed, device) if lora_drop else x
    scale = rounded_to(1.0 / (1.0 - dropout), s.dtype) if lora_drop else 1.0
    br = min(64, pow2_at_least(R))

    def launch(config):
        grid = (cdiv(M, config["BLOCK_M"]) * cdiv(N, config["BLOCK_N"]),)
        gemm_lora_expand_kernel[grid](
            x, w, bias if bias is not None else x, s if has_lora else x, b if has_lora else x, y, seed_t,
            M, N, K, R,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            s.stride(0) if has_lora else 0, s.stride(1) if has_lora else 0,
            b.stride(0) if has_lora else 0, b.stride(1) if has_lora else 0,
            y.stride(0), y.stride(1),
            float(scaling), keep_threshold(dropout) if lora_drop else 0, scale,
            HAS_BIAS=bias is not None, HAS_LORA=has_lora, LORA_DROPOUT=lora_drop,
            X_DTYPE=xcode, LORA_DTYPE=lcode, UPCAST=upcast_dots(), BLOCK_R=br,
            num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs())

    key = ("expand", configs.bucket(M), N, K, R, x.dtype, None if s is None else s.dtype, lcode, bias is not None, lora_drop,
           configs.layout_key(x, w, s, y))
    launch(configs.choose(configs.GEMM, device, key, x.element_size(), launch))
    return y
