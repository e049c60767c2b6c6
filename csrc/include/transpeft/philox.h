// Counter-based Philox4x32-10: the random stream behind every mask this package draws
// (the knowledge mask and the LoRA dropout masks).
//
// This MUST stay bit-identical to transpeft_kernels/reference/philox.py and to Triton's
// tl.randint / tl.rand, so that every backend draws the same mask for the same (seed, offset).
// csrc/tests/test_philox.cpp and python_tests/test_philox_host.py check it against the reference.
//
// Recipe (all arithmetic mod 2^32):
//   key:      k0 = low 32 bits of seed, k1 = high 32 bits of seed        (seed as uint64)
//   counter:  c0 = low 32 bits of offset, c1 = high 32 bits, c2 = c3 = 0  (offset as 64-bit)
//   10 rounds of
//     c0, c1, c2, c3 = hi(B*c2) ^ c1 ^ k0, lo(B*c2), hi(A*c0) ^ c3 ^ k1, lo(A*c0)
//     k0 += 0x9E3779B9; k1 += 0xBB67AE85
//   with A = 0xD2511F53, B = 0xCD9E8D57.  randint = final c0.
//   uniform:  x = int32(c0); if (x < 0) x = ~x; u = float(x) * 4.6566127342e-10f   (u in [0, 1))
//   keep:     u >= p   (p as float32)
//
// Offsets are 64-bit: rows * cols passes 2^31 at realistic sizes (160k tokens x 14336 features).
// Known answer (Random123): seed 0, offset 0 -> randint 0x6627e8d5.
//
// Usable from g++ (host only) and nvcc (host and device).
#pragma once

#include <cstdint>

#include "hd.h"

namespace transpeft {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

namespace detail {

// High 32 bits of the 64-bit product a * b.
TRANSPEFT_HD uint32_t philox_umulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

}  // namespace detail

// c0 of Philox4x32-10 at (seed, offset): tl.randint(seed, offset).
TRANSPEFT_HD uint32_t philox_randint(uint64_t seed, uint64_t offset) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0u;
  uint32_t c3 = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t hi_b = detail::philox_umulhi(kPhiloxRoundB, c2);
    const uint32_t lo_b = kPhiloxRoundB * c2;
    const uint32_t hi_a = detail::philox_umulhi(kPhiloxRoundA, c0);
    const uint32_t lo_a = kPhiloxRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// Uniform float in [0, 1): tl.rand(seed, offset), to the bit.
TRANSPEFT_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  int32_t x = static_cast<int32_t>(philox_randint(seed, offset));  // two's complement view
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Whether the element at `offset` is kept by a mask that drops with probability p.
TRANSPEFT_HD bool philox_keep(uint64_t seed, uint64_t offset, float p) {
  return philox_uniform(seed, offset) >= p;
}

}  // namespace transpeft
