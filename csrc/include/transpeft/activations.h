// Gated-FFN activations and their derivatives, in float32, for host (g++) and device (nvcc).
//
// The formulas are the spec in transpeft_kernels/reference/activations.py:
//   silu(g)       = g * s,                          s = 1 / (1 + exp(-g))
//   silu'(g)      = s * (1 + g * (1 - s))
//   gelu(g)       = 0.5 * g * (1 + erf(g / sqrt(2)))
//   gelu'(g)      = 0.5 * (1 + erf(g / sqrt(2))) + g * exp(-g^2 / 2) / sqrt(2 pi)
//   gelu_tanh(g)  = 0.5 * g * (1 + t),              t = tanh(c * (g + 0.044715 g^3)), c = sqrt(2 / pi)
//   gelu_tanh'(g) = 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * c * (1 + 3 * 0.044715 g^2)
// csrc/tests/test_activations.cpp checks them against float64 values from csrc/tests/gen_vectors.py.
#pragma once

#include <math.h>  // expf / erff / tanhf: the float overloads on host, the CUDA math functions on device
#include <stdint.h>

#include "hd.h"

namespace transpeft {

// Values are part of the interface: a C entry point receives the activation as this integer.
enum class Activation : int32_t { kSilu = 0, kGelu = 1, kGeluTanh = 2 };

namespace detail {
constexpr float kInvSqrt2 = 0.70710678118654752f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhCubic = 0.044715f;
}  // namespace detail

TRANSPEFT_HD float silu(float g) {
  const float s = 1.0f / (1.0f + expf(-g));
  return g * s;
}

TRANSPEFT_HD float silu_grad(float g) {
  const float s = 1.0f / (1.0f + expf(-g));
  return s * (1.0f + g * (1.0f - s));
}

TRANSPEFT_HD float gelu(float g) {
  return 0.5f * g * (1.0f + erff(g * detail::kInvSqrt2));
}

TRANSPEFT_HD float gelu_grad(float g) {
  return 0.5f * (1.0f + erff(g * detail::kInvSqrt2)) + g * expf(-0.5f * g * g) * detail::kInvSqrt2Pi;
}

TRANSPEFT_HD float gelu_tanh(float g) {
  const float t = tanhf(detail::kSqrt2OverPi * (g + detail::kTanhCubic * g * g * g));
  return 0.5f * g * (1.0f + t);
}

TRANSPEFT_HD float gelu_tanh_grad(float g) {
  const float g2 = g * g;
  const float t = tanhf(detail::kSqrt2OverPi * (g + detail::kTanhCubic * g2 * g));
  return 0.5f * (1.0f + t) +
         0.5f * g * (1.0f - t * t) * detail::kSqrt2OverPi * (1.0f + 3.0f * detail::kTanhCubic * g2);
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
