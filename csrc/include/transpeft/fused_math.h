// Per-element math of the CUDA kernels, shared with the host builds (C++ tests, CPU emulation).
//
// Each function reproduces how the reference (transpeft_kernels/reference, ops/torch_backend.py)
// rounds its intermediate results, so that a kernel differs from it only by the order of fp32 sums:
//   masked activation   h' = T( T( T(act(g)) * u ) * m )           m = keep * c (c rounded to T), or 1
//   its gradients       dg = dh m u act'(g),  du = dh m act(g)       in float32
//   LoRA input          xd = TA( TA(x) * d )                          d = keep * 1/(1-q) (rounded to TA), or 1
//   LoRA forward term   y' = T( y + TA( TA(z) * s ) )                z = fp32 sum_r S B^T
//   LoRA grad term      dx = T( dx + T( TA( TA( TA(z) * s ) * d ) ) ) z = fp32 sum_r t A
// T: the activation / base dtype; TA: the adapter dtype; T(v): v rounded to T (transpeft/dtypes.h).
#pragma once

#include <stdint.h>

#include "activations.h"
#include "dtypes.h"
#include "philox.h"

namespace transpeft {

// Element (row, col) of a mask `cols` wide that keeps lane values >= threshold (philox.h):
// kept or 0; 1 when the mask is off. One Philox call per element: for code that handles single
// columns. Code that handles a pack of columns within one group of 8 uses keep_bits + lane_factor.
TRANSPEFT_HD float keep_factor(bool on, uint64_t seed, uint64_t row, uint64_t col, uint64_t cols, uint32_t threshold,
                               float kept) {
  if (!on) return 1.0f;
  return philox_keep(seed, row, col, cols, threshold) ? kept : 0.0f;
}

// The keep bits (bit l: lane l) of the group of 8 columns holding column `col`; 0xFF when off.
TRANSPEFT_HD uint32_t keep_bits(bool on, uint64_t seed, uint64_t row, uint64_t col, uint64_t cols, uint32_t threshold) {
  if (!on) return 0xFFu;
  return philox_keep_bits(seed, row, col / kMaskLanes, cols, threshold);
}

// The factor of lane `lane` (= col % 8) from its group's keep bits: kept or 0; 1 when the mask is off.
// With a compile-time lane (a thread owning whole groups) the bit test folds into the lane's compare.
TRANSPEFT_HD float lane_factor(bool on, uint32_t bits, int lane, float kept) {
  if (!on) return 1.0f;
  return ((bits >> lane) & 1u) ? kept : 0.0f;
}

template <typename T>
TRANSPEFT_HD float masked_gated_act_value(Activation a, float g, float u, float m) {
  const float h = round_as<T>(round_as<T>(act(a, g)) * u);
  return round_as<T>(h * m);  // a multiply, not a select: 0 * inf stays NaN, as in the reference
}

struct GatedGrads {
  float dg;
  float du;
};

TRANSPEFT_HD GatedGrads masked_gated_act_grads(Activation a, float dh, float g, float u, float m) {
  const float dhm = dh * m;
  return GatedGrads{dhm * u * act_grad(a, g), dhm * act(a, g)};
}

template <typename TA>
TRANSPEFT_HD float lora_input(float x, float d) {
  return round_as<TA>(round_as<TA>(x) * d);
}

template <typename T, typename TA>
TRANSPEFT_HD float lora_forward_sum(float y, float z, float s) {
  return round_as<T>(y + round_as<TA>(round_as<TA>(z) * s));
}

template <typename T, typename TA>
TRANSPEFT_HD float lora_grad_sum(float dx, float z, float s, float d) {
  const float term = round_as<TA>(round_as<TA>(round_as<TA>(z) * s) * d);
  return round_as<T>(dx + round_as<T>(term));
}

}  // namespace transpeft
