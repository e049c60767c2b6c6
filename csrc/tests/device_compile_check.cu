// Compile-only check: instantiates the host/device headers in a __global__ kernel so that nvcc
// compiles them for the real GPUs (the CMake target builds it for sm_80 and sm_90a). It is
// never launched by the tests; there is no GPU on the build machines.
#include <cstdint>

#include "transpeft/activations.h"
#include "transpeft/philox.h"

namespace transpeft_test {

// out[4 * i + 0..3] = keep bits of group start + i of mask row 0 (as a float), uniform, act(g), act'(g)
// for g = (start + i) * 1e-3.
__global__ void device_compile_check_kernel(uint64_t seed, uint64_t start, int64_t n, uint32_t threshold,
                                            int32_t activation, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint64_t offset = start + static_cast<uint64_t>(i);
  const auto a = static_cast<transpeft::Activation>(activation);
  const float g = static_cast<float>(static_cast<int64_t>(offset)) * 1e-3f;
  out[4 * i + 0] = static_cast<float>(transpeft::philox_keep_bits(seed, 0, offset, 8 * n, threshold)) +
                   (transpeft::philox_keep(seed, 0, 8 * offset, 8 * n, threshold) ? 256.0f : 0.0f);
  out[4 * i + 1] = transpeft::philox_uniform(seed, offset);
  out[4 * i + 2] = transpeft::act(a, g);
  out[4 * i + 3] = transpeft::act_grad(a, g);
}

}  // namespace transpeft_test
