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
#include "transpeft/fused_math.h"

namespace {

using namespace transpeft;

constexpr int kSuccess = 0;
constexpr int kInvalidValue = 1;  // cudaErrorInvalidValue

struct Mask {
  bool on;
  uint64_t seed;
  float p;
  float kept;
  float at(uint64_t offset) const { return keep_factor(on, seed, offset, p, kept); }
};

Mask make_mask(float p, float kept, const int64_t* seed, int32_t on) {
  return Mask{on != 0, on ? static_cast<uint64_t>(*seed) : 0u, p, kept};
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

extern "C" const char* transpeft_cuda_error_string(int error) {
  return error == kSuccess ? "no error" : error == kInvalidValue ? "invalid argument" : "unknown error";
}

extern "C" int transpeft_masked_gated_act_fwd(const void* g, int64_t ldg, const void* u, int64_t ldu, void* h,
                                              int64_t ldh, int64_t M, int64_t I, int32_t dtype, int32_t activation,
                                              float mask_p, float mask_kept, const int64_t* mask_seed,
                                              int32_t mask_on, const void* a_d, int64_t lda, int64_t rank,
                                              int32_t a_dtype, float drop_q, float drop_kept,
                                              const int64_t* drop_seed, int32_t drop_on, void* s_d, int64_t lds,
                                              uint64_t) {
  if (M < 0 || I < 0 || activation < 0 || activation > 2) return kInvalidValue;
  if (M == 0) return kSuccess;
  if (a_d != nullptr && (rank < 1 || rank > 64 || s_d == nullptr || !adapter_ok(a_dtype, dtype))) return kInvalidValue;
  const Activation act = static_cast<Activation>(activation);
  const Mask mask = make_mask(mask_p, mask_kept, mask_seed, mask_on);
  const Mask drop = a_d != nullptr ? make_mask(drop_q, drop_kept, drop_seed, drop_on) : Mask{false, 0, 0, 1};
  return with_dtypes(dtype, a_d != nullptr ? a_dtype : dtype, [&](auto tt, auto ta) {
    using T = decltype(tt);
    using TA = decltype(ta);
    float acc[64];
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t k = 0; k < rank; ++k) acc[k] = 0.0f;
      for (int64_t j = 0; j < I; ++j) {
        const uint64_t off = static_cast<uint64_t>(i) * static_cast<uint64_t>(I) + static_cast<uint64_t>(j);
        const float hv = masked_gated_act_value<T>(act, ld<T>(g, i * ldg + j), ld<T>(u, i * ldu + j), mask.at(off));
        st<T>(h, i * ldh + j, hv);
        if (a_d != nullptr) {
          const float xd = lora_input<TA>(hv, drop.at(off));
          for (int64_t k = 0; k < rank; ++k) acc[k] += xd * ld<TA>(a_d, k * lda + j);
        }
      }
      if (a_d != nullptr) {
        for (int64_t k = 0; k < rank; ++k) st<TA>(s_d, i * lds + k, acc[k]);
      }
    }
    return kSuccess;
  });
}

extern "C" int transpeft_masked_gated_act_bwd(const void* dh_base, int64_t lddh, const void* g, int64_t ldg,
                                              const void* u, int64_t ldu, void* dg, int64_t lddg, void* du,
                                              int64_t lddu, int64_t M, int64_t I, int32_t dtype, int32_t activation,
                                              float mask_p, float mask_kept, const int64_t* mask_seed,
                                              int32_t mask_on, const void* t_d, int64_t ldt, const void* a_d,
                                              int64_t lda, int64_t rank, int32_t a_dtype, float scaling,
                                              float drop_q, float drop_kept, const int64_t* drop_seed,
                                              int32_t drop_on, void* h_out, int64_t ldh_out, void* xd_out,
                                              int64_t ldxd, uint64_t) {
  if (M < 0 || I < 0 || activation < 0 || activation > 2) return kInvalidValue;
  if (M == 0 || I == 0) return kSuccess;
  if (t_d != nullptr && (a_d == nullptr || rank < 1 || rank > 64)) return kInvalidValue;
  const bool has_a = t_d != nullptr || xd_out != nullptr;
  if (has_a && !adapter_ok(a_dtype, dtype)) return kInvalidValue;
  const Activation act = static_cast<Activation>(activation);
  const Mask mask = make_mask(mask_p, mask_kept, mask_seed, mask_on);
  const Mask drop = make_mask(drop_q, drop_kept, drop_seed, drop_on);
  return with_dtypes(dtype, has_a ? a_dtype : dtype, [&](auto tt, auto ta) {
    using T = decltype(tt);
    using TA = decltype(ta);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < I; ++j) {
        const uint64_t off = static_cast<uint64_t>(i) * static_cast<uint64_t>(I) + static_cast<uint64_t>(j);
        const float m = mask.at(off);
        const float d = drop.at(off);
        const float gv = ld<T>(g, i * ldg + j);
        const float uv = ld<T>(u, i * ldu + j);
        float dh = ld<T>(dh_base, i * lddh + j);
        if (t_d != nullptr) {
          float z = 0.0f;
          for (int64_t k = 0; k < rank; ++k) z += ld<TA>(t_d, i * ldt + k) * ld<TA>(a_d, k * lda + j);
          dh = lora_grad_sum<T, TA>(dh, z, scaling, d);
        }
        const GatedGrads gr = masked_gated_act_grads(act, dh, gv, uv, m);
        st<T>(dg, i * lddg + j, gr.dg);
        st<T>(du, i * lddu + j, gr.du);
        if (h_out != nullptr || xd_out != nullptr) {
          const float hv = masked_gated_act_value<T>(act, gv, uv, m);
          if (h_out != nullptr) st<T>(h_out, i * ldh_out + j, hv);
          if (xd_out != nullptr) st<TA>(xd_out, i * ldxd + j, lora_input<TA>(hv, d));
        }
      }
    }
    return kSuccess;
  });
}

extern "C" int transpeft_lora_shrink(const void* x, int64_t sxm, int64_t sxk, int32_t x_dtype, const void* a,
                                     int64_t sar, int64_t sak, int32_t a_dtype, void* s, int64_t lds, int64_t M,
                                     int64_t K, int64_t R, float drop_q, float drop_kept, const int64_t* drop_seed,
                                     int32_t drop_on, uint64_t) {
  if (M < 0 || K < 0 || R < 0) return kInvalidValue;
  if (M == 0 || R == 0) return kSuccess;
  const Mask drop = make_mask(drop_q, drop_kept, drop_seed, drop_on);
  return with_dtypes(x_dtype, a_dtype, [&](auto tx, auto ta) {
    using TX = decltype(tx);
    using TA = decltype(ta);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t r = 0; r < R; ++r) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
          const uint64_t off = static_cast<uint64_t>(i) * static_cast<uint64_t>(K) + static_cast<uint64_t>(k);
          acc += lora_input<TA>(ld<TX>(x, i * sxm + k * sxk), drop.at(off)) * ld<TA>(a, r * sar + k * sak);
        }
        st<TA>(s, i * lds + r, acc);
      }
    }
    return kSuccess;
  });
}

extern "C" int transpeft_lora_expand(void* y, int64_t ldy, int32_t y_dtype, const void* s, int64_t ssm, int64_t ssr,
                                     const void* b, int64_t sbn, int64_t sbr, int32_t lora_dtype, int64_t M,
                                     int64_t N, int64_t R, float scaling, int32_t grad_mode, float drop_q,
                                     float drop_kept, const int64_t* drop_seed, int32_t drop_on, uint64_t) {
  if (M < 0 || N < 0 || R < 0) return kInvalidValue;
  if (M == 0 || N == 0) return kSuccess;
  const Mask drop = make_mask(drop_q, drop_kept, drop_seed, drop_on);
  return with_dtypes(y_dtype, lora_dtype, [&](auto ty, auto tl) {
    using TY = decltype(ty);
    using TL = decltype(tl);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t n = 0; n < N; ++n) {
        float z = 0.0f;
        for (int64_t r = 0; r < R; ++r) z += ld<TL>(s, i * ssm + r * ssr) * ld<TL>(b, n * sbn + r * sbr);
        const float yv = ld<TY>(y, i * ldy + n);
        const uint64_t off = static_cast<uint64_t>(i) * static_cast<uint64_t>(N) + static_cast<uint64_t>(n);
        st<TY>(y, i * ldy + n, grad_mode ? lora_grad_sum<TY, TL>(yv, z, scaling, drop.at(off))
                                         : lora_forward_sum<TY, TL>(yv, z, scaling));
      }
    }
    return kSuccess;
  });
}

extern "C" int transpeft_lora_dropout_cast(const void* x, int64_t sxm, int64_t sxk, int32_t x_dtype, void* out,
                                           int64_t ldo, int32_t out_dtype, int64_t M, int64_t K, float drop_q,
                                           float drop_kept, const int64_t* drop_seed, int32_t drop_on, uint64_t) {
  if (M < 0 || K < 0) return kInvalidValue;
  if (M == 0 || K == 0) return kSuccess;
  const Mask drop = make_mask(drop_q, drop_kept, drop_seed, drop_on);
  return with_dtypes(x_dtype, out_dtype, [&](auto tx, auto to) {
    using TX = decltype(tx);
    using TO = decltype(to);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t k = 0; k < K; ++k) {
        const uint64_t off = static_cast<uint64_t>(i) * static_cast<uint64_t>(K) + static_cast<uint64_t>(k);
        st<TO>(out, i * ldo + k, lora_input<TO>(ld<TX>(x, i * sxm + k * sxk), drop.at(off)));
      }
    }
    return kSuccess;
  });
}
