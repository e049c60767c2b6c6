// The LoRA shrink on the tensor cores (transpeft/tile_mma.cuh):
//
//   S = dropout_q(cast_A(x)) a^T        (M, R) in a's dtype TA, fp32 accumulation (mma in TA)
//
// Same contract and rounding as lora.cu's shrink_kernel (transpeft/capi.h, fused_math.h), which
// transpeft_lora_shrink keeps for what this one does not take: x with a column stride other than 1,
// rank > 64. A block of 4 warps owns 64 rows, warp w the 16 rows 16 w.., and sweeps K (or one of
// k_splits ranges of it, each writing an fp32 partial of S) in 64-column steps: each thread casts four
// groups of 8 columns of x (16-byte loads when K % 8 == 0 and rows are aligned; one Philox call per
// group for the dropout mask) into shared memory, a's (RT, 64) columns are staged beside it, and every
// warp adds its rows' x a^T into RT / 16 accumulator tiles. a's columns are staged once per 64 rows and
// every warp has tensor-core work; the split over K keeps enough blocks in flight (M / 64 row blocks
// alone are 128 at 8192 tokens). The earlier tile kernel owned 16 rows per block, so a's staging, the
// barriers and the step's bookkeeping were shared by 8 elements per thread instead of 32, and at rank 16
// one warp of four did the mma.
// EXACT (fp32 a, 16-bit x: the backward's t = dy B and every forward shrink over a 16-bit base): the
// staged x is exact in tf32, so each k step is two mmas instead of three (tile_mma's A_EXACT); under
// dropout the mask selects and its scale multiplies the finished sum (keep_only; since stop 26, before
// which the dropout case took three).
#include <cuda_runtime.h>
#include <stdint.h>

#include "transpeft/capi.h"
#include "transpeft/cuda_common.cuh"
#include "transpeft/fused_math.h"
#include "transpeft/tile_mma.cuh"
#include "transpeft/tile_pass.cuh"

namespace transpeft {
namespace cuda {
namespace {

constexpr int kShrinkBM = kLoraWarps * kTile;  // rows per block: one 16-row slab per warp
constexpr int kShrinkGroups = kShrinkBM * kBN / kGroup / kLoraThreads;  // groups of 8 per thread per step
static_assert(kShrinkBM * kBN % (kGroup * kLoraThreads) == 0, "whole groups per thread");

template <typename TX, typename TA, int RT, bool PACKED, bool EXACT>
__global__ void __launch_bounds__(kLoraThreads, kLoraMinBlocks) shrink_tile_kernel(TranspeftLoraShrinkArgs p) {
  static_assert(!EXACT || (sizeof(TX) == 2 && sizeof(TA) == 4), "EXACT: a 16-bit x under fp32 adapters");
  constexpr int NT = RT / kTile;                   // accumulator tiles per warp
  alignas(32) __shared__ TA s_x[kShrinkBM * kBN];  // dropout_q(cast_A(x)) of the step, zero outside (M, K)
  alignas(32) __shared__ TA s_a[RT * kBN];         // a's columns of the step: column-major B of x a^T
  alignas(32) __shared__ float s_o[kShrinkBM * RT];

  const TX* x = static_cast<const TX*>(p.x);
  const TA* a = static_cast<const TA*>(p.a);
  const uint64_t dseed = load_seed(p.drop.seed, p.drop.on);
  const TranspeftRandomMask drop = EXACT ? keep_only(p.drop) : p.drop;
  const float scale = EXACT && p.drop.on ? p.drop.kept : 1.0f;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const bool a_vec = p.sak == 1 && p.K % kGroup == 0 && aligned_rows<TA>(p.a, p.sar);
  const bool split = p.s_part != nullptr;
  const int64_t k_begin = split ? int64_t{blockIdx.y} * p.cols_per_split : 0;
  const int64_t k_end = split && k_begin + p.cols_per_split < p.K ? k_begin + p.cols_per_split : p.K;
  float* const part = split ? static_cast<float*>(p.s_part) + int64_t{blockIdx.y} * p.M * p.R : nullptr;

  for (int64_t row0 = int64_t{blockIdx.x} * kShrinkBM; row0 < p.M; row0 += int64_t{gridDim.x} * kShrinkBM) {
    TileAcc<TA> acc[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) tile_zero(acc[j]);
    for (int64_t col0 = k_begin; col0 < k_end; col0 += kBN) {
      stage_columns<TA, TA, RT>(s_a, a, p.sar, p.sak, p.R, col0, p.K, a_vec);
#pragma unroll  // the four groups' loads in flight together
      for (int i = 0; i < kShrinkGroups; ++i) {
        const int group = tid + i * kLoraThreads;
        const int m = group / (kBN / kGroup), c = (group % (kBN / kGroup)) * kGroup;
        const int64_t row = row0 + m, col = col0 + c;
        float xv[kGroup];  // x has unit column stride here
        lora_input_group<TX, TA, PACKED>(x + row * p.sxm + col, row < p.M && col < p.K, row, col, p.K, drop, dseed, xv);
#pragma unroll
        for (int v = 0; v < kGroup; ++v) s_x[m * kBN + c + v] = from_float<TA>(xv[v]);
      }
      __syncthreads();  // s_x and s_a complete
      tile_mma_row<TA, NT, false, kBN, true, EXACT>(acc, s_x + warp * kTile * kBN, kBN, s_a, kBN, kTile * kBN);
      __syncthreads();  // the next step may overwrite s_x and s_a
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) tile_store(s_o + warp * kTile * RT + j * kTile, RT, acc[j]);
    __syncthreads();
    store_rank_rows<TA, kShrinkBM, RT>(s_o, row0, p.M, p.R, split ? part : nullptr, static_cast<TA*>(p.s), p.lds,
                                       scale);
    __syncthreads();  // s_o is rewritten by the next row group
  }
}

template <typename TX, typename TA, bool PACKED, bool EXACT>
cudaError_t launch_shrink_rank_tile(const TranspeftLoraShrinkArgs& p, cudaStream_t stream) {
  const unsigned splits = p.s_part != nullptr ? static_cast<unsigned>(p.k_splits) : 1u;
  const dim3 grid(grid_for((p.M + kShrinkBM - 1) / kShrinkBM), splits);
  if (p.R <= 16) return launch_kernel(shrink_tile_kernel<TX, TA, 16, PACKED, EXACT>, grid, kLoraThreads, stream, p);
  if (p.R <= 32) return launch_kernel(shrink_tile_kernel<TX, TA, 32, PACKED, EXACT>, grid, kLoraThreads, stream, p);
  return launch_kernel(shrink_tile_kernel<TX, TA, 64, PACKED, EXACT>, grid, kLoraThreads, stream, p);
}

template <typename TX, typename TA, bool PACKED>
cudaError_t launch_shrink_tile_as(const TranspeftLoraShrinkArgs& p, cudaStream_t stream) {
  return launch_shrink_rank_tile<TX, TA, PACKED, kExactOperand<TX, TA>>(p, stream);
}

}  // namespace

bool shrink_tile_takes(const TranspeftLoraShrinkArgs& p) {
  if (p.R < 1 || p.R > 64 || (p.sxk != 1 && p.K > 1)) return false;
  return p.s_part == nullptr || (p.cols_per_split >= kBN && p.cols_per_split % kBN == 0 && p.k_splits >= 1 &&
                                 p.k_splits <= 65535 && p.k_splits == (p.K + p.cols_per_split - 1) / p.cols_per_split);
}

cudaError_t launch_shrink_tile(const TranspeftLoraShrinkArgs& p, cudaStream_t stream) {
  return with_dtype(p.x_dtype, [&](auto tx) -> cudaError_t {
    using TX = typename decltype(tx)::type;
    const bool packed = p.K % kGroup == 0 && aligned_rows<TX>(p.x, p.sxm);
    return with_dtype(p.a_dtype, [&](auto ta) -> cudaError_t {
      using TA = typename decltype(ta)::type;
      return packed ? launch_shrink_tile_as<TX, TA, true>(p, stream) : launch_shrink_tile_as<TX, TA, false>(p, stream);
    });
  });
}

}  // namespace cuda
}  // namespace transpeft
