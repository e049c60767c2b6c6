// The masked gated activation backward in one pass over (M, I), with the down projection's LoRA
// products on the tensor cores (transpeft/tile_mma.cuh):
//
//   z    = t_d A_d                                       (BM x BN per step, mma)
//   dh'  = T(dh_base + T(s_d d (z)))                     (fused_math.h lora_grad_sum)
//   dg   = dh' m u act'(g),  du = dh' m act(g)           written in T
//   h'   = act(g) u m (rebuilt, never written),  xd = dropout_qd(cast_A(h'))
//   dA_d partial += t_d^T xd                              (RT x BN, mma, kept in accumulators)
//
// Contract: transpeft/capi.h (transpeft_act_bwd_lora). Compared with masked_gated_act_bwd + an ATen
// GEMM for dA_d, the (M, I) xd buffer (fp32 with fp32 adapters) is neither written nor read, and the
// rank-sized products leave the CUDA cores (FFMA chains) for the tensor cores.
//
// Layout: a block of 4 warps owns BN = 64 columns of one row split and walks its rows BM = 32 at a
// time. A_d's (RT, BN) tile is read once per block into shared memory (not once per row group).
// Each step stages t_d's rows (BM, RT) in shared memory, forms z (BM, BN) with mma into shared memory,
// runs the element-wise part (each thread two groups of 8 columns: one Philox call per group and
// mask, 16-byte loads and stores), stages xd (BM, BN), and adds t^T xd into the dA accumulators.
// At the end the (RT, BN) accumulators, times s_d, go to the split's fp32 partial (no atomics).
// The activation is a template parameter: its switch folds away inside the element loop.
#include <cuda_runtime.h>
#include <stdint.h>

#include <initializer_list>
#include <utility>

#include "transpeft/activations.h"
#include "transpeft/capi.h"
#include "transpeft/cuda_common.cuh"
#include "transpeft/fused_math.h"
#include "transpeft/tile_mma.cuh"

namespace transpeft {
namespace cuda {
namespace {

using LoraBwdArgs = TranspeftActBwdLoraArgs;

constexpr int kLoraWarps = 4;
constexpr int kLoraThreads = kLoraWarps * 32;
constexpr int kLoraMinBlocks = 3;  // per SM: at most 168 registers per thread, 12 warps to hide latency
constexpr int kBM = 32;  // rows per step
constexpr int kBN = 64;  // columns per block
constexpr int kGroup = kMaskLanes;  // 8 columns: one Philox call per mask
constexpr int kGroupsPerThread = kBM * kBN / kGroup / kLoraThreads;
static_assert(kBM * kBN % (kGroup * kLoraThreads) == 0, "whole groups per thread");
static_assert((kBM / kTile) * (kBN / kTile) == 2 * kLoraWarps, "z: two tiles per warp");

// 8 consecutive elements as floats, through 16-byte loads (the group is in bounds and aligned).
template <typename T>
__device__ __forceinline__ void load_group(const T* p, float (&out)[kGroup]) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int q = 0; q < kGroup; q += V) {
    const Pack<T, V> pk = load_pack<T, V>(p + q);
#pragma unroll
    for (int v = 0; v < V; ++v) out[q + v] = to_float(pk.v[v]);
  }
}

template <typename T>
__device__ __forceinline__ void store_group(T* p, const float (&in)[kGroup]) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int q = 0; q < kGroup; q += V) {
    Pack<T, V> pk;
#pragma unroll
    for (int v = 0; v < V; ++v) pk.v[v] = from_float<T>(in[q + v]);
    store_pack<T, V>(p + q, pk);
  }
}

template <typename T, typename TA, Activation ACT, int RT>
__global__ void __launch_bounds__(kLoraThreads, kLoraMinBlocks) act_bwd_lora_kernel(LoraBwdArgs q) {
  constexpr int NTW = RT / kTile;  // dA tiles per warp: (RT / 16) x (BN / 16) tiles over 4 warps
  static_assert((RT / kTile) * (kBN / kTile) == NTW * kLoraWarps, "dA: NTW tiles per warp");
  constexpr int ZROWS = RT > kBM ? RT : kBM;
  alignas(32) __shared__ TA s_a[RT * kBN];     // A_d[:, col0 : col0 + BN], zero past rank and I
  alignas(32) __shared__ TA s_t[kBM * RT];     // t_d rows of the step, zero past rank and M
  alignas(32) __shared__ TA s_x[kBM * kBN];    // xd of the step, zero outside (M, I)
  alignas(32) __shared__ float s_z[ZROWS * kBN];  // z of the step; at the end the dA tile

  const TranspeftActBwdArgs& p = q.act;
  const T* dh = static_cast<const T*>(p.dh);
  const T* g = static_cast<const T*>(p.g);
  const T* u = static_cast<const T*>(p.u);
  T* dg = static_cast<T*>(p.dg);
  T* du = static_cast<T*>(p.du);
  const TA* t = static_cast<const TA*>(p.t);
  const TA* a = static_cast<const TA*>(p.a);
  const uint64_t mseed = load_seed(p.mask.seed, p.mask.on);
  const uint64_t dseed = load_seed(p.drop.seed, p.drop.on);
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int64_t col0 = int64_t{blockIdx.x} * kBN;
  const int64_t split = blockIdx.y;
  const int64_t row_begin = split * q.rows_per_split;
  const int64_t row_end = row_begin + q.rows_per_split < p.M ? row_begin + q.rows_per_split : p.M;

  for (int i = tid; i < RT * kBN; i += kLoraThreads) {
    const int k = i / kBN, c = i % kBN;
    s_a[i] = (k < p.rank && col0 + c < p.I) ? a[k * p.lda + col0 + c] : from_float<TA>(0.0f);
  }

  TileAcc<TA> acc[NTW];
#pragma unroll
  for (int j = 0; j < NTW; ++j) tile_zero(acc[j]);

  for (int64_t row0 = row_begin; row0 < row_end; row0 += kBM) {
    for (int i = tid; i < kBM * RT; i += kLoraThreads) {
      const int m = i / RT, k = i % RT;
      s_t[i] = (row0 + m < row_end && k < p.rank) ? t[(row0 + m) * p.ldt + k] : from_float<TA>(0.0f);
    }
    __syncthreads();  // s_t (and, on the first step, s_a) complete

#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int tile = warp * 2 + j, mt = tile / (kBN / kTile), nt = tile % (kBN / kTile);
      TileAcc<TA> z;
      tile_zero(z);
      tile_mma<TA, false, RT>(z, s_t + mt * kTile * RT, RT, s_a + nt * kTile, kBN);
      tile_store(s_z + mt * kTile * kBN + nt * kTile, kBN, z);
    }
    __syncthreads();  // s_z complete

#pragma unroll 1  // one group's 5 x 8 values live at a time: registers for 4 blocks per SM
    for (int i = 0; i < kGroupsPerThread; ++i) {
      const int group = tid + i * kLoraThreads;
      const int m = group / (kBN / kGroup);
      const int c = (group % (kBN / kGroup)) * kGroup;
      const int64_t row = row0 + m, col = col0 + c;
      float xd[kGroup];
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
          xd[v] = lora_input<TA>(masked_gated_act_value<T>(ACT, gv[v], uv[v], mk), d);
        }
        store_group<T>(dg + row * p.lddg + col, dgv);
        store_group<T>(du + row * p.lddu + col, duv);
      } else {
#pragma unroll
        for (int v = 0; v < kGroup; ++v) xd[v] = 0.0f;
      }
#pragma unroll
      for (int v = 0; v < kGroup; ++v) s_x[m * kBN + c + v] = from_float<TA>(xd[v]);
    }
    __syncthreads();  // s_x complete

#pragma unroll
    for (int j = 0; j < NTW; ++j) {
      const int tile = warp * NTW + j, rt = tile / (kBN / kTile), nt = tile % (kBN / kTile);
      tile_mma<TA, true, kBM>(acc[j], s_t + rt * kTile, RT, s_x + nt * kTile, kBN);
    }
    __syncthreads();  // the next step may overwrite s_t, s_x and s_z
  }

#pragma unroll
  for (int j = 0; j < NTW; ++j) {
    const int tile = warp * NTW + j, rt = tile / (kBN / kTile), nt = tile % (kBN / kTile);
    tile_store(s_z + rt * kTile * kBN + nt * kTile, kBN, acc[j]);
  }
  __syncthreads();
  float* part = static_cast<float*>(q.da_part) + split * p.rank * p.I;
  for (int i = tid; i < RT * kBN; i += kLoraThreads) {
    const int k = i / kBN, c = i % kBN;
    if (k < p.rank && col0 + c < p.I) part[k * p.I + col0 + c] = p.scaling * s_z[i];
  }
}

template <typename T, typename TA, Activation ACT>
cudaError_t launch_by_rank(const LoraBwdArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((args.act.I + kBN - 1) / kBN), static_cast<unsigned>(args.splits));
  const int64_t r = args.act.rank;
  if (r <= 16) return launch_kernel(act_bwd_lora_kernel<T, TA, ACT, 16>, grid, kLoraThreads, stream, args);
  if (r <= 32) return launch_kernel(act_bwd_lora_kernel<T, TA, ACT, 32>, grid, kLoraThreads, stream, args);
  return launch_kernel(act_bwd_lora_kernel<T, TA, ACT, 64>, grid, kLoraThreads, stream, args);
}

template <typename T, typename TA>
cudaError_t launch_by_activation(const LoraBwdArgs& args, cudaStream_t stream) {
  switch (static_cast<Activation>(args.act.activation)) {
    case Activation::kSilu: return launch_by_rank<T, TA, Activation::kSilu>(args, stream);
    case Activation::kGelu: return launch_by_rank<T, TA, Activation::kGelu>(args, stream);
    case Activation::kGeluTanh: return launch_by_rank<T, TA, Activation::kGeluTanh>(args, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
bool aligned_rows(const void* ptr, int64_t ld) {
  return ptr != nullptr && aligned16(ptr) && ld % (16 / static_cast<int64_t>(sizeof(T))) == 0 && ld % kGroup == 0;
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
    if (p.a_dtype == 0) return launch_by_activation<T, float>(*args, st);
    if (p.a_dtype == p.dtype) return launch_by_activation<T, T>(*args, st);
    return cudaErrorInvalidValue;
  });
}
