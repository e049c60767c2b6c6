// A host stand-in for <cuda_runtime.h>: it lets g++ compile csrc/kernels/*.cu unchanged and run their
// kernels on the CPU, one cooperative fiber per CUDA thread, for the emulation library
// (csrc/emulation/kernels_on_host.cpp, built by transpeft_kernels/kernels/cuda/build.py) and the host
// tests. Found first on the include path only in those builds (-I csrc/emulation/simt); nvcc never
// sees it.
//
// What it models: the launch grid and block (threadIdx, blockIdx, blockDim, gridDim), __shared__
// memory (one copy per kernel instantiation and OS thread; blocks run one after another, so that is
// one per block), __syncthreads and __syncwarp as real barriers, and warp shuffles through a per-warp
// exchange slot.
// A block's threads interleave only at barriers, so a kernel that reads shared memory another thread
// wrote without a barrier in between reads stale data here too, as it may on a GPU. Barriers that can
// never complete (divergent __syncthreads / __syncwarp) end the launch with cudaErrorLaunchFailure and
// a message on stderr instead of hanging; the block's fibers are abandoned.
// What it does not model: timing, memory coalescing, occupancy, register or shared-memory limits.
// Switches: a fiber starts through setcontext and from then on switches with _setjmp/_longjmp, which,
// unlike swapcontext, do not save the signal mask with a system call each time.
#pragma once

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <ucontext.h>

#include <memory>
#include <vector>

#define TRANSPEFT_SIMT_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local  // one copy per kernel instantiation and OS thread

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaStream_t = struct CUstream_st*;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace simt {

// The running fiber's coordinates; the scheduler sets them before it resumes a fiber. Per OS thread:
// fibers never leave the thread that launched them, and two threads may launch at once (ctypes
// releases the GIL during a call).
inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t ctx;  // the entry point, used once
  jmp_buf resume;
  bool started = false;
  std::unique_ptr<char[]> stack;  // uninitialised: only the pages a thread touches get memory
  dim3 idx;
  bool done = false;
};

struct Block {
  std::vector<Fiber> fibers;
  jmp_buf scheduler;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> warp_slots;  // 32 per warp: the shuffle exchange
  int current = 0;
  int live = 0;
  void (*body)(const void*) = nullptr;
  const void* args = nullptr;
};

inline Block*& active() {
  static thread_local Block* b = nullptr;
  return b;
}

inline int linear_thread() { return static_cast<int>(thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z)); }

inline void yield_to_scheduler() {
  Block* b = active();
  if (!_setjmp(b->fibers[b->current].resume)) _longjmp(b->scheduler, 1);
}

// Waits until `count` threads (the whole block, or one warp) have arrived at `bar`.
inline void arrive_and_wait(Barrier& bar, int count) {
  const uint64_t gen = bar.generation;
  if (++bar.arrived == count) {
    bar.arrived = 0;
    ++bar.generation;
    return;
  }
  while (bar.generation == gen) yield_to_scheduler();
}

inline void sync_block() { arrive_and_wait(active()->block_barrier, active()->live); }

inline void sync_warp() {
  Block* b = active();
  const int t = linear_thread();
  const int total = static_cast<int>(b->fibers.size());
  const int warp = t / 32;
  const int lanes = total - warp * 32 < 32 ? total - warp * 32 : 32;
  arrive_and_wait(b->warp_barriers[warp], lanes);
}

// value of lane (own lane ^ offset) in this warp; every lane of the warp must call it.
template <typename V>
inline V shuffle_xor(V v, int offset) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  Block* b = active();
  const int t = linear_thread();
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof v);
  b->warp_slots[t] = bits;
  sync_warp();
  const int src = (t & ~31) | ((t & 31) ^ offset);
  const uint64_t got = src < static_cast<int>(b->fibers.size()) ? b->warp_slots[src] : bits;
  sync_warp();
  V out;
  memcpy(&out, &got, sizeof out);
  return out;
}

inline void fiber_entry() {
  Block* b = active();
  b->body(b->args);
  b->fibers[b->current].done = true;
  --b->live;
  // a thread that has exited no longer counts for __syncthreads (as on the GPU); release the others
  if (b->live > 0 && b->block_barrier.arrived == b->live) {
    b->block_barrier.arrived = 0;
    ++b->block_barrier.generation;
  }
  _longjmp(b->scheduler, 1);  // never returns: the fiber's stack is reused by the next block
}

// Runs fiber i until it yields or ends. A function of its own, so that no local of the scheduler's
// loop lives in the frame that _setjmp saves.
__attribute__((noinline)) inline void resume(Block& b, int i) {
  b.current = i;
  thread_idx = b.fibers[i].idx;
  Fiber& f = b.fibers[i];
  if (!_setjmp(b.scheduler)) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.ctx);
    }
    _longjmp(f.resume, 1);
  }
}

// Runs one block: every fiber until it finishes, round robin, switching only at barriers. False when
// no fiber can move (a deadlock).
inline bool run_block(Block& b) {
  constexpr size_t kStack = 256 * 1024;
  const int n = static_cast<int>(b.fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.done = false;
    f.started = false;
    if (!f.stack) f.stack.reset(new char[kStack]);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  b.live = n;
  b.block_barrier = Barrier{};
  for (Barrier& w : b.warp_barriers) w = Barrier{};
  uint64_t stalled_rounds = 0;
  while (b.live > 0) {
    const uint64_t before_gen = b.block_barrier.generation;
    const int before_live = b.live;
    uint64_t warp_gens = 0;
    for (const Barrier& w : b.warp_barriers) warp_gens += w.generation;
    for (int i = 0; i < n; ++i) {
      if (b.fibers[i].done) continue;
      resume(b, i);
    }
    uint64_t warp_gens_after = 0;
    for (const Barrier& w : b.warp_barriers) warp_gens_after += w.generation;
    const bool progress = b.block_barrier.generation != before_gen || b.live != before_live || warp_gens != warp_gens_after;
    stalled_rounds = progress ? 0 : stalled_rounds + 1;
    if (stalled_rounds > 2) {
      fprintf(stderr, "simt emulation: block (%u, %u, %u) deadlocked: barriers that can never complete\n",
              block_idx.x, block_idx.y, block_idx.z);
      return false;
    }
  }
  return true;
}

// kernel<<<grid, block>>>(args) on the host: blocks one after another, threads as fibers.
template <typename Args>
inline cudaError_t launch(void (*kernel)(Args), dim3 grid, dim3 block, const Args& args) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaErrorInvalidConfiguration;
  struct Call {
    void (*kernel)(Args);
    const Args* args;
  } call{kernel, &args};
  Block b;
  b.fibers.resize(threads);
  b.warp_barriers.resize((threads + 31) / 32);
  b.warp_slots.assign(((threads + 31) / 32) * 32, 0);
  b.args = &call;
  b.body = [](const void* c) {
    const Call* k = static_cast<const Call*>(c);
    k->kernel(*k->args);
  };
  for (unsigned z = 0, i = 0; z < block.z; ++z)
    for (unsigned y = 0; y < block.y; ++y)
      for (unsigned x = 0; x < block.x; ++x) b.fibers[i++].idx = dim3(x, y, z);
  Block* const outer = active();
  active() = &b;
  block_dim = block;
  grid_dim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = dim3(x, y, z);
        if (!run_block(b)) {
          active() = outer;
          return cudaErrorLaunchFailure;
        }
      }
  active() = outer;
  return cudaSuccess;
}

}  // namespace simt

#define threadIdx (::simt::thread_idx)
#define blockIdx (::simt::block_idx)
#define blockDim (::simt::block_dim)
#define gridDim (::simt::grid_dim)

inline void __syncthreads() { simt::sync_block(); }
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { simt::sync_warp(); }

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int offset) {
  return simt::shuffle_xor(v, offset);
}

template <typename V>
inline V __ldg(const V* p) {
  return *p;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
