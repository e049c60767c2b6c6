// One warp's 16 x 16 x K tile product on the tensor cores, for the rank-sized LoRA products:
//
//   acc (16 x 16, fp32) += A (16 x K) B (K x 16)
//
// A and B are in shared memory, in the adapter dtype TA: A row-major (element (m, k) at a[m * lda + k])
// or column-major (at a[k * lda + m]), B row-major (element (k, n) at b[k * ldb + n]) or column-major
// (at b[n * ldb + k]). K is a multiple of kTileK<TA>. Precision:
//   bf16 / fp16 (16-bit adapters): the operands are exact in their own dtype, one mma per k step.
//   fp32 (fp32 adapters): tf32x3. Each operand is split x = hi + lo, hi = x rounded to tf32 (error
//     <= 2^-11 |x|), lo = x - hi (exact), which the mma reads truncated to tf32 (error <= 2^-21 |x|);
//     acc += lo_a hi_b + hi_a lo_b + hi_a hi_b (small terms first). With the dropped lo_a lo_b
//     (<= 2^-22) each product carries at most 2.25 x 2^-21 of |a b| before the fp32 accumulation
//     (python_tests/budget.py: TF32X3_ROUNDOFF), within a few fp32 ulps of an fp32 dot, at three
//     tensor-core mmas per k step instead of a CUDA-core FMA chain. A non-finite operand gives a
//     non-finite result, inf or NaN depending on the partial products' signs (not specified further).
//     A_EXACT: A holds values that tf32 represents exactly (a 16-bit input staged as fp32: bf16 and
//     fp16 have at most 10 mantissa bits), so lo_a = 0: A is not split and the k step is two mmas,
//     acc += hi_a lo_b + hi_a hi_b, with the same error bound. The emulation reads A as the mma does
//     (truncated to tf32), so a caller that passes an inexact A shows a 2^-11 error in the tests.
//     B_EXACT: the same for B (acc += lo_a hi_b + hi_a hi_b); both exact: one mma, exact products.
// Accumulation order within an mma is the hardware's (fp32), so sums differ from a sequential fp32 loop
// in the last bits only.
//
// nvcc: nvcuda::wmma (sm_80 and up). The emulation build (csrc/emulation/simt): every lane holds the
// whole tile and computes the same products with the same tf32 splits, in a fixed order; the warp-wide
// calls are warp barriers there, as they are warp-synchronous on the GPU.
#pragma once

#include <type_traits>

#include "dtypes.h"

#if !defined(TRANSPEFT_SIMT_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace transpeft {
namespace cuda {

constexpr int kTile = 16;  // the M and N of one warp's tile

template <typename TA>
constexpr int kTileK = sizeof(TA) == 4 ? 8 : 16;  // k per mma: tf32 m16n16k8, bf16/fp16 m16n16k16

#if !defined(TRANSPEFT_SIMT_EMULATION)

namespace detail {
namespace wmma = nvcuda::wmma;

// x rounded to tf32 (nearest, ties away: add half a tf32 ulp, clear the 13 low bits), as a float. Two
// integer instructions; __float_to_tf32 spends four, the extra two keeping inf and NaN, which this may
// turn into inf or zero: harmless here, as the product of a non-finite operand is non-finite either way.
__device__ __forceinline__ float tf32_hi(float x) {
  return __uint_as_float((__float_as_uint(x) + 0x1000u) & 0xFFFFE000u);
}

template <typename TA>
struct WmmaType;
template <>
struct WmmaType<float> {
  using precision = wmma::precision::tf32;
  using storage = float;
};
template <>
struct WmmaType<half_t> {
  using precision = __half;
  using storage = __half;
};
template <>
struct WmmaType<bf16_t> {
  using precision = __nv_bfloat16;
  using storage = __nv_bfloat16;
};

template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float v = hi.x[i];
    hi.x[i] = tf32_hi(v);
    lo.x[i] = v - hi.x[i];  // the mma reads its top 19 bits
  }
}
}  // namespace detail

// The fp32 accumulator tile of products in adapter dtype TA (a struct, so that TA is deduced).
template <typename TA>
struct TileAcc {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kTile, kTile, kTileK<TA>, float> f;
};

template <typename TA>
__device__ __forceinline__ void tile_zero(TileAcc<TA>& acc) {
  nvcuda::wmma::fill_fragment(acc.f, 0.0f);
}

// acc[j] += A B_j for j < NT, B_j at b + j * b_step (see the file comment): NT tiles of one row of tiles,
// A's fragments loaded (and split) once per k step for all of them. Each acc[j] sums its k steps in the
// same order as NT separate products, so the results are the same bits.
template <typename TA, int NT, bool A_COL_MAJOR, int K, bool B_COL_MAJOR = false, bool A_EXACT = false,
          bool B_EXACT = false>
__device__ __forceinline__ void tile_mma_row(TileAcc<TA> (&acc)[NT], const TA* a, int lda, const TA* b, int ldb,
                                             int b_step) {
  namespace wmma = nvcuda::wmma;
  using W = detail::WmmaType<TA>;
  using LayoutA = typename std::conditional<A_COL_MAJOR, wmma::col_major, wmma::row_major>::type;
  using LayoutB = typename std::conditional<B_COL_MAJOR, wmma::col_major, wmma::row_major>::type;
  constexpr int KS = kTileK<TA>;
  static_assert(K % KS == 0, "K must be a multiple of the mma's k");
  // the k steps chain through the accumulators anyway; unrolled (8 steps at rank 64 in tf32), ptxas
  // held every step's fragments at once and act_bwd_lora spilled at rank 64 (2 of 90 variants even
  // at an unroll of 2)
#pragma unroll 1
  for (int k = 0; k < K; k += KS) {
    const auto* ap = reinterpret_cast<const typename W::storage*>(a + (A_COL_MAJOR ? k * lda : k));
    wmma::fragment<wmma::matrix_a, kTile, kTile, KS, typename W::precision, LayoutA> fa, fa_lo;
    wmma::load_matrix_sync(fa, ap, lda);
    if constexpr (sizeof(TA) == 4 && !A_EXACT) detail::split_tf32(fa, fa_lo);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const auto* bp = reinterpret_cast<const typename W::storage*>(b + j * b_step + (B_COL_MAJOR ? k : k * ldb));
      wmma::fragment<wmma::matrix_b, kTile, kTile, KS, typename W::precision, LayoutB> fb;
      wmma::load_matrix_sync(fb, bp, ldb);
      if constexpr (sizeof(TA) == 4) {
        if constexpr (B_EXACT) {
          if constexpr (!A_EXACT) wmma::mma_sync(acc[j].f, fa_lo, fb, acc[j].f);
        } else {
          decltype(fb) fb_lo;
          detail::split_tf32(fb, fb_lo);
          if constexpr (!A_EXACT) wmma::mma_sync(acc[j].f, fa_lo, fb, acc[j].f);
          wmma::mma_sync(acc[j].f, fa, fb_lo, acc[j].f);
        }
      }
      wmma::mma_sync(acc[j].f, fa, fb, acc[j].f);
    }
  }
}

// acc += A B (see the file comment). A_COL_MAJOR, B_COL_MAJOR: the operand is stored column-major.
template <typename TA, bool A_COL_MAJOR, int K, bool B_COL_MAJOR = false, bool A_EXACT = false, bool B_EXACT = false>
__device__ __forceinline__ void tile_mma(TileAcc<TA>& acc, const TA* a, int lda, const TA* b, int ldb) {
  tile_mma_row<TA, 1, A_COL_MAJOR, K, B_COL_MAJOR, A_EXACT, B_EXACT>(*reinterpret_cast<TileAcc<TA>(*)[1]>(&acc), a, lda,
                                                                      b, ldb, 0);
}

// acc to shared or global memory, row-major: element (m, n) at p[m * ld + n].
template <typename TA>
__device__ __forceinline__ void tile_store(float* p, int ld, const TileAcc<TA>& acc) {
  nvcuda::wmma::store_matrix_sync(p, acc.f, ld, nvcuda::wmma::mem_row_major);
}

#else  // the emulation build

template <typename TA>
struct TileAcc {
  float x[kTile * kTile];
};

template <typename TA>
inline void tile_zero(TileAcc<TA>& acc) {
  for (float& v : acc.x) v = 0.0f;
}

namespace detail {
// The device's split (tf32_hi), and the mma's reading of a float operand (its 19 high bits).
inline float tf32_hi(float v) { return transpeft::detail::bits_f32((transpeft::detail::f32_bits(v) + 0x1000u) & 0xFFFFE000u); }
inline float tf32_read(float v) { return transpeft::detail::bits_f32(transpeft::detail::f32_bits(v) & 0xFFFFE000u); }
}  // namespace detail

template <typename TA, bool A_COL_MAJOR, int K, bool B_COL_MAJOR = false, bool A_EXACT = false, bool B_EXACT = false>
inline void tile_mma(TileAcc<TA>& acc, const TA* a, int lda, const TA* b, int ldb) {
  constexpr int KS = kTileK<TA>;
  static_assert(K % KS == 0, "K must be a multiple of the mma's k");
  __syncwarp();
  for (int k0 = 0; k0 < K; k0 += KS) {
    for (int m = 0; m < kTile; ++m) {
      for (int n = 0; n < kTile; ++n) {
        float c = acc.x[m * kTile + n];
        for (int k = k0; k < k0 + KS; ++k) {
          const float av = to_float(A_COL_MAJOR ? a[k * lda + m] : a[m * lda + k]);
          const float bv = to_float(B_COL_MAJOR ? b[n * ldb + k] : b[k * ldb + n]);
          if constexpr (sizeof(TA) == 4 && A_EXACT && B_EXACT) {
            c += detail::tf32_read(av) * detail::tf32_read(bv);
          } else if constexpr (sizeof(TA) == 4 && A_EXACT) {
            const float ah = detail::tf32_read(av), bh = detail::tf32_hi(bv);
            const float bl = detail::tf32_read(bv - bh);
            c += ah * bl;
            c += ah * bh;
          } else if constexpr (sizeof(TA) == 4 && B_EXACT) {
            const float ah = detail::tf32_hi(av), bh = detail::tf32_read(bv);
            const float al = detail::tf32_read(av - ah);
            c += al * bh;
            c += ah * bh;
          } else if constexpr (sizeof(TA) == 4) {
            const float ah = detail::tf32_hi(av), bh = detail::tf32_hi(bv);
            const float al = detail::tf32_read(av - ah), bl = detail::tf32_read(bv - bh);
            c += al * bh;
            c += ah * bl;
            c += ah * bh;
          } else {
            c += av * bv;
          }
        }
        acc.x[m * kTile + n] = c;
      }
    }
  }
  __syncwarp();
}

template <typename TA, int NT, bool A_COL_MAJOR, int K, bool B_COL_MAJOR = false, bool A_EXACT = false,
          bool B_EXACT = false>
inline void tile_mma_row(TileAcc<TA> (&acc)[NT], const TA* a, int lda, const TA* b, int ldb, int b_step) {
  for (int j = 0; j < NT; ++j) {
    tile_mma<TA, A_COL_MAJOR, K, B_COL_MAJOR, A_EXACT, B_EXACT>(acc[j], a, lda, b + j * b_step, ldb);
  }
}

template <typename TA>
inline void tile_store(float* p, int ld, const TileAcc<TA>& acc) {
  __syncwarp();
  for (int m = 0; m < kTile; ++m)
    for (int n = 0; n < kTile; ++n) p[m * ld + n] = acc.x[m * kTile + n];
  __syncwarp();
}

#endif

}  // namespace cuda
}  // namespace transpeft
