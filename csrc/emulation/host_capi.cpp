// The C interface of transpeft/capi.h implemented with host loops over the same per-element math
// (transpeft/fused_math.h) as the CUDA kernels, built with g++ into libtranspeft_cuda_emulation.so.
//
// It exists for CPU-only machines: with TRANSPEFT_CUDA_EMULATE=1 the "cuda" backend runs CPU
// tensors through this library, so the binding (pointers, strides, dtype codes, which kernel gets
// which mask and scale) and the fused formulas are tested against the reference without a GPU. It
// does not exercise the device code paths (packs, block reductions, launch sizes): the GPU tests do.
// Pointers are host pointers, `stream` is ignored, and the error codes are cudaError_t values.
#include <stdint.h>

#include "transpeft/capi.h"
#include "transpeft/capi_layout.h"
#include "transpeft/fused_math.h"

namespace {

using namespace transpeft;

constexpr int kSuccess = 0;
constexpr int kInvalidValue = 1;  // cudaErrorInvalidValue

struct Mask {
  bool on;
  uint64_t seed;
  uint32_t threshold;
  float kept;
  // Element (i, j) of a mask `cols` wide, through the helpers the packed device path uses (the 8 keep
  // bits of j's group, then j's lane); one Philox call per element: the emulation favours clarity.
  float at(int64_t i, int64_t j, int64_t cols) const {
    const uint32_t bits = keep_bits(on, seed, static_cast<uint64_t>(i), static_cast<uint64_t>(j),
                                    static_cast<uint64_t>(cols), threshold);
    return lane_factor(on, bits, static_cast<int>(j % kMaskLanes), kept);
  }
};

Mask make_mask(const TranspeftRandomMask& m) {
  return Mask{m.on != 0, m.on ? static_cast<uint64_t>(*m.seed) : 0u, m.threshold, m.kept};
}

template <typename T>
float ld(const void* p, int64_t i) {
  return to_float(static_cast<const T*>(p)[i]);
}

template <typename T>
void st(void* p, int64_t i, float v) {
  static_cast<T*>(p)[i] = from_float<T>(v);
}

template <typename F>
int with_dtype(int32_t code, F&& f) {
  switch (code) {
    case 0: return f(float{});
    case 1: return f(half_t{});
    case 2: return f(bf16_t{});
  }
  return kInvalidValue;
}

template <typename F>
int with_dtypes(int32_t c1, int32_t c2, F&& f) {
  return with_dtype(c1, [&](auto a) { return with_dtype(c2, [&](auto b) { return f(a, b); }); });
}

bool adapter_ok(int32_t a_dtype, int32_t dtype) { return a_dtype == 0 || a_dtype == dtype; }

}  // namespace

extern "C" int transpeft_cuda_abi_version(void) { return TRANSPEFT_CUDA_ABI_VERSION; }

extern "C" int64_t transpeft_cuda_struct_size(const char* name) {
  return transpeft::abi::layout_value(name, nullptr);
}

extern "C" int64_t transpeft_cuda_field_offset(const char* name, const char* field) {
  return field == nullptr ? -1 : transpeft::abi::layout_value(name, field);
}

extern "C" const char* transpeft_cuda_error_string(int error) {
  return error == kSuccess ? "no error" : error == kInvalidValue ? "invalid argument" : "unknown error";
}

extern "C" int transpeft_masked_gated_act_fwd(const TranspeftActFwdArgs* args, uint64_t) {
  if (args == nullptr) return kInvalidValue;
  const TranspeftActFwdArgs& p = *args;
  const int64_t M = p.M, I = p.I, rank = p.rank;
  if (M < 0 || I < 0 || p.activation < 0 || p.activation > 2) return kInvalidValue;
  if (M == 0) return kSuccess;
  if (p.a != nullptr && (rank < 1 || rank > 64 || p.s == nullptr || !adapter_ok(p.a_dtype, p.dtype))) {
    return kInvalidValue;
  }
  const Activation act = static_cast<Activation>(p.activation);
  const Mask mask = make_mask(p.mask);
  const Mask drop = p.a != nullptr ? make_mask(p.drop) : Mask{false, 0, 0u, 1};
  return with_dtypes(p.dtype, p.a != nullptr ? p.a_dtype : p.dtype, [&](auto tt, auto ta) {
    using T = decltype(tt);
    using TA = decltype(ta);
    float acc[64];
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t k = 0; k < rank; ++k) acc[k] = 0.0f;
      for (int64_t j = 0; j < I; ++j) {
        const float hv = masked_gated_act_value<T>(act, ld<T>(p.g, i * p.ldg + j), ld<T>(p.u, i * p.ldu + j),
                                                   mask.at(i, j, I));
        st<T>(p.h, i * p.ldh + j, hv);
        if (p.a != nullptr) {
          const float xd = lora_input<TA>(hv, drop.at(i, j, I));
          for (int64_t k = 0; k < rank; ++k) acc[k] += xd * ld<TA>(p.a, k * p.lda + j);
        }
      }
      if (p.a != nullptr) {
        for (int64_t k = 0; k < rank; ++k) st<TA>(p.s, i * p.lds + k, acc[k]);
      }
    }
    return kSuccess;
  });
}

extern "C" int transpeft_masked_gated_act_bwd(const TranspeftActBwdArgs* args, uint64_t) {
  if (args == nullptr) return kInvalidValue;
  const TranspeftActBwdArgs& p = *args;
  const int64_t M = p.M, I = p.I, rank = p.rank;
  if (M < 0 || I < 0 || p.activation < 0 || p.activation > 2) return kInvalidValue;
  if (M == 0 || I == 0) return kSuccess;
  if (p.t != nullptr && (p.a == nullptr || rank < 1 || rank > 64)) return kInvalidValue;
  const bool has_a = p.t != nullptr || p.xd_out != nullptr;
  if (has_a && !adapter_ok(p.a_dtype, p.dtype)) return kInvalidValue;
  const Activation act = static_cast<Activation>(p.activation);
  const Mask mask = make_mask(p.mask);
  const Mask drop = make_mask(p.drop);
  return with_dtypes(p.dtype, has_a ? p.a_dtype : p.dtype, [&](auto tt, auto ta) {
    using T = decltype(tt);
    using TA = decltype(ta);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < I; ++j) {
        const float m = mask.at(i, j, I);
        const float d = drop.at(i, j, I);
        const float gv = ld<T>(p.g, i * p.ldg + j);
        const float uv = ld<T>(p.u, i * p.ldu + j);
        float dh = ld<T>(p.dh, i * p.lddh + j);
        if (p.t != nullptr) {
          float z = 0.0f;
          for (int64_t k = 0; k < rank; ++k) z += ld<TA>(p.t, i * p.ldt + k) * ld<TA>(p.a, k * p.lda + j);
          dh = lora_grad_sum<T, TA>(dh, z, p.scaling, d);
        }
        const GatedGrads gr = masked_gated_act_grads(act, dh, gv, uv, m);
        st<T>(p.dg, i * p.lddg + j, gr.dg);
        st<T>(p.du, i * p.lddu + j, gr.du);
        if (p.h_out != nullptr || p.xd_out != nullptr) {
          const float hv = masked_gated_act_value<T>(act, gv, uv, m);
          if (p.h_out != nullptr) st<T>(p.h_out, i * p.ldh_out + j, hv);
          if (p.xd_out != nullptr) st<TA>(p.xd_out, i * p.ldxd + j, lora_input<TA>(hv, d));
        }
      }
    }
    return kSuccess;
  });
}

extern "C" int transpeft_lora_shrink(const TranspeftLoraShrinkArgs* args, uint64_t) {
  if (args == nullptr) return kInvalidValue;
  const TranspeftLoraShrinkArgs& p = *args;
  if (p.M < 0 || p.K < 0 || p.R < 0) return kInvalidValue;
  if (p.M == 0 || p.R == 0) return kSuccess;
  const Mask drop = make_mask(p.drop);
  return with_dtypes(p.x_dtype, p.a_dtype, [&](auto tx, auto ta) {
    using TX = decltype(tx);
    using TA = decltype(ta);
    for (int64_t i = 0; i < p.M; ++i) {
      for (int64_t r = 0; r < p.R; ++r) {
        float acc = 0.0f;
        for (int64_t k = 0; k < p.K; ++k) {
          acc += lora_input<TA>(ld<TX>(p.x, i * p.sxm + k * p.sxk), drop.at(i, k, p.K)) * ld<TA>(p.a, r * p.sar + k * p.sak);
        }
        st<TA>(p.s, i * p.lds + r, acc);
      }
    }
    return kSuccess;
  });
}

extern "C" int transpeft_lora_expand(const TranspeftLoraExpandArgs* args, uint64_t) {
  if (args == nullptr) return kInvalidValue;
  const TranspeftLoraExpandArgs& p = *args;
  if (p.M < 0 || p.N < 0 || p.R < 0) return kInvalidValue;
  if (p.M == 0 || p.N == 0) return kSuccess;
  const Mask drop = make_mask(p.drop);
  return with_dtypes(p.y_dtype, p.lora_dtype, [&](auto ty, auto tl) {
    using TY = decltype(ty);
    using TL = decltype(tl);
    for (int64_t i = 0; i < p.M; ++i) {
      for (int64_t n = 0; n < p.N; ++n) {
        float z = 0.0f;
        for (int64_t r = 0; r < p.R; ++r) z += ld<TL>(p.s, i * p.ssm + r * p.ssr) * ld<TL>(p.b, n * p.sbn + r * p.sbr);
        const float yv = ld<TY>(p.y, i * p.ldy + n);
        st<TY>(p.y, i * p.ldy + n, p.grad_mode ? lora_grad_sum<TY, TL>(yv, z, p.scaling, drop.at(i, n, p.N))
                                               : lora_forward_sum<TY, TL>(yv, z, p.scaling));
      }
    }
    return kSuccess;
  });
}

extern "C" int transpeft_lora_dropout_cast(const TranspeftLoraDropoutCastArgs* args, uint64_t) {
  if (args == nullptr) return kInvalidValue;
  const TranspeftLoraDropoutCastArgs& p = *args;
  if (p.M < 0 || p.K < 0) return kInvalidValue;
  if (p.M == 0 || p.K == 0) return kSuccess;
  const Mask drop = make_mask(p.drop);
  return with_dtypes(p.x_dtype, p.out_dtype, [&](auto tx, auto to) {
    using TX = decltype(tx);
    using TO = decltype(to);
    for (int64_t i = 0; i < p.M; ++i) {
      for (int64_t k = 0; k < p.K; ++k) {
        st<TO>(p.out, i * p.ldo + k, lora_input<TO>(ld<TX>(p.x, i * p.sxm + k * p.sxk), drop.at(i, k, p.K)));
      }
    }
    return kSuccess;
  });
}
