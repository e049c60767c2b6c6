// LoRA pieces around the cuBLAS GEMMs that the binding runs through ATen (the per-column and per-row
// kernels here; the tensor-core shrink and expand in lora_shrink.cu and lora_expand.cu take over for
// the shapes they cover):
//   shrink        S  = dropout_q(cast_A(X)) A^T        (M, R): forward S, and t = dY B (A = B^T, q = 0)
//   expand        Y += s * S B^T                        in place on a fresh GEMM output: forward y, dX
//   dropout_cast  dropout_q(cast_A(X))                  the LoRA input for dA = s t^T xd
// Rounding follows transpeft/fused_math.h, the contract transpeft/capi.h. Masks are regenerated
// from (seed, row, col) (Philox offset row * ceil(cols / 8) + col / 8 in 64 bits, lane col % 8),
// never stored. The shrink and expand here handle one column per thread, so each mask element costs
// one Philox call (keep_factor): correct, but without the 8-per-call saving of the activation
// kernels; they are the fallbacks. dropout_cast takes groups of 8 columns (one call per group) when x
// has unit column stride.
//
// shrink: a block owns 4 token rows and 16 ranks at a time; threads stride over K (coalesced for a
// row-major X), each A element read serves the 4 rows, and the 64 partial sums are reduced over the
// block in a fixed order (deterministic, no atomics). Used for x with a column stride other than 1 and ranks above 64;
// the rest takes the tensor-core shrink (lora_shrink.cu).
// expand: a thread owns one output column n for 8 rows, keeps B[n, 16 ranks] in registers. Used for
// ragged widths, unaligned rows and ranks above 64; the rest takes the tensor-core expand
// (lora_expand.cu).
#include <cuda_runtime.h>
#include <stdint.h>

#include "transpeft/capi.h"
#include "transpeft/cuda_common.cuh"
#include "transpeft/fused_math.h"
#include "transpeft/tile_pass.cuh"  // the 8-column groups: lora_input_group, store_group, aligned_rows

namespace transpeft {
namespace cuda {
namespace {

// The kernels take the C interface's argument structs (transpeft/capi.h) as their parameter block.
using ShrinkArgs = TranspeftLoraShrinkArgs;
using ExpandArgs = TranspeftLoraExpandArgs;
using CastArgs = TranspeftLoraDropoutCastArgs;

constexpr int kShrinkRows = 4;
constexpr int kShrinkRanks = 16;
constexpr int kExpandRows = 8;
constexpr int kExpandRanks = 16;

template <typename TX, typename TA>
__global__ void __launch_bounds__(kThreads) shrink_kernel(ShrinkArgs p) {
  constexpr int NACC = kShrinkRows * kShrinkRanks;
  __shared__ float smem[kWarps * NACC];
  const TX* x = static_cast<const TX*>(p.x);
  const TA* a = static_cast<const TA*>(p.a);
  TA* s = static_cast<TA*>(p.s);
  const uint64_t seed = load_seed(p.drop.seed, p.drop.on);
  for (int64_t row0 = int64_t{blockIdx.x} * kShrinkRows; row0 < p.M; row0 += int64_t{gridDim.x} * kShrinkRows) {
    for (int64_t r0 = 0; r0 < p.R; r0 += kShrinkRanks) {
      float acc[NACC];
#pragma unroll
      for (int n = 0; n < NACC; ++n) acc[n] = 0.0f;
      for (int64_t k = threadIdx.x; k < p.K; k += kThreads) {
        float xv[kShrinkRows];
#pragma unroll
        for (int r = 0; r < kShrinkRows; ++r) {
          const int64_t row = row0 + r;
          if (row < p.M) {
            xv[r] = lora_input<TA>(to_float(x[row * p.sxm + k * p.sxk]),
                                   keep_factor(p.drop.on, seed, row, k, p.K, p.drop.threshold, p.drop.kept));
          } else {
            xv[r] = 0.0f;
          }
        }
#pragma unroll
        for (int kk = 0; kk < kShrinkRanks; ++kk) {
          const float av = r0 + kk < p.R ? to_float(a[(r0 + kk) * p.sar + k * p.sak]) : 0.0f;
#pragma unroll
          for (int r = 0; r < kShrinkRows; ++r) acc[r * kShrinkRanks + kk] += xv[r] * av;
        }
      }
      const float total = block_sum_to_thread<NACC>(acc, smem);
      if (threadIdx.x < NACC) {
        const int64_t row = row0 + threadIdx.x / kShrinkRanks;
        const int64_t rank = r0 + threadIdx.x % kShrinkRanks;
        if (row < p.M && rank < p.R) s[row * p.lds + rank] = from_float<TA>(total);
      }
    }
  }
}

template <typename TY, typename TL>
__global__ void __launch_bounds__(kThreads) expand_kernel(ExpandArgs p) {
  const int64_t n = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (n >= p.N) return;
  TY* y = static_cast<TY*>(p.y);
  const TL* s = static_cast<const TL*>(p.s);
  const TL* b = static_cast<const TL*>(p.b);
  const uint64_t seed = load_seed(p.drop.seed, p.drop.on);
  for (int64_t row0 = int64_t{blockIdx.y} * kExpandRows; row0 < p.M; row0 += int64_t{gridDim.y} * kExpandRows) {
    float z[kExpandRows];
#pragma unroll
    for (int r = 0; r < kExpandRows; ++r) z[r] = 0.0f;
    for (int64_t r0 = 0; r0 < p.R; r0 += kExpandRanks) {
      float bv[kExpandRanks];
#pragma unroll
      for (int kk = 0; kk < kExpandRanks; ++kk) bv[kk] = r0 + kk < p.R ? to_float(b[n * p.sbn + (r0 + kk) * p.sbr]) : 0.0f;
#pragma unroll
      for (int r = 0; r < kExpandRows; ++r) {
        const int64_t row = row0 + r;
        if (row >= p.M) continue;
#pragma unroll
        for (int kk = 0; kk < kExpandRanks; ++kk) {
          if (r0 + kk < p.R) z[r] += to_float(s[row * p.ssm + (r0 + kk) * p.ssr]) * bv[kk];
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kExpandRows; ++r) {
      const int64_t row = row0 + r;
      if (row >= p.M) continue;
      TY* out = y + row * p.ldy + n;
      const float yv = to_float(*out);
      float res;
      if (p.grad_mode) {
        res = lora_grad_sum<TY, TL>(yv, z[r], p.scaling,
                                    keep_factor(p.drop.on, seed, row, n, p.N, p.drop.threshold, p.drop.kept));
      } else {
        res = lora_forward_sum<TY, TL>(yv, z[r], p.scaling);
      }
      *out = from_float<TY>(res);
    }
  }
}

// dropout_q(cast_A(x)) for x with unit column stride: a thread takes groups of 8 columns, one Philox call
// per group (keep_bits, the activation kernels' scheme) and, when PACKED (K % 8 == 0, x's and out's
// rows 16-byte aligned), 16-byte loads and stores.
template <typename TX, typename TO, bool PACKED>
__global__ void __launch_bounds__(kThreads) dropout_cast_group_kernel(CastArgs p) {
  const TX* x = static_cast<const TX*>(p.x);
  TO* out = static_cast<TO*>(p.out);
  const uint64_t seed = load_seed(p.drop.seed, p.drop.on);
  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    for (int64_t col = int64_t{threadIdx.x} * kGroup; col < p.K; col += int64_t{kThreads} * kGroup) {
      float v[kGroup];
      lora_input_group<TX, TO, PACKED>(x + row * p.sxm + col, true, row, col, p.K, p.drop, seed, v);
      TO* o = out + row * p.ldo + col;
      if constexpr (PACKED) {
        store_group<TO>(o, v);
      } else {
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          if (col + j < p.K) o[j] = from_float<TO>(v[j]);
        }
      }
    }
  }
}

// The same for any column stride, one column per thread and one Philox call per element.
template <typename TX, typename TO>
__global__ void __launch_bounds__(kThreads) dropout_cast_kernel(CastArgs p) {
  const TX* x = static_cast<const TX*>(p.x);
  TO* out = static_cast<TO*>(p.out);
  const uint64_t seed = load_seed(p.drop.seed, p.drop.on);
  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    for (int64_t k = threadIdx.x; k < p.K; k += kThreads) {
      const float d = keep_factor(p.drop.on, seed, row, k, p.K, p.drop.threshold, p.drop.kept);
      out[row * p.ldo + k] = from_float<TO>(lora_input<TO>(to_float(x[row * p.sxm + k * p.sxk]), d));
    }
  }
}

// f(Tag<T1>, Tag<T2>) for two dtype codes.
template <typename F>
cudaError_t with_dtypes(int32_t c1, int32_t c2, F&& f) {
  return with_dtype(c1, [&](auto t1) { return with_dtype(c2, [&](auto t2) { return f(t1, t2); }); });
}

}  // namespace

// The expand on the tensor cores (lora_expand.cu), for what it takes.
bool expand_tile_takes(const TranspeftLoraExpandArgs& args);
cudaError_t launch_expand_tile(const TranspeftLoraExpandArgs& args, cudaStream_t stream);
// The shrink on the tensor cores (lora_shrink.cu), for what it takes.
bool shrink_tile_takes(const TranspeftLoraShrinkArgs& args);
cudaError_t launch_shrink_tile(const TranspeftLoraShrinkArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace transpeft

using namespace transpeft::cuda;

extern "C" int transpeft_lora_shrink(const TranspeftLoraShrinkArgs* args, uint64_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const ShrinkArgs& p = *args;
  if (p.M < 0 || p.K < 0 || p.R < 0) return cudaErrorInvalidValue;
  if (p.M == 0 || p.R == 0) return cudaSuccess;
  if (shrink_tile_takes(p)) return launch_shrink_tile(p, as_stream(stream));
  if (p.s_part != nullptr) return cudaErrorInvalidValue;  // only the tensor-core shrink writes partials
  const unsigned grid = grid_for((p.M + kShrinkRows - 1) / kShrinkRows);
  return with_dtypes(p.x_dtype, p.a_dtype, [&](auto tx, auto ta) -> cudaError_t {
    using TX = typename decltype(tx)::type;
    using TA = typename decltype(ta)::type;
    return launch_kernel(shrink_kernel<TX, TA>, grid, kThreads, as_stream(stream), p);
  });
}

extern "C" int transpeft_lora_expand(const TranspeftLoraExpandArgs* args, uint64_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const ExpandArgs& p = *args;
  if (p.M < 0 || p.N < 0 || p.R < 0) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (expand_tile_takes(p)) return launch_expand_tile(p, as_stream(stream));
  const int64_t col_blocks = (p.N + kThreads - 1) / kThreads;
  if (col_blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  int64_t row_blocks = (p.M + kExpandRows - 1) / kExpandRows;
  if (row_blocks > 65535) row_blocks = 65535;  // grid-stride over the rest
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks));
  return with_dtypes(p.y_dtype, p.lora_dtype, [&](auto ty, auto tl) -> cudaError_t {
    using TY = typename decltype(ty)::type;
    using TL = typename decltype(tl)::type;
    return launch_kernel(expand_kernel<TY, TL>, grid, kThreads, as_stream(stream), p);
  });
}

extern "C" int transpeft_lora_dropout_cast(const TranspeftLoraDropoutCastArgs* args, uint64_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const CastArgs& p = *args;
  if (p.M < 0 || p.K < 0) return cudaErrorInvalidValue;
  if (p.M == 0 || p.K == 0) return cudaSuccess;
  return with_dtypes(p.x_dtype, p.out_dtype, [&](auto tx, auto to) -> cudaError_t {
    using TX = typename decltype(tx)::type;
    using TO = typename decltype(to)::type;
    const dim3 grid(grid_for(p.M));
    if (p.sxk != 1 && p.K > 1) return launch_kernel(dropout_cast_kernel<TX, TO>, grid, kThreads, as_stream(stream), p);
    if (p.K % kGroup == 0 && aligned_rows<TX>(p.x, p.sxm) && aligned_rows<TO>(p.out, p.ldo)) {
      return launch_kernel(dropout_cast_group_kernel<TX, TO, true>, grid, kThreads, as_stream(stream), p);
    }
    return launch_kernel(dropout_cast_group_kernel<TX, TO, false>, grid, kThreads, as_stream(stream), p);
  });
}
