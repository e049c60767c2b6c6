// Masked gated activation, forward and backward, with the down projection's LoRA fused in.
//
//   forward   h'  = act(g) * u * m                                (m: knowledge mask, regenerated)
//             S_d = dropout_qd(cast_A(h')) A_d^T                  (optional, while h' is in registers)
//   backward  dh' = dh_base + s * d * (t_d A_d)                   (optional LoRA term, on the fly)
//             dg  = dh' m u act'(g),  du = dh' m act(g)
//             h', dropout_qd(cast_A(h'))                          (optional, for dW_d and dA_d)
// Rounding follows transpeft/fused_math.h. Contract and argument meaning: transpeft/capi.h.
// With A_d, rows the tensor-core kernels take (I % 8 == 0, 16-byte aligned rows) go to act_lora.cu's
// forward instead; the MLP backward with a trainable A_d and a frozen down base uses its one-pass
// transpeft_act_bwd_lora. The kernels below cover the rest (ragged widths, unaligned rows, h' or xd
// wanted) and the activation without a LoRA term.
//
// Layout: one block owns ROWS token rows and sweeps their columns with 16-byte packs (VEC elements);
// the rank-sized LoRA sums stay in registers (ROWS x RT of them: RT is the rank rounded up to 16,
// 32 or 64, ROWS = 64 / RT, so each A_d element read from L1/L2 serves ROWS rows) and are reduced
// over the block once per row group in a fixed order. Masks: Philox offset row * ceil(I / 8) + col / 8
// in 64 bits, lane col % 8 (transpeft/philox.h), so they do not depend on the launch configuration.
// A pack starts at a multiple of VEC (1, 4 or 8; VEC divides 8), so its columns lie in one group of
// 8: one Philox call per pack and mask (keep_bits), 8 elements per call for 16-bit dtypes, 4 for fp32,
// 1 for the unpacked fallback.
#include <cuda_runtime.h>
#include <stdint.h>

#include <initializer_list>

#include "transpeft/activations.h"
#include "transpeft/capi.h"
#include "transpeft/cuda_common.cuh"
#include "transpeft/fused_math.h"

namespace transpeft {
namespace cuda {
namespace {

// The kernels take the C interface's argument structs (transpeft/capi.h) as their parameter block.
using FwdArgs = TranspeftActFwdArgs;
using BwdArgs = TranspeftActBwdArgs;

__host__ __device__ constexpr int rows_for(int rt) { return rt == 0 ? 1 : 64 / rt; }
constexpr int kRankChunk = 16;  // RT is 16, 32 or 64

// The kernels' minimum blocks per SM for __launch_bounds__: 1 where ptxas otherwise held a kernel to
// 128 registers and spilled 8 bytes (sm_90: the forward with packs under 16 bytes and the fp32
// backward, both at RT 32); 0, which leaves ptxas its default, for the rest: 1 everywhere spilled up to
// 256 bytes elsewhere and raised the narrow forwards at RT 16 and 64 from 128 to 172-190 registers.
// compile-check --cuda: no spills in any instantiation on sm_80 and sm_90a.
template <typename T, int VEC, int RT>
constexpr int fwd_min_blocks() { return VEC * sizeof(T) < 16 && RT == 32 ? 1 : 0; }
template <typename T, int RT>
constexpr int bwd_min_blocks() { return sizeof(T) == 4 && RT == 32 ? 1 : 0; }

template <typename T, typename TA, int VEC, int RT>
__global__ void __launch_bounds__(kThreads, fwd_min_blocks<T, VEC, RT>()) act_fwd_kernel(FwdArgs p) {
  static_assert(kMaskLanes % VEC == 0, "a pack must lie in one group of 8 mask lanes");
  constexpr int ROWS = rows_for(RT);
  constexpr int NACC = RT == 0 ? 1 : ROWS * RT;
  __shared__ float smem[RT == 0 ? 1 : kWarps * NACC];
  const T* g = static_cast<const T*>(p.g);
  const T* u = static_cast<const T*>(p.u);
  T* h = static_cast<T*>(p.h);
  const TA* a = static_cast<const TA*>(p.a);
  const uint64_t mseed = load_seed(p.mask.seed, p.mask.on);
  const uint64_t dseed = RT == 0 ? 0u : load_seed(p.drop.seed, p.drop.on);

  for (int64_t row0 = int64_t{blockIdx.x} * ROWS; row0 < p.M; row0 += int64_t{gridDim.x} * ROWS) {
    float acc[NACC];
#pragma unroll
    for (int n = 0; n < NACC; ++n) acc[n] = 0.0f;

    for (int64_t j = int64_t{threadIdx.x} * VEC; j < p.I; j += int64_t{kThreads} * VEC) {
      float xd[ROWS][VEC];  // the down projection's LoRA input, dropout_qd(cast_A(h'))
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int64_t row = row0 + r;
        if (row >= p.M) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) xd[r][v] = 0.0f;
          continue;
        }
        const Pack<T, VEC> gp = load_pack<T, VEC>(g + row * p.ldg + j);
        const Pack<T, VEC> up = load_pack<T, VEC>(u + row * p.ldu + j);
        Pack<T, VEC> hp;
        const uint32_t mbits = keep_bits(p.mask.on, mseed, row, j, p.I, p.mask.threshold);
        const uint32_t dbits = RT == 0 ? 0u : keep_bits(p.drop.on, dseed, row, j, p.I, p.drop.threshold);
        const int lane0 = VEC == kMaskLanes ? 0 : static_cast<int>(j % kMaskLanes);  // j is a multiple of VEC
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float m = lane_factor(p.mask.on, mbits, lane0 + v, p.mask.kept);
          const float hv = masked_gated_act_value<T>(static_cast<Activation>(p.activation), to_float(gp.v[v]),
                                                     to_float(up.v[v]), m);
          hp.v[v] = from_float<T>(hv);
          if (RT > 0) xd[r][v] = lora_input<TA>(hv, lane_factor(p.drop.on, dbits, lane0 + v, p.drop.kept));
        }
        store_pack<T, VEC>(h + row * p.ldh + j, hp);
      }
      if constexpr (RT > 0) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          // 16 ranks of A_d at a time: at RT 64 a whole column (64 values beside 64 sums) spilled.
          // Each sum still adds its terms in the same order (v, then j), so results do not change.
#pragma unroll
          for (int k0 = 0; k0 < RT; k0 += kRankChunk) {
            float av[kRankChunk];  // inline on purpose: a helper filling av by reference moved ptxas's spills
#pragma unroll
            for (int k = 0; k < kRankChunk; ++k) {
              av[k] = k0 + k < p.rank ? to_float(a[(k0 + k) * p.lda + j + v]) : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
#pragma unroll
              for (int k = 0; k < kRankChunk; ++k) acc[r * RT + k0 + k] += xd[r][v] * av[k];
            }
          }
        }
      }
    }

    if constexpr (RT > 0) {
      const float total = block_sum_to_thread<NACC>(acc, smem);
      if (threadIdx.x < NACC) {
        const int64_t row = row0 + threadIdx.x / RT;
        const int64_t k = threadIdx.x % RT;
        if (row < p.M && k < p.rank) static_cast<TA*>(p.s)[row * p.lds + k] = from_float<TA>(total);
      }
    }
  }
}

template <typename T, typename TA, int VEC, int RT>
__global__ void __launch_bounds__(kThreads, bwd_min_blocks<T, RT>()) act_bwd_kernel(BwdArgs p) {
  static_assert(kMaskLanes % VEC == 0, "a pack must lie in one group of 8 mask lanes");
  constexpr int ROWS = rows_for(RT);
  constexpr int TN = RT == 0 ? 1 : RT;
  const T* dh = static_cast<const T*>(p.dh);
  const T* g = static_cast<const T*>(p.g);
  const T* u = static_cast<const T*>(p.u);
  T* dg = static_cast<T*>(p.dg);
  T* du = static_cast<T*>(p.du);
  T* h_out = static_cast<T*>(p.h_out);
  TA* xd_out = static_cast<TA*>(p.xd_out);
  const TA* t = static_cast<const TA*>(p.t);
  const TA* a = static_cast<const TA*>(p.a);
  const bool want_h = h_out != nullptr || xd_out != nullptr;
  const uint64_t mseed = load_seed(p.mask.seed, p.mask.on);
  const uint64_t dseed = load_seed(p.drop.seed, p.drop.on);

  for (int64_t row0 = int64_t{blockIdx.x} * ROWS; row0 < p.M; row0 += int64_t{gridDim.x} * ROWS) {
    float tv[ROWS][TN];  // this row group's t_d = cast_A(dY) B_d
    if constexpr (RT > 0) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int64_t row = row0 + r;
#pragma unroll
        for (int k = 0; k < RT; ++k) tv[r][k] = (row < p.M && k < p.rank) ? to_float(t[row * p.ldt + k]) : 0.0f;
      }
    }
    for (int64_t j = int64_t{threadIdx.x} * VEC; j < p.I; j += int64_t{kThreads} * VEC) {
      float z[ROWS][VEC];  // (t_d A_d)[row, j + v] in fp32
      if constexpr (RT > 0) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
#pragma unroll
          for (int r = 0; r < ROWS; ++r) z[r][v] = 0.0f;
          // 16 ranks of A_d at a time, as in the forward; each sum still runs k = 0, 1, ... in order
#pragma unroll
          for (int k0 = 0; k0 < RT; k0 += kRankChunk) {
            float av[kRankChunk];  // inline on purpose: a helper filling av by reference moved ptxas's spills
#pragma unroll
            for (int k = 0; k < kRankChunk; ++k) {
              av[k] = k0 + k < p.rank ? to_float(a[(k0 + k) * p.lda + j + v]) : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
#pragma unroll
              for (int k = 0; k < kRankChunk; ++k) z[r][v] += tv[r][k0 + k] * av[k];
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int64_t row = row0 + r;
        if (row >= p.M) continue;
        const Pack<T, VEC> dhp = load_pack<T, VEC>(dh + row * p.lddh + j);
        const Pack<T, VEC> gp = load_pack<T, VEC>(g + row * p.ldg + j);
        const Pack<T, VEC> up = load_pack<T, VEC>(u + row * p.ldu + j);
        Pack<T, VEC> dgp, dup, hp;
        const uint32_t mbits = keep_bits(p.mask.on, mseed, row, j, p.I, p.mask.threshold);
        const uint32_t dbits = keep_bits(p.drop.on, dseed, row, j, p.I, p.drop.threshold);
        const int lane0 = VEC == kMaskLanes ? 0 : static_cast<int>(j % kMaskLanes);  // j is a multiple of VEC
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float m = lane_factor(p.mask.on, mbits, lane0 + v, p.mask.kept);
          const float d = lane_factor(p.drop.on, dbits, lane0 + v, p.drop.kept);
          const float gv = to_float(gp.v[v]);
          const float uv = to_float(up.v[v]);
          float dhv = to_float(dhp.v[v]);
          if constexpr (RT > 0) dhv = lora_grad_sum<T, TA>(dhv, z[r][v], p.scaling, d);
          const GatedGrads gr = masked_gated_act_grads(static_cast<Activation>(p.activation), dhv, gv, uv, m);
          dgp.v[v] = from_float<T>(gr.dg);
          dup.v[v] = from_float<T>(gr.du);
          if (want_h) {
            const float hv = masked_gated_act_value<T>(static_cast<Activation>(p.activation), gv, uv, m);
            hp.v[v] = from_float<T>(hv);
            if (xd_out != nullptr) xd_out[row * p.ldxd + j + v] = from_float<TA>(lora_input<TA>(hv, d));
          }
        }
        store_pack<T, VEC>(dg + row * p.lddg + j, dgp);
        store_pack<T, VEC>(du + row * p.lddu + j, dup);
        if (h_out != nullptr) store_pack<T, VEC>(h_out + row * p.ldh_out + j, hp);
      }
    }
  }
}

template <typename T>
bool packable(int64_t I, std::initializer_list<int64_t> lds, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(T);
  if (I % V != 0) return false;
  for (int64_t ld : lds) {
    if (ld % V != 0) return false;
  }
  for (const void* q : ptrs) {
    if (q != nullptr && !aligned16(q)) return false;
  }
  return true;
}

// The forward's pack width: 16 bytes, but 8 bytes of a 16-bit dtype at RT 64, where 8 columns of xd
// beside the 64 sums spilled (ptxas, sm_80 and sm_90).
template <typename T, int RT>
constexpr int fwd_pack() { return RT == 64 && sizeof(T) == 2 ? 4 : 16 / sizeof(T); }

template <typename T, typename TA, int RT>
cudaError_t launch_fwd(const FwdArgs& args, cudaStream_t stream) {
  constexpr int V = fwd_pack<T, RT>();
  const unsigned grid = grid_for((args.M + rows_for(RT) - 1) / rows_for(RT));
  if (packable<T>(args.I, {args.ldg, args.ldu, args.ldh}, {args.g, args.u, args.h})) {
    return launch_kernel(act_fwd_kernel<T, TA, V, RT>, grid, kThreads, stream, args);
  } else {
    return launch_kernel(act_fwd_kernel<T, TA, 1, RT>, grid, kThreads, stream, args);
  }
}

template <typename T, typename TA, int RT>
cudaError_t launch_bwd(const BwdArgs& args, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const unsigned grid = grid_for((args.M + rows_for(RT) - 1) / rows_for(RT));
  const int64_t ldh = args.h_out != nullptr ? args.ldh_out : 0;
  if (packable<T>(args.I, {args.lddh, args.ldg, args.ldu, args.lddg, args.lddu, ldh},
                  {args.dh, args.g, args.u, args.dg, args.du, args.h_out})) {
    return launch_kernel(act_bwd_kernel<T, TA, V, RT>, grid, kThreads, stream, args);
  } else {
    return launch_kernel(act_bwd_kernel<T, TA, 1, RT>, grid, kThreads, stream, args);
  }
}

// The rank tile for a fused LoRA term: 16, 32 or 64; 0 for a rank the fused kernels do not take.
int rank_tile(int64_t rank) { return rank <= 16 ? 16 : rank <= 32 ? 32 : rank <= 64 ? 64 : 0; }

template <typename T, typename TA, typename Args, typename Launch>
cudaError_t by_rank(int64_t rank, const Args& args, cudaStream_t stream, Launch) {
  switch (rank_tile(rank)) {
    case 16: return Launch::template run<T, TA, 16>(args, stream);
    case 32: return Launch::template run<T, TA, 32>(args, stream);
    case 64: return Launch::template run<T, TA, 64>(args, stream);
  }
  return cudaErrorInvalidValue;
}

struct FwdLaunch {
  template <typename T, typename TA, int RT>
  static cudaError_t run(const FwdArgs& a, cudaStream_t s) { return launch_fwd<T, TA, RT>(a, s); }
};
struct BwdLaunch {
  template <typename T, typename TA, int RT>
  static cudaError_t run(const BwdArgs& a, cudaStream_t s) { return launch_bwd<T, TA, RT>(a, s); }
};

bool valid_act(int32_t a) { return a >= 0 && a <= 2; }

}  // namespace

// The forward with A_d on the tensor cores (act_lora.cu), for rows it can take.
bool act_fwd_lora_takes(const TranspeftActFwdArgs& args);
cudaError_t launch_act_fwd_lora(const TranspeftActFwdArgs& args, cudaStream_t stream);
}  // namespace cuda
}  // namespace transpeft

using namespace transpeft::cuda;

extern "C" int transpeft_masked_gated_act_fwd(const TranspeftActFwdArgs* args, uint64_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const FwdArgs& p = *args;
  if (p.M < 0 || p.I < 0 || !valid_act(p.activation)) return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;
  if (p.a != nullptr && (p.rank < 1 || p.s == nullptr)) return cudaErrorInvalidValue;
  const cudaStream_t st = as_stream(stream);
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (p.a == nullptr) {
      if (p.I == 0) return cudaSuccess;
      return launch_fwd<T, T, 0>(p, st);
    }
    // I == 0 still runs: S_d is then a sum over nothing, written as zeros.
    if (act_fwd_lora_takes(p)) return launch_act_fwd_lora(p, st);
    // only the tensor-core forward writes partials or adds the gate/up expands
    if (p.s_part != nullptr || p.sg != nullptr) return cudaErrorInvalidValue;
    if (p.a_dtype == 0) return by_rank<T, float>(p.rank, p, st, FwdLaunch{});
    if (p.a_dtype == p.dtype) return by_rank<T, T>(p.rank, p, st, FwdLaunch{});
    return cudaErrorInvalidValue;
  });
}

extern "C" int transpeft_masked_gated_act_bwd(const TranspeftActBwdArgs* args, uint64_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const BwdArgs& p = *args;
  if (p.M < 0 || p.I < 0 || !valid_act(p.activation)) return cudaErrorInvalidValue;
  if (p.M == 0 || p.I == 0) return cudaSuccess;
  if (p.t != nullptr && (p.a == nullptr || p.rank < 1)) return cudaErrorInvalidValue;
  const cudaStream_t st = as_stream(stream);
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const bool has_a = p.t != nullptr || p.xd_out != nullptr;
    if (has_a && p.a_dtype != 0 && p.a_dtype != p.dtype) return cudaErrorInvalidValue;
    if (p.t == nullptr) {
      return p.a_dtype == 0 ? launch_bwd<T, float, 0>(p, st) : launch_bwd<T, T, 0>(p, st);
    }
    if (p.a_dtype == 0) return by_rank<T, float>(p.rank, p, st, BwdLaunch{});
    return by_rank<T, T>(p.rank, p, st, BwdLaunch{});
  });
}
