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
//   with A = 0xD2511F53, B = 0xCD9E8D57.  randint4x = final (c0, c1, c2, c3), randint = c0.
//   uniform:  x = int32(c0); if (x < 0) x = ~x; u = float(x) * 4.6566127342e-10f   (u in [0, 1))
//
// Masks (reference.philox.keep_mask): one Philox call gives 8 mask elements as 16-bit lanes.
//   For a (rows, cols) mask, C8 = ceil(cols / 8). Element (i, j) reads the call at offset
//   i * C8 + j / 8, lane l = j % 8: v = (c[l / 2] >> (16 * (l % 2))) & 0xFFFF; kept iff v >= T,
//   T = round-half-to-even(p * 65536) computed on the host (keep_threshold), in [0, 65536].
//   A thread that handles the 8 columns of a group makes one call (philox_keep_bits).
//
// Offsets are 64-bit: rows * C8 passes 2^31 at realistic sizes (1.2M tokens x 14336 features).
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

// The four output words of Philox4x32-10 at (seed, offset): tl.randint4x(seed, offset).
struct PhiloxWords {
  uint32_t c[4];
};

TRANSPEFT_HD PhiloxWords philox_randint4x(uint64_t seed, uint64_t offset) {
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
  return PhiloxWords{{c0, c1, c2, c3}};
}

// c0 of Philox4x32-10 at (seed, offset): tl.randint(seed, offset).
TRANSPEFT_HD uint32_t philox_randint(uint64_t seed, uint64_t offset) { return philox_randint4x(seed, offset).c[0]; }

// Uniform float in [0, 1): tl.rand(seed, offset), to the bit.
TRANSPEFT_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  int32_t x = static_cast<int32_t>(philox_randint(seed, offset));  // two's complement view
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

constexpr int kMaskLanes = 8;  // 16-bit mask lanes per Philox call

// C8 = ceil(cols / 8): the Philox calls per mask row.
TRANSPEFT_HD uint64_t mask_groups(uint64_t cols) { return (cols + (kMaskLanes - 1)) / kMaskLanes; }

// Lane l (0..7) of a call's words: the 16-bit value (c[l / 2] >> (16 * (l % 2))) & 0xFFFF.
TRANSPEFT_HD uint32_t mask_lane(const PhiloxWords& w, int lane) {
  return (w.c[lane >> 1] >> (16 * (lane & 1))) & 0xFFFFu;
}

// The keep decisions of the 8 elements of group `group` of mask row `row` (columns 8 * group ..
// 8 * group + 7 of a mask `cols` wide): bit l set iff lane l is kept (v >= threshold). One call.
TRANSPEFT_HD uint32_t philox_keep_bits(uint64_t seed, uint64_t row, uint64_t group, uint64_t cols, uint32_t threshold) {
  const PhiloxWords w = philox_randint4x(seed, row * mask_groups(cols) + group);
  uint32_t bits = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int l = 0; l < kMaskLanes; ++l) bits |= static_cast<uint32_t>(mask_lane(w, l) >= threshold) << l;
  return bits;
}

// Whether element (row, col) of a mask `cols` wide is kept: one call for one element (for code
// that does not own the whole group of 8 columns; philox_keep_bits amortises the call).
TRANSPEFT_HD bool philox_keep(uint64_t seed, uint64_t row, uint64_t col, uint64_t cols, uint32_t threshold) {
  const PhiloxWords w = philox_randint4x(seed, row * mask_groups(cols) + col / kMaskLanes);
  return mask_lane(w, static_cast<int>(col % kMaskLanes)) >= threshold;
}

}  // namespace transpeft
