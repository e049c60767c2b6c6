// Storage types of the kernels' tensors (float32, float16, bfloat16) and their float32 conversions,
// for host (g++) and device (nvcc).
//
// The 16-bit types are plain bit containers so that the same per-element code compiles on the host,
// where the C++ tests and the CPU emulation library (csrc/emulation) run it, without cuda_fp16.h.
// Conversions round to nearest even, as torch's .to(dtype) does; on the device they use the
// hardware instructions, on the host a bit-exact software version (checked by test_dtypes.cpp).
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "hd.h"

namespace transpeft {

// Values are part of the C interface (capi.h) and match the Triton backend's dtype codes.
enum class DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

namespace detail {

TRANSPEFT_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

TRANSPEFT_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// float -> IEEE binary16 bits, round to nearest even (overflow -> inf, NaN stays NaN).
TRANSPEFT_HD uint16_t f32_to_f16_bits_soft(float f) {
  uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return static_cast<uint16_t>(sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (x >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (x < 0x38800000u) {                                                 // below 2^-14: subnormal or zero
    const int shift = 126 - static_cast<int>(x >> 23);
    if (shift > 24) return static_cast<uint16_t>(sign);
    const uint32_t mant = (x & 0x7FFFFFu) | 0x800000u;
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = (x - 0x38000000u) >> 13;  // rebias 127 -> 15
  const uint32_t rem = x & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

TRANSPEFT_HD float f16_bits_to_f32_soft(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return bits_f32(f32_bits(v) | sign);
  }
  if (e == 31) return bits_f32(sign | 0x7F800000u | (m << 13));
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

TRANSPEFT_HD uint16_t f32_to_bf16_bits_soft(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace detail

TRANSPEFT_HD float to_float(float v) { return v; }

TRANSPEFT_HD float to_float(half_t v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  return detail::f16_bits_to_f32_soft(v.bits);
#endif
}

TRANSPEFT_HD float to_float(bf16_t v) { return detail::bits_f32(static_cast<uint32_t>(v.bits) << 16); }

template <typename T>
TRANSPEFT_HD T from_float(float v);

template <>
TRANSPEFT_HD float from_float<float>(float v) {
  return v;
}

template <>
TRANSPEFT_HD half_t from_float<half_t>(float v) {
#if defined(__CUDA_ARCH__)
  return half_t{__half_as_ushort(__float2half_rn(v))};
#else
  return half_t{detail::f32_to_f16_bits_soft(v)};
#endif
}

template <>
TRANSPEFT_HD bf16_t from_float<bf16_t>(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(v))};
#else
  return bf16_t{detail::f32_to_bf16_bits_soft(v)};
#endif
}

// v rounded to T and back: how the reference's intermediate results in T's dtype look in float32.
template <typename T>
TRANSPEFT_HD float round_as(float v) {
  return to_float(from_float<T>(v));
}

}  // namespace transpeft
