// The block shape and element-group helpers shared by the tensor-core passes over (rows, columns)
// tiles (csrc/kernels/act_lora.cu, lora_reduce.cu): 4-warp blocks, 32-row steps, 64-column tiles,
// columns in groups of 8 (one Philox call per group and mask, 16-byte loads and stores). nvcc, or g++
// with the emulation's stand-in for cuda_runtime.h.
#pragma once

#include <stdint.h>

#include "capi.h"
#include "cuda_common.cuh"
#include "fused_math.h"
#include "philox.h"
#include "tile_mma.cuh"

namespace transpeft {
namespace cuda {

constexpr int kLoraWarps = 4;
constexpr int kLoraThreads = kLoraWarps * 32;
constexpr int kLoraMinBlocks = 3;  // per SM: at most 168 registers per thread, 12 warps to hide latency
constexpr int kBM = 32;  // rows per step
constexpr int kBN = 64;  // columns per block
constexpr int kGroup = kMaskLanes;  // 8 columns: one Philox call per mask
constexpr int kGroupsPerThread = kBM * kBN / kGroup / kLoraThreads;
static_assert(kBM * kBN % (kGroup * kLoraThreads) == 0, "whole groups per thread");

// 8 consecutive elements as floats, through 16-byte loads (the group is in bounds and aligned).
template <typename T>
__device__ __forceinline__ void load_group(const T* p, float (&out)[kGroup]) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int q = 0; q < kGroup; q += V) {
    const Pack<T, V> pk = load_pack<T, V>(p + q);
#pragma unroll
    for (int v = 0; v < V; ++v) out[q + v] = to_float(pk.v[v]);
  }
}

template <typename T>
__device__ __forceinline__ void store_group(T* p, const float (&in)[kGroup]) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int q = 0; q < kGroup; q += V) {
    Pack<T, V> pk;
#pragma unroll
    for (int v = 0; v < V; ++v) pk.v[v] = from_float<T>(in[q + v]);
    store_pack<T, V>(p + q, pk);
  }
}

// store_group to global memory as one 16-byte store. For 16-bit T the compiler otherwise splits the
// pack into four 4-byte stores in the register-bound passes of act_lora.cu (its alignment is not
// carried through the pack's assembly), four store instructions per group instead of one.
template <typename T>
__device__ __forceinline__ void store_group_global(T* p, const float (&in)[kGroup]) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 2) {
    uint32_t w[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      w[q] = uint32_t{from_float<T>(in[2 * q]).bits} | (uint32_t{from_float<T>(in[2 * q + 1]).bits} << 16);
    }
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
    return;
  }
#endif
  store_group<T>(p, in);
}

// This thread's i-th group of 8 columns in a (kBM x kBN) step: its row m and first column c. Consecutive
// threads take consecutive groups of a row (16-byte accesses, coalesced).
struct Group {
  int m;
  int c;
};
__device__ __forceinline__ Group group_of(int i) {
  const int group = static_cast<int>(threadIdx.x) + i * kLoraThreads;
  return Group{group / (kBN / kGroup), (group % (kBN / kGroup)) * kGroup};
}

// Rows the group helpers can read: 16-byte aligned, row stride a whole number of groups.
template <typename T>
__host__ __device__ inline bool aligned_rows(const void* ptr, int64_t ld) {
  return ptr != nullptr && aligned16(ptr) && ld % (16 / static_cast<int64_t>(sizeof(T))) == 0 && ld % kGroup == 0;
}

// dst (kBM x RT, row-major) = src[(row0 + m) * ld + k * step] for row0 + m < row_end and k < R, else 0:
// a rank-sized operand's rows of one step (t_d, S, l), staged in shared memory. Where src's rows allow
// it (unit step, R a multiple of 8, 16-byte aligned rows: uniform over the block, and the case of every
// operand the wrappers allocate) whole groups of 8 ranks move with 16-byte loads and stores, one or two
// groups per thread; element by element each of the RT / 4 elements a thread stages took its own index
// math, bounds checks and 2-byte load (about 25 instructions each).
// VEC false: element by element only, inline (where the vectorised path's registers made a kernel spill).
// With VEC the 16-byte path runs a compile-time number of trips and the element-by-element fallback is a
// call (stage_rank_rows_scalar, out of line): a caller's loop holds what its usual path runs.
template <typename TA, int RT>
__device__ __forceinline__ void stage_rank_rows_by_element(TA* dst, const TA* src, int64_t ld, int64_t step,
                                                           int64_t row0, int64_t row_end, int64_t R) {
  for (int i = threadIdx.x; i < kBM * RT; i += kLoraThreads) {
    const int m = i / RT, k = i % RT;
    dst[i] = (row0 + m < row_end && k < R) ? src[(row0 + m) * ld + k * step] : from_float<TA>(0.0f);
  }
}

template <typename TA, int RT>
TRANSPEFT_NOINLINE __device__ void stage_rank_rows_scalar(TA* dst, const TA* src, int64_t ld, int64_t step,
                                                          int64_t row0, int64_t row_end, int64_t R) {
  stage_rank_rows_by_element<TA, RT>(dst, src, ld, step, row0, row_end, R);
}

template <typename TA, int RT, bool VEC = true>
__device__ __forceinline__ void stage_rank_rows(TA* dst, const TA* src, int64_t ld, int64_t step, int64_t row0,
                                                int64_t row_end, int64_t R) {
  if constexpr (!VEC) {
    stage_rank_rows_by_element<TA, RT>(dst, src, ld, step, row0, row_end, R);
  } else if (step == 1 && R % kGroup == 0 && aligned_rows<TA>(src, ld)) {
    static_assert(RT % kGroup == 0, "whole groups of ranks");
    constexpr int kGroupsPerRow = RT / kGroup;
    constexpr int kGroups = kBM * kGroupsPerRow;
    constexpr int V = 16 / sizeof(TA);  // elements per 16-byte pack, moved as they are
#pragma unroll 1
    for (int t = 0; t < (kGroups + kLoraThreads - 1) / kLoraThreads; ++t) {
      const int i = static_cast<int>(threadIdx.x) + t * kLoraThreads;
      if (kGroups % kLoraThreads != 0 && i >= kGroups) break;  // rank 16: half the threads stage
      const int m = i / kGroupsPerRow, k = (i % kGroupsPerRow) * kGroup;
      const bool in = row0 + m < row_end && k < R;
#pragma unroll
      for (int q = 0; q < kGroup; q += V) {
        Pack<TA, V> pk;
        if (in) {
          pk = load_pack<TA, V>(src + (row0 + m) * ld + k + q);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) pk.v[j] = from_float<TA>(0.0f);
        }
        store_pack<TA, V>(dst + m * RT + k + q, pk);
      }
    }
  } else {
    stage_rank_rows_scalar<TA, RT>(dst, src, ld, step, row0, row_end, R);
  }
}

// stage_columns's vectorised path alone, for a kernel whose launcher checked `vec` (act_lora.cu's
// forward): ROWS x kBN / 8 groups over the block's threads in a compile-time number of trips, so that no
// remainder loop and no element-by-element path are compiled into the kernel's column loop (the static
// SASS is then what runs, and the perf model charges the static SASS).
template <typename TS, typename TD, int ROWS>
__device__ __forceinline__ void stage_columns_vec(TD* dst, const TS* src, int64_t ld, int64_t rows, int64_t col0,
                                                  int64_t cols) {
  constexpr int kGroups = ROWS * (kBN / kGroup);
  constexpr int kTrips = (kGroups + kLoraThreads - 1) / kLoraThreads;
#pragma unroll 1  // one trip at rank 16; more trips unrolled would hold several groups' registers at once
  for (int t = 0; t < kTrips; ++t) {
    const int i = static_cast<int>(threadIdx.x) + t * kLoraThreads;
    if (kGroups % kLoraThreads != 0 && i >= kGroups) break;
    const int r = i / (kBN / kGroup), c = (i % (kBN / kGroup)) * kGroup;
    float v[kGroup];
    if (r < rows && col0 + c < cols) {
      load_group<TS>(src + r * ld + col0 + c, v);
    } else {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) v[j] = 0.0f;
    }
    store_group<TD>(dst + r * kBN + c, v);
  }
}

// stage_columns' element-by-element path, out of line (as stage_rank_rows_scalar).
template <typename TS, typename TD, int ROWS>
TRANSPEFT_NOINLINE __device__ void stage_columns_scalar(TD* dst, const TS* src, int64_t ld, int64_t step, int64_t rows,
                                                        int64_t col0, int64_t cols) {
  for (int i = threadIdx.x; i < ROWS * kBN; i += kLoraThreads) {
    const int r = i / kBN, c = i % kBN;
    dst[i] = (r < rows && col0 + c < cols) ? from_float<TD>(to_float(src[r * ld + (col0 + c) * step]))
                                           : from_float<TD>(0.0f);
  }
}

// dst (ROWS x kBN, row-major) = src[r * ld + (col0 + c) * step] for r < rows and col0 + c < cols, else 0:
// a rank-sized operand's 64 columns of one step, staged in shared memory in dtype TD. `vec` (uniform over
// the block: step == 1, cols % 8 == 0, 16-byte aligned rows with ld % 8 == 0) reads whole groups of 8
// with 16-byte loads, about 5 instructions per element instead of about 25; otherwise a call to the
// element-by-element path.
template <typename TS, typename TD, int ROWS>
__device__ __forceinline__ void stage_columns(TD* dst, const TS* src, int64_t ld, int64_t step, int64_t rows, int64_t col0,
                                              int64_t cols, bool vec) {
  if (vec) {
    stage_columns_vec<TS, TD, ROWS>(dst, src, ld, rows, col0, cols);
  } else {
    stage_columns_scalar<TS, TD, ROWS>(dst, src, ld, step, rows, col0, cols);
  }
}

// The LoRA input of one group of 8 columns of x's row `row` (columns col.. of `cols`), as floats:
// dropout_q(cast_A(x)) (fused_math.h lora_input), zeros when the group is outside (`valid` false).
// PACKED: the group loads with 16-byte loads (cols % 8 == 0, aligned rows); otherwise element by
// element, zero past `cols`.
template <typename TX, typename TA, bool PACKED>
__device__ __forceinline__ void lora_input_group(const TX* xp, bool valid, int64_t row, int64_t col, int64_t cols,
                                                 const TranspeftRandomMask& drop, uint64_t dseed,
                                                 float (&out)[kGroup]) {
  if (!valid) {
#pragma unroll
    for (int v = 0; v < kGroup; ++v) out[v] = 0.0f;
    return;
  }
  if (PACKED) {
    load_group<TX>(xp, out);
  } else {
#pragma unroll
    for (int v = 0; v < kGroup; ++v) out[v] = col + v < cols ? to_float(xp[v]) : 0.0f;
  }
  const uint32_t bits = keep_bits(drop.on, dseed, row, col, cols, drop.threshold);
#pragma unroll
  for (int v = 0; v < kGroup; ++v) out[v] = lora_input<TA>(out[v], lane_factor(drop.on, bits, v, drop.kept));
}

// The token reductions' accumulation and output (act_lora.cu's dA_d, lora_reduce.cu): warp w owns the
// NTW (16 x 16) tiles w NTW.. of the (RT, kBN) result, tile t at rows 16 (t / 4), columns 16 (t % 4).
// A warp's NTW tiles share their row of tiles (NTW divides 4), so l's fragments load once per k step.
// X_EXACT: s_x holds values of a 16-bit dtype staged as fp32 (tile_mma's B_EXACT: two mmas per k step).
template <typename TA, int RT, int NTW, bool X_EXACT = false>
__device__ __forceinline__ void reduce_step(TileAcc<TA> (&acc)[NTW], const TA* s_l, const TA* s_x) {
  static_assert((kBN / kTile) % NTW == 0, "a warp's tiles in one row of tiles");
  const int warp = threadIdx.x >> 5;
  const int tile = warp * NTW, rt = tile / (kBN / kTile), nt = tile % (kBN / kTile);
  tile_mma_row<TA, NTW, true, kBM, false, false, X_EXACT>(acc, s_l + rt * kTile, RT, s_x + nt * kTile, kBN,
                                                          kTile);  // += l^T x, l (kBM, RT)
}

// fp32 adapters over a 16-bit operand: its values, staged as fp32, are exact in tf32
template <typename T, typename TA>
constexpr bool kExactOperand = sizeof(T) == 2 && sizeof(TA) == 4;

// The dropout mask as staged for an exact operand (X_EXACT): keep selects (a factor 1 or 0, still exact in
// tf32), and the caller multiplies the finished sum by `kept` instead of each element (x * kept would not be
// exact); one fp32 rounding of the sum where the reference rounds each element.
__host__ __device__ inline TranspeftRandomMask keep_only(TranspeftRandomMask m) {
  m.kept = 1.0f;
  return m;
}

// z (kBM x kBN fp32, row-major in shared memory) = s (kBM x RT, row-major) times B (RT x kBN): warp w
// computes the two 16 x 16 tiles of row w / 2, columns 2 (w % 2) and 2 (w % 2) + 1, s's fragments loaded
// once for both. B's tile n is at b + n * b_step with leading dimension ldb (B_COL_MAJOR: b holds B^T's
// rows, as lora_expand.cu and the forward's gate/up expands stage B; else A_d's (RT, kBN) columns).
template <typename TA, int RT, bool B_COL_MAJOR>
__device__ __forceinline__ void z_step(float* z, const TA* s, const TA* b, int ldb, int b_step) {
  static_assert((kBM / kTile) * (kBN / kTile) == 2 * kLoraWarps, "two z tiles per warp");
  const int warp = threadIdx.x >> 5;
  const int mt = (2 * warp) / (kBN / kTile), nt = (2 * warp) % (kBN / kTile);
  TileAcc<TA> acc[2];
  tile_zero(acc[0]);
  tile_zero(acc[1]);
  tile_mma_row<TA, 2, false, RT, B_COL_MAJOR>(acc, s + mt * kTile * RT, RT, b + nt * b_step, ldb, b_step);
  tile_store(z + mt * kTile * kBN + nt * kTile, kBN, acc[0]);
  tile_store(z + mt * kTile * kBN + (nt + 1) * kTile, kBN, acc[1]);
}

// part[k * N + col0 + c] = scaling * result (k < R, col0 + c < N), through `stage` (RT x kBN floats of
// shared memory). Does not sync at the end: a caller that writes `stage` again syncs first.
template <typename TA, int RT, int NTW>
__device__ __forceinline__ void store_reduction(const TileAcc<TA> (&acc)[NTW], float* stage, float* part, int64_t R,
                                                int64_t N, int64_t col0, float scaling) {
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < NTW; ++j) {
    const int tile = warp * NTW + j, rt = tile / (kBN / kTile), nt = tile % (kBN / kTile);
    tile_store(stage + rt * kTile * kBN + nt * kTile, kBN, acc[j]);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < RT * kBN; i += kLoraThreads) {
    const int k = i / kBN, c = i % kBN;
    if (k < R && col0 + c < N) part[k * N + col0 + c] = scaling * stage[i];
  }
}

// Rows [row0, row0 + ROWS) of an (M, R) rank-sized result (S_d, a shrink's S) from its (ROWS, RT) fp32
// tile in shared memory, times `scale` (the dropout's, after an exact operand's sum: keep_only): into
// `part`, an fp32 partial with row stride R, when given; else into `out`, in TA with row stride ld. Rows
// past M and columns past R are not written.
template <typename TA, int ROWS, int RT>
__device__ __forceinline__ void store_rank_rows(const float* tile, int64_t row0, int64_t M, int64_t R, float* part,
                                                TA* out, int64_t ld, float scale) {
  for (int i = threadIdx.x; i < ROWS * RT; i += kLoraThreads) {
    const int m = i / RT, k = i % RT;
    if (row0 + m >= M || k >= R) continue;
    if (part != nullptr) {
      part[(row0 + m) * R + k] = tile[i] * scale;
    } else {
      out[(row0 + m) * ld + k] = from_float<TA>(tile[i] * scale);
    }
  }
}

}  // namespace cuda
}  // namespace transpeft
