// A C entry point to transpeft/philox.h for python_tests/test_philox_host.py, which builds it with
// `g++ -O2 -shared -fPIC` and calls it through ctypes to compare against the Python reference.
#include <cstddef>
#include <cstdint>

#include "transpeft/philox.h"

extern "C" {

// out[i] = philox_randint(seed, offsets[i]) for i < n.
void transpeft_philox_randint(uint64_t seed, const uint64_t* offsets, size_t n, uint32_t* out) {
  for (size_t i = 0; i < n; ++i) out[i] = transpeft::philox_randint(seed, offsets[i]);
}

// out[i] = philox_uniform(seed, offsets[i]) for i < n.
void transpeft_philox_uniform(uint64_t seed, const uint64_t* offsets, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = transpeft::philox_uniform(seed, offsets[i]);
}

}  // extern "C"
