// The masked gated activation passes with the down projection's LoRA products on the tensor cores
// (transpeft/tile_mma.cuh). Rounding follows transpeft/fused_math.h; contracts: transpeft/capi.h.
//
// forward (transpeft_masked_gated_act_fwd with A_d, when rows are aligned and I % 8 == 0):
//   optionally (ranks <= 32, or 64 with 16-bit adapters) the gate/up LoRA expands first, in place:
//   g    = T(g + TA(TA(S_g B_g^T) s_g)),  u likewise      (BM x BN per step, mma; written back in T)
//   h'   = act(g) u m                                      written in T
//   S_d  = dropout_qd(cast_A(h')) A_d^T                    (BM x RT per block, mma over I)
// A block of 4 warps owns BM = 32 rows and sweeps I (or one of col_splits ranges of it, each writing an
// fp32 partial of S_d, so that M / 32 blocks do not leave SMs idle) in BN = 64 column steps: each runs the
// element-wise part (two groups of 8 columns per thread: one Philox call per group and mask, 16-byte
// loads and stores), stages xd (BM, BN) and A_d's (RT, BN) columns in shared memory, and adds
// xd A_d^T into the S_d accumulators. A_d is read once per 32 rows (the earlier kernel read it once
// per 64 / RT rows, and summed the products with FFMA chains). With the gate/up expands (GU) the block
// stages its rows of S_g and S_u once, and per step B_g's and B_u's (BN, RT) rows; z_g, z_u go through
// shared memory to the element-wise part, which adds them to g and u as lora_expand.cu does (the same
// mma, so the same bits) and writes g, u back: the separate expands' read and write of g and u are gone.
//
// backward (transpeft_act_bwd_lora), one pass over (M, I):
//   z    = t_d A_d                                         (BM x BN per step, mma)
//   dh'  = T(dh_base + T(s_d d (z)))                       (fused_math.h lora_grad_sum)
//   dg   = dh' m u act'(g),  du = dh' m act(g)             written in T
//   h'   = act(g) u m (rebuilt, never written),  xd = dropout_qd(cast_A(h'))
//   dA_d partial += t_d^T xd                                (RT x BN, mma, kept in accumulators)
//   optionally (ranks <= 32, 16-bit activations) dB_g^T partial += S_g^T cast_A(dg), dB_u^T likewise: the
//   gate/up LoRA's dB from the dg, du this pass writes, instead of a token reduction that reads them again
//   (with fp32 activations that variant spilled 8-24 bytes: not built)
// Compared with masked_gated_act_bwd + an ATen GEMM for dA_d, the (M, I) xd buffer (fp32 with fp32
// adapters) is neither written nor read, and the rank-sized products leave the CUDA cores.
// A block of 4 warps owns BN = 64 columns of one row split and walks its rows BM = 32 at a time.
// A_d's (RT, BN) tile is read once per block into shared memory (not once per row group). Each step
// stages t_d's rows (BM, RT), forms z (BM, BN) with mma into shared memory, runs the element-wise
// part, stages xd (BM, BN) and adds t^T xd into the dA accumulators. At the end the (RT, BN)
// accumulators, times s_d, go to the split's fp32 partial (no atomics).
//
// Both: the activation is a template parameter (its switch folds away inside the element loop); RT is
// the rank rounded up to 16, 32 or 64 (zero rows of A_d and columns of t_d pad it).
#include <cuda_runtime.h>
#include <stdint.h>

#include <initializer_list>
#include <type_traits>
#include <utility>

#include "transpeft/activations.h"
#include "transpeft/capi.h"
#include "transpeft/cuda_common.cuh"
#include "transpeft/fused_math.h"
#include "transpeft/tile_mma.cuh"
#include "transpeft/tile_pass.cuh"

namespace transpeft {
namespace cuda {
namespace {

using LoraBwdArgs = TranspeftActBwdLoraArgs;

// The forward's shared memory. Plain: A_d's columns, xd and the S_d tile at the end. With the gate/up
// expands (GU) also S_g's, S_u's rows of the block, B_g's, B_u's rows of the step and z_g, z_u, in 48 KB
// at rank 32 with fp32 adapters because xd takes z_g's place there (each element is read by the thread
// that then overwrites it) and the S_d tile z_u's (after the last step). At rank 64 (16-bit adapters
// only) B_g and B_u take turns in one buffer (kOneBBuffer: 44 KB).
template <int RT>
constexpr bool kOneBBuffer = RT > 32;

template <typename TA>
struct FwdBuffers {
  TA* a;
  TA* x;
  float* o;
  TA* sg;
  TA* su;
  TA* bg;
  TA* bu;
  float* zg;
  float* zu;
};

template <typename TA, int RT>
__device__ __forceinline__ FwdBuffers<TA> fwd_buffers() {
  alignas(32) __shared__ TA s_a[RT * kBN];      // A_d[:, col : col + BN]: column-major B of xd A_d^T
  alignas(32) __shared__ TA s_x[kBM * kBN];     // xd of the step, zero outside (M, I)
  alignas(32) __shared__ float s_o[kBM * RT];   // the S_d tile at the end
  return FwdBuffers<TA>{s_a, s_x, s_o, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
}

template <typename TA, int RT>
__device__ __forceinline__ FwdBuffers<TA> fwd_gate_up_buffers() {
  static_assert(RT <= 32 || sizeof(TA) == 2, "the gate/up expands at rank 64 need 16-bit adapters (48 KB)");
  constexpr bool ONE_B = kOneBBuffer<RT>;
  alignas(32) __shared__ TA s_a[RT * kBN];
  alignas(32) __shared__ TA sg[kBM * RT];       // S_g's rows of the block, zero past rank_gu and M
  alignas(32) __shared__ TA su[kBM * RT];
  alignas(32) __shared__ TA bg[kBN * RT];       // B_g's rows of the step (column-major B of S_g B_g^T)
  alignas(32) __shared__ TA bu[ONE_B ? 1 : kBN * RT];
  alignas(32) __shared__ float zg[kBM * kBN];   // z_g of the step
  alignas(32) __shared__ float zu[kBM * kBN];
  static_assert(kBM * RT <= kBM * kBN, "the S_d tile fits in z_u");
  if constexpr (std::is_same<TA, float>::value) {
    return FwdBuffers<TA>{s_a, zg, zu, sg, su, bg, bu, zg, zu};
  } else {
    alignas(32) __shared__ TA s_x[kBM * kBN];
    return FwdBuffers<TA>{s_a, s_x, zu, sg, su, bg, ONE_B ? bg : bu, zg, zu};
  }
}

// rows [row0, row0 + ROWS) of src (row stride ld, unit column stride) as a (ROWS, RT) tile in shared
// memory, zero past rows_end and R: B's rows for S B^T, as lora_expand.cu stages them, in groups of 8
// ranks with 16-byte loads (the launcher requires R % 8 == 0 and 16-byte aligned rows: act_fwd_lora_takes),
// a compile-time number of trips (one at rank 16), so the static SASS is what runs.
template <typename TA, int RT, int ROWS>
__device__ __forceinline__ void stage_b_rows(TA* dst, const TA* src, int64_t ld, int64_t row0, int64_t rows_end,
                                             int64_t R) {
  constexpr int kGroups = ROWS * (RT / kGroup);
  static_assert(kGroups % kLoraThreads == 0, "whole trips");
#pragma unroll 1  // one or two trips: unrolled, ptxas held both sides' groups at once (168 registers on sm_80)
  for (int t = 0; t < kGroups / kLoraThreads; ++t) {
    const int i = static_cast<int>(threadIdx.x) + t * kLoraThreads;
    const int n = i / (RT / kGroup), k = (i % (RT / kGroup)) * kGroup;
    float v[kGroup];
    if (row0 + n < rows_end && k < R) {  // R % 8 == 0: the whole group is in range
      load_group<TA>(src + (row0 + n) * ld + k, v);
    } else {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) v[j] = 0.0f;
    }
    store_group<TA>(dst + n * RT + k, v);
  }
}

template <typename T, typename TA, Activation ACT, int RT, bool GU>
__global__ void __launch_bounds__(kLoraThreads, kLoraMinBlocks) act_fwd_lora_kernel(TranspeftActFwdArgs p) {
  constexpr int TILES = (kBM / kTile) * (RT / kTile);  // S_d tiles of the block, over 4 warps
  constexpr int NTW = (TILES + kLoraWarps - 1) / kLoraWarps;
  FwdBuffers<TA> sm;
  if constexpr (GU) {
    sm = fwd_gate_up_buffers<TA, RT>();
  } else {
    sm = fwd_buffers<TA, RT>();
  }
  TA* const s_a = sm.a;
  TA* const s_x = sm.x;
  float* const s_o = sm.o;

  const T* g = static_cast<const T*>(p.g);
  const T* u = static_cast<const T*>(p.u);
  T* const g_out = static_cast<T*>(const_cast<void*>(p.g));  // GU: in place (capi.h)
  T* const u_out = static_cast<T*>(const_cast<void*>(p.u));
  T* h = static_cast<T*>(p.h);
  const TA* a = static_cast<const TA*>(p.a);
  constexpr bool X_EXACT = kExactOperand<T, TA>;  // xd exact in tf32: two mmas per k step (keep_only)
  const uint64_t mseed = load_seed(p.mask.seed, p.mask.on);
  const uint64_t dseed = load_seed(p.drop.seed, p.drop.on);
  const float drop_kept = X_EXACT ? 1.0f : p.drop.kept;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int64_t row0 = int64_t{blockIdx.x} * kBM;
  const bool split = p.s_part != nullptr;
  const int64_t col_begin = split ? int64_t{blockIdx.y} * p.cols_per_split : 0;
  const int64_t col_end = split && col_begin + p.cols_per_split < p.I ? col_begin + p.cols_per_split : p.I;

  TileAcc<TA> acc[NTW];
#pragma unroll
  for (int j = 0; j < NTW; ++j) tile_zero(acc[j]);

  if constexpr (GU) {
    stage_rank_rows<TA, RT>(sm.sg, static_cast<const TA*>(p.sg), p.ldsg, 1, row0, p.M, p.rank_gu);
    stage_rank_rows<TA, RT>(sm.su, static_cast<const TA*>(p.su), p.ldsu, 1, row0, p.M, p.rank_gu);
  }
  for (int64_t col0 = col_begin; col0 < col_end; col0 += kBN) {
    // A_d's and B's rows aligned, B's rank a multiple of 8 (act_fwd_lora_takes): vectorised staging only
    stage_columns_vec<TA, TA, RT>(s_a, a, p.lda, p.rank, col0, p.I);
    if constexpr (GU) {
      constexpr bool ONE_B = kOneBBuffer<RT>;
      stage_b_rows<TA, RT, kBN>(sm.bg, static_cast<const TA*>(p.bg), p.ldbg, col0, p.I, p.rank_gu);
      if constexpr (!ONE_B) stage_b_rows<TA, RT, kBN>(sm.bu, static_cast<const TA*>(p.bu), p.ldbu, col0, p.I, p.rank_gu);
      __syncthreads();  // S_g, S_u (first step), B_g (and B_u) complete
      z_step<TA, RT, true>(sm.zg, sm.sg, sm.bg, RT, kTile * RT);  // S_g B_g^T, as lora_expand.cu
      if constexpr (ONE_B) {
        __syncthreads();  // every warp is done with B_g
        stage_b_rows<TA, RT, kBN>(sm.bu, static_cast<const TA*>(p.bu), p.ldbu, col0, p.I, p.rank_gu);
        __syncthreads();  // B_u complete
      }
      z_step<TA, RT, true>(sm.zu, sm.su, sm.bu, RT, kTile * RT);
      __syncthreads();  // z_g, z_u complete
    }
#pragma unroll 1  // as in the backward: one group's values live at a time
    for (int i = 0; i < kGroupsPerThread; ++i) {
      const auto [m, c] = group_of(i);
      const int64_t row = row0 + m, col = col0 + c;
      float xd[kGroup];
      if (row < p.M && col < p.I) {  // I % 8 == 0: the whole group is in bounds
        float gv[kGroup], uv[kGroup], hv[kGroup];
        load_group<T>(g + row * p.ldg + col, gv);
        load_group<T>(u + row * p.ldu + col, uv);
        if constexpr (GU) {  // before xd overwrites z_g (fp32 adapters)
#pragma unroll
          for (int v = 0; v < kGroup; ++v) {
            gv[v] = lora_forward_sum<T, TA>(gv[v], sm.zg[m * kBN + c + v], p.scaling_g);
            uv[v] = lora_forward_sum<T, TA>(uv[v], sm.zu[m * kBN + c + v], p.scaling_u);
          }
          store_group_global<T>(g_out + row * p.ldg + col, gv);
          store_group_global<T>(u_out + row * p.ldu + col, uv);
        }
        const uint32_t mbits = keep_bits(p.mask.on, mseed, row, col, p.I, p.mask.threshold);
        const uint32_t dbits = keep_bits(p.drop.on, dseed, row, col, p.I, p.drop.threshold);
#pragma unroll
        for (int v = 0; v < kGroup; ++v) {
          hv[v] = masked_gated_act_value<T>(ACT, gv[v], uv[v], lane_factor(p.mask.on, mbits, v, p.mask.kept));
          xd[v] = lora_input<TA>(hv[v], lane_factor(p.drop.on, dbits, v, drop_kept));
        }
        store_group_global<T>(h + row * p.ldh + col, hv);
      } else {
#pragma unroll
        for (int v = 0; v < kGroup; ++v) xd[v] = 0.0f;
      }
#pragma unroll
      for (int v = 0; v < kGroup; ++v) s_x[m * kBN + c + v] = from_float<TA>(xd[v]);
    }
    __syncthreads();  // s_a and s_x complete

    if constexpr (NTW == 1) {
      const int tile = warp, mt = tile / (RT / kTile), nt = tile % (RT / kTile);
      if (tile < TILES) {
        tile_mma<TA, false, kBN, true, X_EXACT>(acc[0], s_x + mt * kTile * kBN, kBN, s_a + nt * kTile * kBN, kBN);
      }
    } else {  // rank 64: a warp's two tiles share their row, xd's fragments load once
      static_assert(TILES == NTW * kLoraWarps && (RT / kTile) % NTW == 0, "whole rows of tiles per warp");
      const int tile = warp * NTW, mt = tile / (RT / kTile), nt = tile % (RT / kTile);
      tile_mma_row<TA, NTW, false, kBN, true, X_EXACT>(acc, s_x + mt * kTile * kBN, kBN, s_a + nt * kTile * kBN, kBN,
                                                       kTile * kBN);
    }
    __syncthreads();  // the next step may overwrite s_a and s_x
  }

#pragma unroll
  for (int j = 0; j < NTW; ++j) {
    const int tile = warp * NTW + j, mt = tile / (RT / kTile), nt = tile % (RT / kTile);
    if (tile < TILES) tile_store(s_o + mt * kTile * RT + nt * kTile, RT, acc[j]);
  }
  __syncthreads();
  float* const part = split ? static_cast<float*>(p.s_part) + int64_t{blockIdx.y} * p.M * p.rank : nullptr;
  store_rank_rows<TA, kBM, RT>(s_o, row0, p.M, p.rank, part, static_cast<TA*>(p.s), p.lds,
                               X_EXACT && p.drop.on ? p.drop.kept : 1.0f);
}

// The dB staging of act_bwd_lora_kernel: S_g's and S_u's rows of a step and cast_A(dg), cast_A(du) of
// its tile, zero outside (M, I) and past rank_gu. Declared here, in the DB instantiations only: the rank-64
// fp32-adapter kernel without dB already uses all 48 KB of static shared memory. For fp32 adapters
// cast_A(dg) takes z's place in s_z (each element is read by the thread that then overwrites it), which
// keeps rank 32 under 48 KB.
template <typename TA>
struct DbBuffers {
  TA* sg;
  TA* su;
  TA* dg;
  TA* du;
};

template <typename TA, int RT>
__device__ __forceinline__ DbBuffers<TA> db_buffers(float* s_z) {
  alignas(32) __shared__ TA sg[kBM * RT];
  alignas(32) __shared__ TA su[kBM * RT];
  alignas(32) __shared__ TA du[kBM * kBN];
  if constexpr (std::is_same<TA, float>::value) {
    return DbBuffers<TA>{sg, su, reinterpret_cast<TA*>(s_z), du};
  } else {
    alignas(32) __shared__ TA dg[kBM * kBN];
    return DbBuffers<TA>{sg, su, dg, du};
  }
}

template <typename T, typename TA, Activation ACT, int RT, bool DB>
__global__ void __launch_bounds__(kLoraThreads, kLoraMinBlocks) act_bwd_lora_kernel(LoraBwdArgs q) {
  constexpr int NTW = RT / kTile;  // dA tiles per warp: (RT / 16) x (BN / 16) tiles over 4 warps
  static_assert((RT / kTile) * (kBN / kTile) == NTW * kLoraWarps, "dA: NTW tiles per warp");
  static_assert(!DB || RT <= 32, "dB: three sets of rank-sized accumulators fit up to rank 32");
  constexpr int ZROWS = RT > kBM ? RT : kBM;
  alignas(32) __shared__ TA s_a[RT * kBN];     // A_d[:, col0 : col0 + BN], zero past rank and I
  alignas(32) __shared__ TA s_t[kBM * RT];     // t_d rows of the step, zero past rank and M
  alignas(32) __shared__ TA s_x[kBM * kBN];    // xd of the step, zero outside (M, I)
  alignas(32) __shared__ float s_z[ZROWS * kBN];  // z of the step; at the end the dA (and dB) tiles
  DbBuffers<TA> db{};
  if constexpr (DB) db = db_buffers<TA, RT>(s_z);

  const TranspeftActBwdArgs& p = q.act;
  const T* dh = static_cast<const T*>(p.dh);
  const T* g = static_cast<const T*>(p.g);
  const T* u = static_cast<const T*>(p.u);
  T* dg = static_cast<T*>(p.dg);
  T* du = static_cast<T*>(p.du);
  const TA* t = static_cast<const TA*>(p.t);
  const TA* a = static_cast<const TA*>(p.a);
  constexpr bool X_EXACT = kExactOperand<T, TA>;  // xd, cast_A(dg), cast_A(du) exact in tf32 (keep_only)
  const uint64_t mseed = load_seed(p.mask.seed, p.mask.on);
  const uint64_t dseed = load_seed(p.drop.seed, p.drop.on);
  const int tid = threadIdx.x;
  const int64_t col0 = int64_t{blockIdx.x} * kBN;
  const int64_t split = blockIdx.y;
  const int64_t row_begin = split * q.rows_per_split;
  const int64_t row_end = row_begin + q.rows_per_split < p.M ? row_begin + q.rows_per_split : p.M;

  for (int i = tid; i < RT * kBN; i += kLoraThreads) {
    const int k = i / kBN, c = i % kBN;
    s_a[i] = (k < p.rank && col0 + c < p.I) ? a[k * p.lda + col0 + c] : from_float<TA>(0.0f);
  }

  TileAcc<TA> acc[NTW], acc_g[DB ? NTW : 1], acc_u[DB ? NTW : 1];
#pragma unroll
  for (int j = 0; j < NTW; ++j) {
    tile_zero(acc[j]);
    if constexpr (DB) {
      tile_zero(acc_g[j]);
      tile_zero(acc_u[j]);
    }
  }

  for (int64_t row0 = row_begin; row0 < row_end; row0 += kBM) {
    // The dB variants stage element by element: with the 16-byte staging their gelu instantiations
    // spilled 8-24 B at the 168-register bound (sm_90a)
    stage_rank_rows<TA, RT, !DB>(s_t, t, p.ldt, 1, row0, row_end, p.rank);
    if constexpr (DB) {
      stage_rank_rows<TA, RT, false>(db.sg, static_cast<const TA*>(q.sg), q.ldsg, 1, row0, row_end, q.rank_gu);
      stage_rank_rows<TA, RT, false>(db.su, static_cast<const TA*>(q.su), q.ldsu, 1, row0, row_end, q.rank_gu);
    }
    __syncthreads();  // s_t (and, on the first step, s_a) complete

    z_step<TA, RT, false>(s_z, s_t, s_a, kBN, kTile);  // t_d A_d
    __syncthreads();  // s_z complete

#pragma unroll 1  // one group's 5 x 8 values live at a time: registers for 4 blocks per SM
    for (int i = 0; i < kGroupsPerThread; ++i) {
      const auto [m, c] = group_of(i);
      const int64_t row = row0 + m, col = col0 + c;
      float xd[kGroup], dga[kGroup], dua[kGroup];
      if (row < row_end && col < p.I) {  // I % 8 == 0: the whole group is in bounds
        float dhv[kGroup], gv[kGroup], uv[kGroup], dgv[kGroup], duv[kGroup];
        load_group<T>(dh + row * p.lddh + col, dhv);
        load_group<T>(g + row * p.ldg + col, gv);
        load_group<T>(u + row * p.ldu + col, uv);
        const uint32_t mbits = keep_bits(p.mask.on, mseed, row, col, p.I, p.mask.threshold);
        const uint32_t dbits = keep_bits(p.drop.on, dseed, row, col, p.I, p.drop.threshold);
#pragma unroll
        for (int v = 0; v < kGroup; ++v) {
          const float mk = lane_factor(p.mask.on, mbits, v, p.mask.kept);
          const float d = lane_factor(p.drop.on, dbits, v, p.drop.kept);
          const float dhl = lora_grad_sum<T, TA>(dhv[v], s_z[m * kBN + c + v], p.scaling, d);
          const GatedGrads gr = masked_gated_act_grads(ACT, dhl, gv[v], uv[v], mk);
          dgv[v] = gr.dg;
          duv[v] = gr.du;
          const float dx = X_EXACT ? lane_factor(p.drop.on, dbits, v, 1.0f) : d;  // the scale after the sum
          xd[v] = lora_input<TA>(masked_gated_act_value<T>(ACT, gv[v], uv[v], mk), dx);
          if constexpr (DB) {  // cast_A of the dg and du written, as the dB token sums read them
            dga[v] = lora_input<TA>(round_as<T>(gr.dg), 1.0f);
            dua[v] = lora_input<TA>(round_as<T>(gr.du), 1.0f);
          }
        }
        store_group_global<T>(dg + row * p.lddg + col, dgv);
        store_group_global<T>(du + row * p.lddu + col, duv);
      } else {
#pragma unroll
        for (int v = 0; v < kGroup; ++v) {
          xd[v] = 0.0f;
          if constexpr (DB) dga[v] = dua[v] = 0.0f;
        }
      }
#pragma unroll
      for (int v = 0; v < kGroup; ++v) {
        s_x[m * kBN + c + v] = from_float<TA>(xd[v]);
        if constexpr (DB) {
          db.dg[m * kBN + c + v] = from_float<TA>(dga[v]);  // for fp32 adapters over this thread's z element
          db.du[m * kBN + c + v] = from_float<TA>(dua[v]);
        }
      }
    }
    __syncthreads();  // s_x (and db.dg, db.du) complete

    reduce_step<TA, RT, NTW, X_EXACT>(acc, s_t, s_x);
    if constexpr (DB) {
      reduce_step<TA, RT, NTW, X_EXACT>(acc_g, db.sg, db.dg);  // += S_g^T cast_A(dg): dB_g^T
      reduce_step<TA, RT, NTW, X_EXACT>(acc_u, db.su, db.du);
    }
    __syncthreads();  // the next step may overwrite s_t, s_x and s_z
  }
  const int64_t part = split * p.I;
  store_reduction<TA, RT, NTW>(acc, s_z, static_cast<float*>(q.da_part) + part * p.rank, p.rank, p.I, col0,
                               X_EXACT && p.drop.on ? p.scaling * p.drop.kept : p.scaling);
  if constexpr (DB) {
    __syncthreads();  // s_z is the stage of each store
    store_reduction<TA, RT, NTW>(acc_g, s_z, static_cast<float*>(q.dbg_part) + part * q.rank_gu, q.rank_gu, p.I, col0,
                                 q.scaling_g);
    __syncthreads();
    store_reduction<TA, RT, NTW>(acc_u, s_z, static_cast<float*>(q.dbu_part) + part * q.rank_gu, q.rank_gu, p.I, col0,
                                 q.scaling_u);
  }
}

template <typename T, typename TA, Activation ACT>
struct BwdKernel {
  template <int RT>
  static cudaError_t run(const LoraBwdArgs& args, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>((args.act.I + kBN - 1) / kBN), static_cast<unsigned>(args.splits));
    if constexpr (RT <= 32 && !std::is_same<T, float>::value) {  // dB: 16-bit activations (fp32 ones spill)
      if (args.sg != nullptr) return launch_kernel(act_bwd_lora_kernel<T, TA, ACT, RT, true>, grid, kLoraThreads, stream, args);
    }
    return launch_kernel(act_bwd_lora_kernel<T, TA, ACT, RT, false>, grid, kLoraThreads, stream, args);
  }
};

template <typename T, typename TA, Activation ACT>
struct FwdKernel {
  template <int RT>
  static cudaError_t run(const TranspeftActFwdArgs& args, cudaStream_t stream) {
    const unsigned splits = args.s_part != nullptr ? static_cast<unsigned>(args.col_splits) : 1u;
    const dim3 grid(static_cast<unsigned>((args.M + kBM - 1) / kBM), splits);
    if constexpr (RT <= 32 || sizeof(TA) == 2) {  // at rank 64 the staging fits 48 KB with 16-bit adapters only
      if (args.sg != nullptr) return launch_kernel(act_fwd_lora_kernel<T, TA, ACT, RT, true>, grid, kLoraThreads, stream, args);
    }
    if (args.sg != nullptr) return cudaErrorInvalidValue;
    return launch_kernel(act_fwd_lora_kernel<T, TA, ACT, RT, false>, grid, kLoraThreads, stream, args);
  }
};

// Kernel<T, TA, act>::run<RT>(args, stream), RT the rank tile of `rank`.
template <typename T, typename TA, template <typename, typename, Activation> class Kernel, typename Args>
cudaError_t launch_lora_pass(int32_t activation, int64_t rank, const Args& args, cudaStream_t stream) {
  auto by_rank = [&](auto act) -> cudaError_t {
    using K = Kernel<T, TA, decltype(act)::value>;
    if (rank <= 16) return K::template run<16>(args, stream);
    if (rank <= 32) return K::template run<32>(args, stream);
    return K::template run<64>(args, stream);
  };
  switch (static_cast<Activation>(activation)) {
    case Activation::kSilu: return by_rank(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kGelu: return by_rank(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return by_rank(std::integral_constant<Activation, Activation::kGeluTanh>{});
  }
  return cudaErrorInvalidValue;
}


}  // namespace
}  // namespace cuda
}  // namespace transpeft

using namespace transpeft::cuda;

extern "C" int transpeft_act_bwd_lora(const TranspeftActBwdLoraArgs* args, uint64_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const TranspeftActBwdArgs& p = args->act;
  if (p.M < 0 || p.I < 0 || p.activation < 0 || p.activation > 2) return cudaErrorInvalidValue;
  if (p.t == nullptr || p.a == nullptr || p.rank < 1 || p.rank > 64 || p.h_out != nullptr || p.xd_out != nullptr ||
      args->da_part == nullptr || p.I % kGroup != 0) {
    return cudaErrorInvalidValue;
  }
  const bool db = args->sg != nullptr;
  if (db && (p.dtype == 0 || args->su == nullptr || args->dbg_part == nullptr || args->dbu_part == nullptr ||
             args->rank_gu < 1 || args->rank_gu > 32 || p.rank > 32 || args->ldsg < args->rank_gu ||
             args->ldsu < args->rank_gu)) {
    return cudaErrorInvalidValue;
  }
  if (p.M == 0 || p.I == 0) return cudaSuccess;
  if (args->rows_per_split < 1 || args->rows_per_split % kBM != 0 ||
      args->splits != (p.M + args->rows_per_split - 1) / args->rows_per_split || args->splits > 65535 ||
      (p.I + kBN - 1) / kBN > 0x7FFFFFFF) {
    return cudaErrorInvalidValue;
  }
  const cudaStream_t st = as_stream(stream);
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    for (auto [ptr, ld] : {std::pair<const void*, int64_t>{p.dh, p.lddh}, {p.g, p.ldg}, {p.u, p.ldu},
                           {p.dg, p.lddg}, {p.du, p.lddu}}) {
      if (!aligned_rows<T>(ptr, ld)) return cudaErrorInvalidValue;
    }
    const int64_t rank = db && args->rank_gu > p.rank ? args->rank_gu : p.rank;  // the rank tile covers both
    if (p.a_dtype == 0) return launch_lora_pass<T, float, BwdKernel>(p.activation, rank, *args, st);
    if (p.a_dtype == p.dtype) return launch_lora_pass<T, T, BwdKernel>(p.activation, rank, *args, st);
    return cudaErrorInvalidValue;
  });
}

namespace transpeft {
namespace cuda {

bool act_fwd_lora_takes(const TranspeftActFwdArgs& p) {
  if (p.a == nullptr || p.rank < 1 || p.rank > 64 || p.I % kGroup != 0 || (p.M + kBM - 1) / kBM > 0x7FFFFFFF) return false;
  const int64_t max_gu = p.a_dtype == 0 ? 32 : 64;  // fp32 adapters: the staging fits 48 KB up to rank 32
  if (p.sg != nullptr && (p.su == nullptr || p.bg == nullptr || p.bu == nullptr || p.rank_gu < 1 || p.rank_gu > max_gu ||
                          p.rank > max_gu || p.ldsg < p.rank_gu || p.ldsu < p.rank_gu || p.ldbg < p.rank_gu ||
                          p.ldbu < p.rank_gu)) {
    return false;
  }
  if (p.s_part != nullptr && (p.cols_per_split < kBN || p.cols_per_split % kBN != 0 || p.col_splits < 1 || p.col_splits > 65535 ||
                              p.col_splits != (p.I + p.cols_per_split - 1) / p.cols_per_split)) {
    return false;
  }
  // the column loop stages A_d (and B_g, B_u) in whole groups of 8 with 16-byte loads only
  const auto adapter_rows = [&](const void* ptr, int64_t ld) {
    return p.a_dtype == 0 ? aligned_rows<float>(ptr, ld) : aligned_rows<uint16_t>(ptr, ld);
  };
  if (!adapter_rows(p.a, p.lda)) return false;
  if (p.sg != nullptr &&
      (p.rank_gu % kGroup != 0 || !adapter_rows(p.bg, p.ldbg) || !adapter_rows(p.bu, p.ldbu))) {
    return false;
  }
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
           using T = typename decltype(tag)::type;
           return aligned_rows<T>(p.g, p.ldg) && aligned_rows<T>(p.u, p.ldu) && aligned_rows<T>(p.h, p.ldh)
                      ? cudaSuccess
                      : cudaErrorInvalidValue;
         }) == cudaSuccess;
}

cudaError_t launch_act_fwd_lora(const TranspeftActFwdArgs& p, cudaStream_t stream) {
  const int64_t rank = p.sg != nullptr && p.rank_gu > p.rank ? p.rank_gu : p.rank;  // the rank tile covers both
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (p.a_dtype == 0) return launch_lora_pass<T, float, FwdKernel>(p.activation, rank, p, stream);
    if (p.a_dtype == p.dtype) return launch_lora_pass<T, T, FwdKernel>(p.activation, rank, p, stream);
    return cudaErrorInvalidValue;
  });
}

}  // namespace cuda
}  // namespace transpeft
