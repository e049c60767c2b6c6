// Device-side pieces shared by csrc/kernels/*.cu: dtype dispatch, 16-byte packs, the block
// reduction of the rank-sized LoRA sums, launch sizing and the launch itself. nvcc, or g++ with the
// host stand-in for cuda_runtime.h (csrc/emulation/simt), which runs the same kernels on the CPU.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "dtypes.h"

namespace transpeft {
namespace cuda {

// A device function kept out of line: the rare fallback paths of the staging helpers, so that the loops
// that call them hold one call instead of its body (their static SASS is then what the usual path runs).
#if defined(TRANSPEFT_SIMT_EMULATION)
#define TRANSPEFT_NOINLINE __attribute__((noinline))
#else
#define TRANSPEFT_NOINLINE __noinline__
#endif

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride beyond this

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) for the storage type of a dtype code; cudaErrorInvalidValue for an unknown code.
template <typename F>
cudaError_t with_dtype(int32_t code, F&& f) {
  switch (code) {
    case 0: return f(Tag<float>{});
    case 1: return f(Tag<half_t>{});
    case 2: return f(Tag<bf16_t>{});
  }
  return cudaErrorInvalidValue;
}

// VEC consecutive elements as one aligned load/store (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

__device__ __forceinline__ uint64_t load_seed(const int64_t* seed, int32_t on) {
  return on ? static_cast<uint64_t>(__ldg(seed)) : 0u;
}

// Sums acc[N] over the block (fixed order: warp shuffles, then warps in index order) and gives
// thread n < N the total of acc[n]. `smem` holds kWarps * N floats. Ends with the block synced.
template <int N>
__device__ __forceinline__ float block_sum_to_thread(float (&acc)[N], float* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    float v = acc[n];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
    if (lane == 0) smem[warp * N + n] = v;
  }
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x < N) {
    for (int w = 0; w < kWarps; ++w) total += smem[w * N + threadIdx.x];
  }
  __syncthreads();
  return total;
}

inline unsigned grid_for(int64_t units) {
  const int64_t n = units < 1 ? 1 : (units > kMaxBlocks ? kMaxBlocks : units);
  return static_cast<unsigned>(n);
}

// kernel<<<grid, threads, 0, stream>>>(args), or its run on the CPU in the emulation build.
template <typename Args>
inline cudaError_t launch_kernel(void (*kernel)(Args), dim3 grid, int threads, cudaStream_t stream,
                                 const Args& args) {
#if defined(TRANSPEFT_SIMT_EMULATION)
  (void)stream;
  return simt::launch(kernel, grid, dim3(threads), args);
#else
  kernel<<<grid, threads, 0, stream>>>(args);
  return cudaGetLastError();
#endif
}

__host__ __device__ inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline cudaStream_t as_stream(uint64_t s) { return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(s)); }

}  // namespace cuda
}  // namespace transpeft
