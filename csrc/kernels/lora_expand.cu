// The LoRA expand on the tensor cores, in place over a fresh GEMM output (transpeft/tile_mma.cuh):
//
//   z = S b^T                                   (32 x 64 per block, mma in the LoRA dtype TL)
//   forward (grad_mode 0):  y = T(y + TL(TL(z) * s))
//   dX      (grad_mode 1):  y = T(y + T(TL(TL(TL(z) * s) * d)))      d: the dropout mask over (M, N)
//
// Same contract and rounding as lora.cu's expand_kernel (transpeft/capi.h, fused_math.h), which
// transpeft_lora_expand keeps for what this one does not take: N % 8 != 0, y rows not 16-byte aligned,
// rank > 64. A block of 4 warps owns 64 columns of 128 rows: it stages b's rows (64, RT) once, then per
// 32 rows S's rows (32, RT), forms z with two mma tiles per warp, and updates y in groups of 8 columns
// (16-byte loads and stores, one Philox call per group for the dX mask). The earlier kernel summed
// z with an FFMA chain per element, one column per thread.
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

constexpr int kExpandRowGroups = 4;  // 32-row groups per block: b's tile is staged once for 128 rows

// GRAD: p.grad_mode as a template parameter, so each kernel holds only its own branch.
template <typename TY, typename TL, int RT, bool GRAD>
__global__ void __launch_bounds__(kLoraThreads, kLoraMinBlocks) expand_tile_kernel(TranspeftLoraExpandArgs p) {
  alignas(32) __shared__ TL s_s[kBM * RT];      // S's rows, zero past R and M
  alignas(32) __shared__ TL s_b[kBN * RT];      // b's rows (column-major B of S b^T), zero past R and N
  alignas(32) __shared__ float s_z[kBM * kBN];  // z

  TY* y = static_cast<TY*>(p.y);
  const TL* s = static_cast<const TL*>(p.s);
  const TL* b = static_cast<const TL*>(p.b);
  const uint64_t dseed = load_seed(p.drop.seed, p.drop.on);
  const int tid = threadIdx.x;
  const int64_t col0 = int64_t{blockIdx.x} * kBN;

  for (int i = tid; i < kBN * RT; i += kLoraThreads) {
    const int n = i / RT, k = i % RT;
    s_b[i] = (col0 + n < p.N && k < p.R) ? b[(col0 + n) * p.sbn + k * p.sbr] : from_float<TL>(0.0f);
  }
  constexpr int64_t kSpan = int64_t{kBM} * kExpandRowGroups;
  // row groups: this block's 128 rows, then (past 65535 x 128 rows) the grid's next span
  for (int64_t row0 = int64_t{blockIdx.y} * kSpan; row0 < p.M;
       row0 += (row0 + kBM) % kSpan == 0 ? int64_t{gridDim.y} * kSpan - (kSpan - kBM) : kBM) {
    stage_rank_rows<TL, RT>(s_s, s, p.ssm, p.ssr, row0, p.M, p.R);
    __syncthreads();  // s_s (and, the first time, s_b) complete

    z_step<TL, RT, true>(s_z, s_s, s_b, RT, kTile * RT);
    __syncthreads();  // s_z complete

#pragma unroll 1
    for (int i = 0; i < kGroupsPerThread; ++i) {
      const auto [m, c] = group_of(i);
      const int64_t row = row0 + m, col = col0 + c;
      if (row >= p.M || col >= p.N) continue;  // N % 8 == 0: the whole group is in bounds
      TY* yp = y + row * p.ldy + col;
      float yv[kGroup];
      load_group<TY>(yp, yv);
      if constexpr (GRAD) {
        const uint32_t dbits = keep_bits(p.drop.on, dseed, row, col, p.N, p.drop.threshold);
#pragma unroll
        for (int v = 0; v < kGroup; ++v) {
          yv[v] = lora_grad_sum<TY, TL>(yv[v], s_z[m * kBN + c + v], p.scaling,
                                        lane_factor(p.drop.on, dbits, v, p.drop.kept));
        }
      } else {
#pragma unroll
        for (int v = 0; v < kGroup; ++v) yv[v] = lora_forward_sum<TY, TL>(yv[v], s_z[m * kBN + c + v], p.scaling);
      }
      store_group<TY>(yp, yv);
    }
    __syncthreads();  // the next row group may overwrite s_s and s_z
  }
}

template <typename TY, typename TL, bool GRAD>
cudaError_t launch_expand_tile_as(const TranspeftLoraExpandArgs& p, cudaStream_t stream) {
  int64_t row_blocks = (p.M + kBM * kExpandRowGroups - 1) / (kBM * kExpandRowGroups);
  if (row_blocks > 65535) row_blocks = 65535;  // grid-stride over the rest
  const dim3 grid(static_cast<unsigned>((p.N + kBN - 1) / kBN), static_cast<unsigned>(row_blocks));
  if (p.R <= 16) return launch_kernel(expand_tile_kernel<TY, TL, 16, GRAD>, grid, kLoraThreads, stream, p);
  if (p.R <= 32) return launch_kernel(expand_tile_kernel<TY, TL, 32, GRAD>, grid, kLoraThreads, stream, p);
  return launch_kernel(expand_tile_kernel<TY, TL, 64, GRAD>, grid, kLoraThreads, stream, p);
}

}  // namespace

bool expand_tile_takes(const TranspeftLoraExpandArgs& p) {
  if (p.R < 1 || p.R > 64 || p.N % kGroup != 0 || (p.N + kBN - 1) / kBN > 0x7FFFFFFF) return false;
  return with_dtype(p.y_dtype, [&](auto tag) -> cudaError_t {
           using TY = typename decltype(tag)::type;
           return aligned_rows<TY>(p.y, p.ldy) ? cudaSuccess : cudaErrorInvalidValue;
         }) == cudaSuccess;
}

cudaError_t launch_expand_tile(const TranspeftLoraExpandArgs& p, cudaStream_t stream) {
  return with_dtype(p.y_dtype, [&](auto ty) -> cudaError_t {
    return with_dtype(p.lora_dtype, [&](auto tl) -> cudaError_t {
      using TY = typename decltype(ty)::type;
      using TL = typename decltype(tl)::type;
      return p.grad_mode ? launch_expand_tile_as<TY, TL, true>(p, stream) : launch_expand_tile_as<TY, TL, false>(p, stream);
    });
  });
}

}  // namespace cuda
}  // namespace transpeft
