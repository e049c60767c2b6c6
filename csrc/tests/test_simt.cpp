// The emulation's stand-in for the CUDA runtime (csrc/emulation/simt/cuda_runtime.h), on its own:
// shared memory and __syncthreads across a block's fibers, warp shuffles, the launch grid, threads
// that exit before a barrier, the block reduction the kernels use, and a kernel whose barriers can never
// complete, which must end with cudaErrorLaunchFailure instead of hanging.
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#include "transpeft/cuda_common.cuh"

namespace {

int g_failures = 0;

void check(bool ok, const char* what) {
  if (!ok && ++g_failures <= 20) std::printf("FAIL %s\n", what);
}

struct Args {
  int* out;
  int n;
};

// out[block * n + t] = what thread t + 1 (mod n) of the block wrote to shared memory before the barrier.
__global__ void rotate_kernel(Args a) {
  __shared__ int s[1024];
  const int t = threadIdx.x;
  s[t] = static_cast<int>(blockIdx.x) * 1000 + t;
  __syncthreads();
  a.out[blockIdx.x * a.n + t] = s[(t + 1) % a.n];
}

// out[t] = the sum over the thread's warp of (lane + 1), by xor shuffles.
__global__ void warp_sum_kernel(Args a) {
  int v = static_cast<int>(threadIdx.x % 32) + 1;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  a.out[threadIdx.x] = v;
}

// Threads past n exit at once; the rest still meet at the barrier.
__global__ void early_exit_kernel(Args a) {
  __shared__ int s[1024];
  if (static_cast<int>(threadIdx.x) >= a.n) return;
  s[threadIdx.x] = 1;
  __syncthreads();
  int total = 0;
  for (int i = 0; i < a.n; ++i) total += s[i];
  a.out[threadIdx.x] = total;
}

// block_sum_to_thread (cuda_common.cuh) over 256 threads: thread n < 4 gets the sum of acc[n].
__global__ void block_sum_kernel(Args a) {
  __shared__ float smem[transpeft::cuda::kWarps * 4];
  float acc[4] = {1.0f, static_cast<float>(threadIdx.x), 2.0f, 0.5f};
  const float total = transpeft::cuda::block_sum_to_thread<4>(acc, smem);
  if (threadIdx.x < 4) a.out[threadIdx.x] = static_cast<int>(total);
}

// The even threads wait for the block at __syncthreads, the odd ones for their warp (even lanes
// included) at __syncwarp: neither barrier can complete.
__global__ void deadlock_kernel(Args a) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  a.out[threadIdx.x] = 1;
}

}  // namespace

int main() {
  using transpeft::cuda::launch_kernel;
  std::vector<int> out(4 * 96, -1);
  check(launch_kernel(rotate_kernel, dim3(4), 96, nullptr, Args{out.data(), 96}) == cudaSuccess, "rotate launch");
  for (int b = 0; b < 4; ++b)
    for (int t = 0; t < 96; ++t) check(out[b * 96 + t] == b * 1000 + (t + 1) % 96, "rotate value");
  check(launch_kernel(warp_sum_kernel, dim3(1), 64, nullptr, Args{out.data(), 64}) == cudaSuccess, "warp launch");
  for (int t = 0; t < 64; ++t) check(out[t] == 32 * 33 / 2, "warp sum");
  check(launch_kernel(early_exit_kernel, dim3(1), 128, nullptr, Args{out.data(), 40}) == cudaSuccess, "exit launch");
  for (int t = 0; t < 40; ++t) check(out[t] == 40, "early exit");
  check(launch_kernel(block_sum_kernel, dim3(1), transpeft::cuda::kThreads, nullptr, Args{out.data(), 0}) == cudaSuccess,
        "block sum launch");
  const int n = transpeft::cuda::kThreads;
  check(out[0] == n && out[1] == n * (n - 1) / 2 && out[2] == 2 * n && out[3] == n / 2, "block sum");
  check(launch_kernel(rotate_kernel, dim3(1), 2048, nullptr, Args{out.data(), 2048}) == cudaErrorInvalidConfiguration,
        "a block of more than 1024 threads is refused");
  check(launch_kernel(deadlock_kernel, dim3(1), 64, nullptr, Args{out.data(), 64}) == cudaErrorLaunchFailure,
        "a deadlocked launch ends with cudaErrorLaunchFailure");
  check(launch_kernel(warp_sum_kernel, dim3(1), 32, nullptr, Args{out.data(), 32}) == cudaSuccess && out[0] == 528,
        "the next launch after a deadlock runs");
  if (g_failures) std::printf("%d failures\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
