// Gated-FFN activations and their derivatives, in float32, for host (g++) and device (nvcc).
//
// The formulas are the spec in transpeft_kernels/reference/activations.py:
//   silu(g)       = g * s,                          s = 1 / (1 + exp(-g))
//   silu'(g)      = s * (1 + g * (1 - s))
//   gelu(g)       = 0.5 * g * (1 + erf(g / sqrt(2)))
//   gelu'(g)      = 0.5 * (1 + erf(g / sqrt(2))) + g * exp(-g^2 / 2) / sqrt(2 pi)
//   gelu_tanh(g)  = 0.5 * g * (1 + t),              t = tanh(c * (g + 0.044715 g^3)), c = sqrt(2 / pi)
//   gelu_tanh'(g) = 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * c * (1 + 3 * 0.044715 g^2)
// computed as in the Triton kernels (kernels/triton/activations.py): the tanh form through the same
// sigmoid, tanh(z) = 2 sigmoid(2z) - 1, so that with s = sigmoid(2 c (g + 0.044715 g^3))
//   gelu_tanh(g) = g s,   gelu_tanh'(g) = s (1 + 2 c g (1 + 3 * 0.044715 g^2) (1 - s)),
// and the sigmoid as 1 / (1 + 2^(-z log2 e)) on the device's MUFU unit (ex2.approx.ftz, rcp.approx.ftz:
// <= 2 ulp each, 4 instructions in all). expf and an IEEE division cost about 25 instructions per
// sigmoid, with a slow path; tanhf more. For z < -88 the power overflows to +inf and the sigmoid is 0,
// within 2^-126 of the true value. Host builds compute the same formulas with exp2f and a division.
// csrc/tests/test_activations.cpp checks them against float64 values from csrc/tests/gen_vectors.py.
#pragma once

#include <math.h>  // expf / erff / exp2f: the float overloads on host, the CUDA math functions on device
#include <stdint.h>

#include "hd.h"

namespace transpeft {

// Values are part of the interface: a C entry point receives the activation as this integer.
enum class Activation : int32_t { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

namespace detail {
constexpr float kInvSqrt2 = 0.70710678118654752f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 pi)
constexpr float kLog2E = 1.4426950408889634f;
constexpr float kTwoSqrt2OverPi = 1.5957691216057308f;         // 2 c, c = sqrt(2 / pi)
constexpr float kTwoSqrt2OverPiCubic = 0.07135481627260025f;   // 2 c * 0.044715
constexpr float kTwoSqrt2OverPiCubic3 = 0.21406444881780073f;  // 2 c * 3 * 0.044715

// 2^x with subnormal results flushed to zero.
TRANSPEFT_HD float exp2_ftz(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

TRANSPEFT_HD float rcp_ftz(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.0f / x;
#endif
}

TRANSPEFT_HD float sigmoid(float z) { return rcp_ftz(1.0f + exp2_ftz(z * -kLog2E)); }

// sigmoid(2 c (g + 0.044715 g^3)) = (1 + tanh(c (g + 0.044715 g^3))) / 2
TRANSPEFT_HD float gelu_tanh_sigmoid(float g) {
  return sigmoid(g * (kTwoSqrt2OverPi + kTwoSqrt2OverPiCubic * (g * g)));
}
}  // namespace detail

TRANSPEFT_HD float silu(float g) { return g * detail::sigmoid(g); }

TRANSPEFT_HD float silu_grad(float g) {
  const float s = detail::sigmoid(g);
  return s * (1.0f + g * (1.0f - s));
}

TRANSPEFT_HD float gelu(float g) {
  return 0.5f * g * (1.0f + erff(g * detail::kInvSqrt2));
}

TRANSPEFT_HD float gelu_grad(float g) {
  return 0.5f * (1.0f + erff(g * detail::kInvSqrt2)) + g * expf(-0.5f * g * g) * detail::kInvSqrt2Pi;
}

TRANSPEFT_HD float gelu_tanh(float g) { return g * detail::gelu_tanh_sigmoid(g); }

TRANSPEFT_HD float gelu_tanh_grad(float g) {
  const float s = detail::gelu_tanh_sigmoid(g);
  // s (1 - s) applied to g before the cubic factor: for large |g| it is exactly 0, and 0 * g stays 0 where
  // 2 c g (1 + 3 * 0.044715 g^2) would overflow (|g| > 1.2e13; inf * 0 = NaN). Finite while g^2 is.
  return s + ((s * (1.0f - s)) * g) * (detail::kTwoSqrt2OverPi + detail::kTwoSqrt2OverPiCubic3 * (g * g));
}

// act(g); NaN for an activation value outside the enum.
TRANSPEFT_HD float act(Activation a, float g) {
  switch (a) {
    case Activation::kSilu: return silu(g);
    case Activation::kGelu: return gelu(g);
    case Activation::kGeluTanh: return gelu_tanh(g);
  }
  return NAN;
}

// act'(g); NaN for an activation value outside the enum.
TRANSPEFT_HD float act_grad(Activation a, float g) {
  switch (a) {
    case Activation::kSilu: return silu_grad(g);
    case Activation::kGelu: return gelu_grad(g);
    case Activation::kGeluTanh: return gelu_tanh_grad(g);
  }
  return NAN;
}

}  // namespace transpeft
