// The C interface of libtranspeft_cuda (csrc/kernels/*.cu), called from Python through ctypes
// (transpeft_kernels/kernels/cuda) and usable from C++. No torch types cross it.
//
// Conventions:
//   * 2-D tensors are (rows, cols) with element (i, j) at ptr + i * ld + j (unit column stride),
//     unless both strides are given (s*m, s*k). Sizes and strides are int64 (elements, not bytes).
//   * dtype codes: 0 float32, 1 float16, 2 bfloat16 (transpeft::DType). Activation codes:
//     0 silu, 1 gelu, 2 gelu_tanh (transpeft::Activation).
//   * A random mask is (p, kept, seed, on): element (i, j) of a (rows, cols) tensor is kept iff
//     philox_uniform(*seed, i * cols + j) >= p, and then multiplied by `kept` (the reference's scale,
//     already rounded to the tensor's dtype by the caller). `seed` points to one int64 in device
//     memory (the stream's Philox key), read by the kernels, so no host sync is needed.
//   * `stream` is a cudaStream_t cast to an integer (0: the legacy default stream).
//   * Every function returns a cudaError_t (0 on success; cudaErrorInvalidValue for an unsupported
//     dtype combination or bad size); transpeft_cuda_error_string() names it. Empty tensors return 0
//     without touching the device.
//   * Outputs never alias inputs. Results are deterministic: fixed-order reductions, no atomics.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TRANSPEFT_CUDA_ABI_VERSION 1

int transpeft_cuda_abi_version(void);
const char* transpeft_cuda_error_string(int error);

// h' = act(g) * u * m over (M, I), m the knowledge mask (mask_*).
// Fused down-projection shrink when a_d != NULL (A_d: (rank, I), row stride lda, dtype a_dtype,
// rank <= 64, a_dtype float32 or equal to dtype):
//   S_d (M, rank, row stride lds, dtype a_dtype) = dropout_qd(cast_A(h')) A_d^T
// with the dropout mask drop_* over the (M, I) view of h'.
int transpeft_masked_gated_act_fwd(const void* g, int64_t ldg, const void* u, int64_t ldu, void* h, int64_t ldh,
                                   int64_t M, int64_t I, int32_t dtype, int32_t activation,
                                   float mask_p, float mask_kept, const int64_t* mask_seed, int32_t mask_on,
                                   const void* a_d, int64_t lda, int64_t rank, int32_t a_dtype,
                                   float drop_q, float drop_kept, const int64_t* drop_seed, int32_t drop_on,
                                   void* s_d, int64_t lds, uint64_t stream);

// (dg, du) of h' = act(g) * u * m, given dh' = T(dh_base + T(s * d * (t_d A_d))) formed on the fly:
//   dh_base (M, I) the base part dY W_d; t_d (M, rank) = cast_A(dY) B_d, or NULL for no LoRA term;
//   d the down projection's dropout mask drop_* over (M, I).
// Optional outputs (NULL to skip), recomputed from g, u in the same pass for the down weights'
// gradients: h_out (M, I, dtype) = h', xd_out (M, I, a_dtype) = dropout_qd(cast_A(h')).
int transpeft_masked_gated_act_bwd(const void* dh_base, int64_t lddh, const void* g, int64_t ldg, const void* u,
                                   int64_t ldu, void* dg, int64_t lddg, void* du, int64_t lddu,
                                   int64_t M, int64_t I, int32_t dtype, int32_t activation,
                                   float mask_p, float mask_kept, const int64_t* mask_seed, int32_t mask_on,
                                   const void* t_d, int64_t ldt, const void* a_d, int64_t lda, int64_t rank,
                                   int32_t a_dtype, float scaling,
                                   float drop_q, float drop_kept, const int64_t* drop_seed, int32_t drop_on,
                                   void* h_out, int64_t ldh_out, void* xd_out, int64_t ldxd, uint64_t stream);

// S (M, R, row stride lds, dtype a_dtype) = dropout_q(cast_A(X)) A^T, fp32 accumulation.
// X (M, K) with strides (sxm, sxk); A (R, K) with strides (sar, sak): pass B^T's strides for t = dY B.
int transpeft_lora_shrink(const void* x, int64_t sxm, int64_t sxk, int32_t x_dtype,
                          const void* a, int64_t sar, int64_t sak, int32_t a_dtype,
                          void* s, int64_t lds, int64_t M, int64_t K, int64_t R,
                          float drop_q, float drop_kept, const int64_t* drop_seed, int32_t drop_on,
                          uint64_t stream);

// In place on a fresh Y (M, N, row stride ldy, dtype y_dtype), z = S B^T (S (M, R), B (N, R), any
// strides, dtype lora_dtype):
//   grad_mode 0 (forward):   Y = T(Y + TA(TA(z) * s))
//   grad_mode 1 (dX):        Y = T(Y + T(TA(TA(TA(z) * s) * d))),  d the dropout mask drop_* over (M, N)
int transpeft_lora_expand(void* y, int64_t ldy, int32_t y_dtype,
                          const void* s, int64_t ssm, int64_t ssr, const void* b, int64_t sbn, int64_t sbr,
                          int32_t lora_dtype, int64_t M, int64_t N, int64_t R, float scaling, int32_t grad_mode,
                          float drop_q, float drop_kept, const int64_t* drop_seed, int32_t drop_on,
                          uint64_t stream);

// out (M, K, row stride ldo, dtype out_dtype) = dropout_q(cast_out(X)), X (M, K) with strides (sxm, sxk).
int transpeft_lora_dropout_cast(const void* x, int64_t sxm, int64_t sxk, int32_t x_dtype,
                                void* out, int64_t ldo, int32_t out_dtype, int64_t M, int64_t K,
                                float drop_q, float drop_kept, const int64_t* drop_seed, int32_t drop_on,
                                uint64_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
