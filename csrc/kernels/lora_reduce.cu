// The LoRA gradients' token reductions on the tensor cores (transpeft/tile_mma.cuh):
//
//   part[s] = scaling * L[rows of s]^T D_q(cast_A(X))[rows of s]       (R, N) fp32 per row split s
//
// with L (M, R) in the adapter dtype and X (M, N) in its own dtype: dB^T = s S^T cast_A(dY) and
// dA = s t^T dropout_q(cast_A(x)). The cast (and the dropout mask) happen while X's tile is staged in
// shared memory, so no (M, N) copy in the adapter dtype is written (with fp32 adapters that copy is
// 4 bytes per element written and read again by the GEMM). Contract: transpeft/capi.h.
//
// Layout as the activation backward's dA (act_lora.cu): a block of 4 warps owns 64 columns of one row
// split and walks its rows 32 at a time, staging L's rows (32, RT) and the cast tile (32, 64), and
// adds L^T X into (RT, 64) accumulators; at the end they go, times `scaling`, to the split's partial.
// fp32 adapters over a 16-bit X (dA over a bf16 base, dB^T from dY): X's values are exact in tf32, so
// each k step takes two mmas, not three (reduce_step's X_EXACT); under dropout the mask selects and
// the dropout's scale multiplies the sum with `scaling` (keep_only).
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "transpeft/capi.h"
#include "transpeft/cuda_common.cuh"
#include "transpeft/fused_math.h"
#include "transpeft/tile_mma.cuh"
#include "transpeft/tile_pass.cuh"

namespace transpeft {
namespace cuda {
namespace {

using ReduceArgs = TranspeftLoraTokenReduceArgs;

// PACKED: N % 8 == 0 and aligned rows, so whole groups load with 16-byte loads.
template <typename TX, typename TA, int RT, bool PACKED>
__global__ void __launch_bounds__(kLoraThreads, kLoraMinBlocks) token_reduce_kernel(ReduceArgs p) {
  constexpr int NTW = RT / kTile;  // (RT / 16) x (BN / 16) output tiles over 4 warps
  static_assert((RT / kTile) * (kBN / kTile) == NTW * kLoraWarps, "NTW tiles per warp");
  alignas(32) __shared__ TA s_l[kBM * RT];     // L's rows of the step, zero past R and the split
  alignas(32) __shared__ TA s_x[kBM * kBN];    // D_q(cast_A(X)) of the step, zero outside (M, N)
  alignas(32) __shared__ float s_o[RT * kBN];  // the result tile at the end

  constexpr bool X_EXACT = kExactOperand<TX, TA>;
  const TX* x = static_cast<const TX*>(p.x);
  const TA* l = static_cast<const TA*>(p.l);
  const uint64_t dseed = load_seed(p.drop.seed, p.drop.on);
  const TranspeftRandomMask drop = X_EXACT ? keep_only(p.drop) : p.drop;
  const float scaling = X_EXACT && p.drop.on ? p.scaling * p.drop.kept : p.scaling;
  const int64_t col0 = int64_t{blockIdx.x} * kBN;
  const int64_t split = blockIdx.y;
  const int64_t row_begin = split * p.rows_per_split;
  const int64_t row_end = row_begin + p.rows_per_split < p.M ? row_begin + p.rows_per_split : p.M;

  TileAcc<TA> acc[NTW];
#pragma unroll
  for (int j = 0; j < NTW; ++j) tile_zero(acc[j]);

  for (int64_t row0 = row_begin; row0 < row_end; row0 += kBM) {
    stage_rank_rows<TA, RT>(s_l, l, p.ldl, 1, row0, row_end, p.R);
#pragma unroll 1
    for (int i = 0; i < kGroupsPerThread; ++i) {
      const auto [m, c] = group_of(i);
      const int64_t row = row0 + m, col = col0 + c;
      float xv[kGroup];
      lora_input_group<TX, TA, PACKED>(x + row * p.ldx + col, row < row_end && col < p.N, row, col, p.N, drop, dseed, xv);
#pragma unroll
      for (int v = 0; v < kGroup; ++v) s_x[m * kBN + c + v] = from_float<TA>(xv[v]);
    }
    __syncthreads();  // s_l and s_x complete

    reduce_step<TA, RT, NTW, X_EXACT>(acc, s_l, s_x);
    __syncthreads();  // the next step may overwrite s_l and s_x
  }
  store_reduction<TA, RT, NTW>(acc, s_o, static_cast<float*>(p.part) + split * p.R * p.N, p.R, p.N, col0, scaling);
}

template <typename TX, typename TA, bool PACKED>
cudaError_t launch_reduce(const ReduceArgs& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.N + kBN - 1) / kBN), static_cast<unsigned>(p.splits));
  if (p.R <= 16) return launch_kernel(token_reduce_kernel<TX, TA, 16, PACKED>, grid, kLoraThreads, stream, p);
  if (p.R <= 32) return launch_kernel(token_reduce_kernel<TX, TA, 32, PACKED>, grid, kLoraThreads, stream, p);
  return launch_kernel(token_reduce_kernel<TX, TA, 64, PACKED>, grid, kLoraThreads, stream, p);
}

}  // namespace
}  // namespace cuda
}  // namespace transpeft

using namespace transpeft::cuda;

extern "C" int transpeft_lora_token_reduce(const TranspeftLoraTokenReduceArgs* args, uint64_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const ReduceArgs& p = *args;
  if (p.M < 0 || p.N < 0 || p.R < 1 || p.R > 64 || p.l == nullptr || p.x == nullptr || p.part == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.rows_per_split < 1 || p.rows_per_split % kBM != 0 ||
      p.splits != (p.M + p.rows_per_split - 1) / p.rows_per_split || p.splits > 65535 ||
      (p.N + kBN - 1) / kBN > 0x7FFFFFFF) {
    return cudaErrorInvalidValue;
  }
  const cudaStream_t st = as_stream(stream);
  return with_dtype(p.x_dtype, [&](auto xtag) -> cudaError_t {
    using TX = typename decltype(xtag)::type;
    const bool packed = p.N % kGroup == 0 && aligned_rows<TX>(p.x, p.ldx);
    return with_dtype(p.l_dtype, [&](auto ltag) -> cudaError_t {
      using TA = typename decltype(ltag)::type;
      if constexpr (sizeof(TA) == 2 && !std::is_same<TA, TX>::value) {
        return cudaErrorInvalidValue;  // a 16-bit adapter dtype must be the operand's own
      } else {
        return packed ? launch_reduce<TX, TA, true>(p, st) : launch_reduce<TX, TA, false>(p, st);
      }
    });
  });
}
