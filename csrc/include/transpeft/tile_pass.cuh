// The block shape and element-group helpers shared by the tensor-core passes over (rows, columns)
// tiles (csrc/kernels/act_lora.cu, lora_reduce.cu): 4-warp blocks, 32-row steps, 64-column tiles,
// columns in groups of 8 (one Philox call per group and mask, 16-byte loads and stores). nvcc, or g++
// with the emulation's stand-in for cuda_runtime.h.
#pragma once

#include <stdint.h>

#include "cuda_common.cuh"
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

// dst (ROWS x kBN, row-major) = src[r * ld + (col0 + c) * step] for r < rows and col0 + c < cols, else 0:
// a rank-sized operand's 64 columns of one step, staged in shared memory in dtype TD. `vec` (uniform over
// the block: step == 1, cols % 8 == 0, 16-byte aligned rows with ld % 8 == 0) reads whole groups of 8
// with 16-byte loads, about 5 instructions per element instead of about 25.
template <typename TS, typename TD, int ROWS>
__device__ __forceinline__ void stage_columns(TD* dst, const TS* src, int64_t ld, int64_t step, int64_t rows, int64_t col0,
                                              int64_t cols, bool vec) {
  if (vec) {
    for (int i = threadIdx.x; i < ROWS * (kBN / kGroup); i += kLoraThreads) {
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
  } else {
    for (int i = threadIdx.x; i < ROWS * kBN; i += kLoraThreads) {
      const int r = i / kBN, c = i % kBN;
      dst[i] = (r < rows && col0 + c < cols) ? from_float<TD>(to_float(src[r * ld + (col0 + c) * step]))
                                             : from_float<TD>(0.0f);
    }
  }
}

// Rows the group helpers can read: 16-byte aligned, row stride a whole number of groups.
template <typename T>
__host__ __device__ inline bool aligned_rows(const void* ptr, int64_t ld) {
  return ptr != nullptr && aligned16(ptr) && ld % (16 / static_cast<int64_t>(sizeof(T))) == 0 && ld % kGroup == 0;
}

}  // namespace cuda
}  // namespace transpeft
