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

// out[4 * i + k] = word k of philox_randint4x(seed, offsets[i]) for i < n.
void transpeft_philox_randint4x(uint64_t seed, const uint64_t* offsets, size_t n, uint32_t* out) {
  for (size_t i = 0; i < n; ++i) {
    const transpeft::PhiloxWords w = transpeft::philox_randint4x(seed, offsets[i]);
    for (int k = 0; k < 4; ++k) out[4 * i + k] = w.c[k];
  }
}

// out[i * cols + j] = whether element (i, j) of a (rows, cols) mask with `threshold` is kept: the
// 8-lane path (philox_keep_bits) for whole groups, the one-element path (philox_keep) for the rest.
void transpeft_philox_keep_mask(uint64_t seed, uint64_t rows, uint64_t cols, uint32_t threshold, uint8_t* out) {
  for (uint64_t i = 0; i < rows; ++i) {
    uint64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      const uint32_t bits = transpeft::philox_keep_bits(seed, i, j / 8, cols, threshold);
      for (int l = 0; l < 8; ++l) out[i * cols + j + l] = (bits >> l) & 1u;
    }
    for (; j < cols; ++j) out[i * cols + j] = transpeft::philox_keep(seed, i, j, cols, threshold) ? 1 : 0;
  }
}

// out[i] = philox_uniform(seed, offsets[i]) for i < n.
void transpeft_philox_uniform(uint64_t seed, const uint64_t* offsets, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = transpeft::philox_uniform(seed, offsets[i]);
}

}  // extern "C"
