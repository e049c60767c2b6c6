// The C interface of libtranspeft_cuda (csrc/kernels/*.cu), called from Python through ctypes
// (transpeft_kernels/kernels/cuda) and usable from C and C++. No torch types cross it.
//
// Each entry point takes one argument struct by const pointer, plus the stream. The structs below are
// the kernels' own parameter blocks (passed to them by value) and the host emulation's input, so a
// field is named once, here. The activation structs keep each field their kernels read at its offset
// of ABI version 1 (when the kernels had private structs): moving them changed ptxas's scheduling and
// the spills of the rank-64 backward. The ctypes mirrors in transpeft_kernels/kernels/cuda/abi.py are
// checked against this library's sizes and field offsets (transpeft_cuda_struct_size /
// transpeft_cuda_field_offset) when it is loaded. Change a struct: edit its mirror and the offset
// table (capi_layout.h) with it, and bump TRANSPEFT_CUDA_ABI_VERSION and the mirror's ABI_VERSION.
//
// Conventions:
//   * 2-D tensors are (rows, cols) with element (i, j) at ptr + i * ld + j (unit column stride),
//     unless both strides are given (s*m, s*k). Sizes and strides are int64 (elements, not bytes).
//   * dtype codes: 0 float32, 1 float16, 2 bfloat16 (transpeft::DType). Activation codes:
//     0 silu, 1 gelu, 2 gelu_tanh (transpeft::Activation).
//   * A random mask (TranspeftRandomMask): element (i, j) of a (rows, cols) tensor is kept iff the
//     16-bit lane j % 8 of the Philox4x32-10 call at offset i * ceil(cols / 8) + j / 8 is >= `threshold`
//     (transpeft/philox.h; threshold = reference.philox.keep_threshold(p) = round(p * 65536), an
//     integer in [0, 65536]), and then multiplied by `kept` (the reference's scale,
//     already rounded to the tensor's dtype by the caller). `seed` points to one int64 in device
//     memory (the stream's Philox key), read by the kernels, so no host sync is needed. on = 0: no
//     mask (threshold, kept and seed are not read).
//   * `stream` is a cudaStream_t cast to an integer (0: the legacy default stream).
//   * Every function returns a cudaError_t (0 on success; cudaErrorInvalidValue for a NULL argument
//     struct, an unsupported dtype combination or a bad size); transpeft_cuda_error_string() names it.
//     Empty tensors return 0 without touching the device.
//   * Outputs never alias inputs. Results are deterministic: fixed-order reductions, no atomics.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TRANSPEFT_CUDA_ABI_VERSION 6  // 6: the forward's gate/up expands, the shrink's K split; 5: act_bwd_lora's gate/up dB partials; 4: transpeft_act_bwd_lora, transpeft_lora_token_reduce; 3: integer mask threshold

int transpeft_cuda_abi_version(void);
const char* transpeft_cuda_error_string(int error);

// sizeof(struct `name`) and offsetof(`name`, `field`) as this library was compiled; -1 for a struct
// or field it does not have. Names are the typedef names below ("TranspeftActFwdArgs", "ldg").
int64_t transpeft_cuda_struct_size(const char* name);
int64_t transpeft_cuda_field_offset(const char* name, const char* field);

typedef struct TranspeftRandomMask {
  uint32_t threshold;  // at the offset and of the size of v2's float p
  float kept;
  const int64_t* seed;
  int32_t on;
} TranspeftRandomMask;

// h' = act(g) * u * m over (M, I), m the knowledge mask `mask`.
// Fused down-projection shrink when a != NULL (A_d: (rank, I), row stride lda, dtype a_dtype,
// 1 <= rank <= 64, a_dtype float32 or equal to dtype):
//   S_d = s (M, rank, row stride lds, dtype a_dtype) = dropout_qd(cast_A(h')) A_d^T
// with the dropout mask `drop` over the (M, I) view of h'.
typedef struct TranspeftActFwdArgs {
  const void* g;
  int64_t ldg;
  const void* u;
  int64_t ldu;
  void* h;
  int64_t ldh;
  int64_t M;
  int64_t I;
  int32_t activation;
  int32_t dtype;
  TranspeftRandomMask mask;
  const void* a;
  int64_t lda;
  int64_t rank;
  TranspeftRandomMask drop;
  void* s;
  int64_t lds;
  int32_t a_dtype;  // of A_d and S_d
  // Optional, for the tensor-core forward only (NULL / 1: S_d written as above): the column range of I
  // split into col_splits parts of cols_per_split columns (a multiple of 64), each writing its fp32
  // partial of S_d to s_part (col_splits, M, rank) contiguous; the caller sums them in a fixed order and
  // casts to a_dtype (s is then not written). cudaErrorInvalidValue when that kernel does not take the
  // call (I % 8 != 0, unaligned rows): callers check first.
  void* s_part;
  int64_t col_splits;
  int64_t cols_per_split;
  // Optional (sg != NULL), for the tensor-core forward only: the gate and up projections' LoRA expands,
  // added to g and u IN PLACE before the activation reads them (g and u are then the caller's fresh
  // GEMM outputs, written through these pointers; the same thread reads an element before writing it):
  //   g = T(g + TA(TA(S_g B_g^T) * scaling_g)),   u = T(u + TA(TA(S_u B_u^T) * scaling_u))
  // S_g, S_u (M, rank_gu) and B_g, B_u (I, rank_gu) in a_dtype with row strides ldsg, ldsu, ldbg, ldbu
  // (unit column stride); 1 <= rank_gu <= 32 and rank <= 32 (the block's shared memory), up to 64 for a
  // 16-bit a_dtype.
  // cudaErrorInvalidValue when the tensor-core forward does not take the call.
  const void* sg;
  int64_t ldsg;
  const void* bg;
  int64_t ldbg;
  const void* su;
  int64_t ldsu;
  const void* bu;
  int64_t ldbu;
  int64_t rank_gu;
  float scaling_g;
  float scaling_u;
} TranspeftActFwdArgs;

int transpeft_masked_gated_act_fwd(const TranspeftActFwdArgs* args, uint64_t stream);

// (dg, du) of h' = act(g) * u * m, given dh' = T(dh_base + T(s * d * (t_d A_d))) formed on the fly:
//   dh (M, I) the base part dY W_d; t (M, rank) = t_d = cast_A(dY) B_d, or NULL for no LoRA term;
//   a = A_d (rank, I); d the down projection's dropout mask `drop` over (M, I); s = scaling.
// Optional outputs (NULL to skip), recomputed from g, u in the same pass for the down weights'
// gradients: h_out (M, I, dtype) = h', xd_out (M, I, a_dtype) = dropout_qd(cast_A(h')).
typedef struct TranspeftActBwdArgs {
  const void* dh;
  int64_t lddh;
  const void* g;
  int64_t ldg;
  const void* u;
  int64_t ldu;
  void* dg;
  int64_t lddg;
  void* du;
  int64_t lddu;
  int64_t M;
  int64_t I;
  int32_t activation;
  int32_t dtype;
  TranspeftRandomMask mask;
  const void* t;
  int64_t ldt;
  const void* a;
  int64_t lda;
  int64_t rank;
  float scaling;
  int32_t a_dtype;
  TranspeftRandomMask drop;
  void* h_out;
  int64_t ldh_out;
  void* xd_out;
  int64_t ldxd;
} TranspeftActBwdArgs;

int transpeft_masked_gated_act_bwd(const TranspeftActBwdArgs* args, uint64_t stream);

// The one-pass activation backward with the down projection's LoRA on the tensor cores: what
// transpeft_masked_gated_act_bwd computes with a LoRA term (act.t != NULL), and instead of writing
// dropout_qd(cast_A(h')) for dA_d, its product with t_d, split over row groups:
//   da_part (splits, rank, I) fp32, contiguous: da_part[s] = s_d t_d[rows of s]^T dropout_qd(cast_A(h'))[rows of s]
// so dA_d = cast_A(sum over s of da_part[s]), summed by the caller in a fixed order. Split s owns rows
// [s * rows_per_split, (s + 1) * rows_per_split); rows_per_split is a multiple of 32 and
// splits = ceil(M / rows_per_split). h' is rebuilt in registers and never written: act.h_out and
// act.xd_out must be NULL. Needs 1 <= rank <= 64, I % 8 == 0, 16-byte aligned g, u, dh, dg, du with
// row strides that are multiples of 8 elements; cudaErrorInvalidValue otherwise.
// Optionally (sg != NULL) the gate and up projections' dB from the dg and du the pass writes, split
// the same way: dbg_part (splits, rank_gu, I) fp32, contiguous,
//   dbg_part[s] = scaling_g S_g[rows of s]^T cast_A(dg)[rows of s],   likewise dbu_part from S_u and du,
// so dB_g = cast_A(sum over s of dbg_part[s])^T, as dA_d. S_g, S_u (M, rank_gu) in act.a_dtype with row
// strides ldsg, ldsu (unit column stride); 1 <= rank_gu <= 32 and act.rank <= 32 (the accumulators of
// three rank-sized products per block), 16-bit act.dtype; su, dbg_part and dbu_part then required.
typedef struct TranspeftActBwdLoraArgs {
  TranspeftActBwdArgs act;
  void* da_part;
  int64_t splits;
  int64_t rows_per_split;
  const void* sg;
  int64_t ldsg;
  const void* su;
  int64_t ldsu;
  int64_t rank_gu;
  float scaling_g;
  float scaling_u;
  void* dbg_part;
  void* dbu_part;
} TranspeftActBwdLoraArgs;

int transpeft_act_bwd_lora(const TranspeftActBwdLoraArgs* args, uint64_t stream);

// s (M, R, row stride lds, dtype a_dtype) = dropout_q(cast_A(x)) a^T, fp32 accumulation.
// x (M, K) with strides (sxm, sxk); a (R, K) with strides (sar, sak): pass B^T's strides for t = dY B.
// Optional (s_part != NULL), for the tensor-core shrink only (R <= 64, unit column stride of x): K split into
// k_splits ranges of cols_per_split columns (a multiple of 64), each writing its fp32 partial of s to
// s_part (k_splits, M, R) contiguous; the caller sums them in a fixed order and casts to a_dtype (s is then
// not written). cudaErrorInvalidValue when the tensor-core shrink does not take the call.
typedef struct TranspeftLoraShrinkArgs {
  const void* x;
  int64_t sxm;
  int64_t sxk;
  const void* a;
  int64_t sar;
  int64_t sak;
  void* s;
  int64_t lds;
  int64_t M;
  int64_t K;
  int64_t R;
  int32_t x_dtype;
  int32_t a_dtype;
  TranspeftRandomMask drop;
  void* s_part;
  int64_t k_splits;
  int64_t cols_per_split;
} TranspeftLoraShrinkArgs;

int transpeft_lora_shrink(const TranspeftLoraShrinkArgs* args, uint64_t stream);

// In place on a fresh y (M, N, row stride ldy, dtype y_dtype), z = s b^T (s (M, R), b (N, R), any
// strides, dtype lora_dtype), with s = scaling and d the dropout mask `drop` over (M, N):
//   grad_mode 0 (forward):   y = T(y + TA(TA(z) * s))
//   grad_mode 1 (dX):        y = T(y + T(TA(TA(TA(z) * s) * d)))
typedef struct TranspeftLoraExpandArgs {
  void* y;
  int64_t ldy;
  const void* s;
  int64_t ssm;
  int64_t ssr;
  const void* b;
  int64_t sbn;
  int64_t sbr;
  int64_t M;
  int64_t N;
  int64_t R;
  int32_t y_dtype;
  int32_t lora_dtype;
  float scaling;
  int32_t grad_mode;
  TranspeftRandomMask drop;
} TranspeftLoraExpandArgs;

int transpeft_lora_expand(const TranspeftLoraExpandArgs* args, uint64_t stream);

// out (M, K, row stride ldo, dtype out_dtype) = dropout_q(cast_out(x)), x (M, K) with strides (sxm, sxk).
typedef struct TranspeftLoraDropoutCastArgs {
  const void* x;
  int64_t sxm;
  int64_t sxk;
  void* out;
  int64_t ldo;
  int64_t M;
  int64_t K;
  int32_t x_dtype;
  int32_t out_dtype;
  TranspeftRandomMask drop;
} TranspeftLoraDropoutCastArgs;

int transpeft_lora_dropout_cast(const TranspeftLoraDropoutCastArgs* args, uint64_t stream);

// The LoRA gradients' token reductions on the tensor cores, without a cast copy of the (M, N) operand:
//   part (splits, R, N) fp32, contiguous: part[s] = scaling * l[rows of s]^T dropout_q(cast_A(x))[rows of s]
// l (M, R, row stride ldl, dtype l_dtype = the adapter dtype, 1 <= R <= 64); x (M, N, row stride ldx, unit
// column stride, dtype x_dtype); dropout mask `drop` over (M, N). The caller sums part over s in a fixed
// order: dB^T = s S^T cast_A(dY) (l = S, x = dY, no dropout), dA = s t^T dropout_q(cast_A(x)) (l = t).
// Split s owns rows [s * rows_per_split, (s + 1) * rows_per_split); rows_per_split is a multiple of 32
// and splits = ceil(M / rows_per_split). Any N (ragged widths and unaligned rows take a slower load).
typedef struct TranspeftLoraTokenReduceArgs {
  const void* l;
  int64_t ldl;
  const void* x;
  int64_t ldx;
  void* part;
  int64_t M;
  int64_t N;
  int64_t R;
  int32_t x_dtype;
  int32_t l_dtype;
  float scaling;
  TranspeftRandomMask drop;
  int64_t splits;
  int64_t rows_per_split;
} TranspeftLoraTokenReduceArgs;

int transpeft_lora_token_reduce(const TranspeftLoraTokenReduceArgs* args, uint64_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
