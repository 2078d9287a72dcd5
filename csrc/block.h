// A CUDA thread block written once, run two ways: on the GPU (DeviceBlock: each thread runs its
// own share of every phase) and on the CPU (HostBlock: every thread of the block in turn, phase by
// phase), so the tests run the kernels' exact code on CPU memory (the module's *_emulated entry
// points) although no GPU is present.
//
// Rules for code written against a Block B: per-thread state lives in arrays of B::kStates
// entries indexed by the `state` argument (one entry per thread on the host, one register-
// resident entry on the device); B::each(f) calls f(tid, state) for the calling thread
// (device) or for every tid (host); B::each_warp(f) likewise calls f(warp, state) with per-warp
// state in arrays of B::kWarpStates entries (tensor_core.h's fragments); shared memory is a
// float* the caller provides (16-bit values may be staged in it, whole 32-bit words per phase);
// phases that read what other threads wrote are separated by B::sync() (__syncthreads on the
// device).
// OPT-IN: no GPU has run the kernels written this way yet.
//
// Missing barriers on the CPU. Running one phase for every thread before the next starts hides a
// missing B::sync(): the next phase always finds the previous one finished. So the emulation
// keeps the block's shared memory in a HostShared, which enforces the rules a barrier stands for
// between the phases of one *interval* (the phases since the last B::sync(), or the block's start):
//   - at the block's start, shared memory is poisoned (a NaN pattern): the GPU's is undefined;
//   - a phase that is not the first of its interval sees every element an earlier phase of the
//     interval wrote as poison (a thread may run ahead of the writers on the GPU: read-after-write
//     race), restored afterwards unless the phase writes it;
//   - such a phase may not overwrite an element that held a value before it (a slower thread may
//     still read it in an earlier phase: write-after-read race): the emulation throws.
// Stricter than CUDA on one point: a thread may not read its own shared-memory write of an earlier
// phase of the interval either (the emulation cannot tell writers apart). Shared memory is all it
// checks: global memory written and read across threads in one interval goes unseen. The tests
// drop one B::sync() site at a time in the emulation (emulation_drop_barrier) and expect a failure.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "elementwise.h"

namespace fastpeft {

constexpr int kBlockThreads = 256;  // 8 warps: every kernel here uses 256-thread blocks

constexpr int kBlockWarps = kBlockThreads / 32;

struct DeviceBlock {
  static constexpr int kStates = 1;
  static constexpr int kWarpStates = 1;
  template <typename F>
  FASTPEFT_HD static void each(F&& f) {
#ifdef __CUDA_ARCH__
    f(static_cast<int>(threadIdx.x), 0);
#endif
  }
  // f(warp, state) for the calling thread's warp (every lane calls it: tensor_core.h's rules).
  template <typename F>
  FASTPEFT_HD static void each_warp(F&& f) {
#ifdef __CUDA_ARCH__
    f(static_cast<int>(threadIdx.x) / 32, 0);
#endif
  }
  FASTPEFT_HD static void sync() {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

// The shared memory of the blocks one emulated launch runs, one block after another (see the
// top of this file). Constructing one makes it the calling thread's current one, which HostBlock
// checks; begin_block() starts a block. Host only.
class HostShared {
 public:
  explicit HostShared(size_t floats) : data_(floats), previous_(current()) { current() = this; }
  ~HostShared() { current() = previous_; }
  HostShared(const HostShared&) = delete;
  HostShared& operator=(const HostShared&) = delete;

  // A new block: shared memory poisoned, a new interval. Returns the block's shared memory.
  float* begin_block() {
    for (float& v : data_) v = poison();
    start_interval("the block's start");
    return data_.data();
  }

  static HostShared*& current() {
    static thread_local HostShared* shared = nullptr;
    return shared;
  }

  // "file:line" of the one B::sync() the emulation skips ("" for none): a test's way to remove it.
  static std::string& dropped_barrier() {
    static std::string site;
    return site;
  }

  void barrier(const char* file, int line) {
    const char* slash = std::strrchr(file, '/');
    const std::string site = std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
    if (site != dropped_barrier()) start_interval(site);
  }

  void before_phase() {
    hidden_.clear();
    if (phases_ == 0) return;
    before_ = data_;
    for (size_t i = 0; i < data_.size(); ++i) {
      if (bits(data_[i]) != bits(interval_start_[i])) {  // written by an earlier phase of the interval
        hidden_.push_back(i);
        data_[i] = poison();
      }
    }
  }

  void after_phase() {
    if (phases_++ == 0) return;
    for (size_t i : hidden_) {
      if (bits(data_[i]) == bits(poison())) data_[i] = before_[i];
    }
    for (size_t i = 0; i < data_.size(); ++i) {
      if (bits(data_[i]) != bits(before_[i]) && bits(before_[i]) != bits(poison())) {
        throw std::logic_error("fastpeft emulation: missing barrier: a phase overwrote shared memory element " +
                               std::to_string(i) + ", which an earlier phase may still read (no B::sync() since " +
                               interval_site_ + ")");
      }
    }
  }

 private:
  static float poison() {
    // A quiet NaN whose two 16-bit halves are fp16 and bf16 NaNs too (kernels also stage 16-bit
    // values in shared memory): arithmetic on a poisoned read gives NaN.
    const uint32_t pattern = 0x7fff7fff;
    float v;
    std::memcpy(&v, &pattern, sizeof v);
    return v;
  }
  static uint32_t bits(float v) {
    uint32_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
  }
  void start_interval(const std::string& site) {
    interval_start_ = data_;
    interval_site_ = site;
    phases_ = 0;
  }

  std::vector<float> data_, interval_start_, before_;
  std::vector<size_t> hidden_;
  std::string interval_site_;
  int phases_ = 0;
  HostShared* previous_;
};

// What the emulation counts of the kernels' global loads (tests: that a path is exercised):
// vector groups read with 16-byte loads and groups read element by element (dtypes.cuh:
// load_group). Host only; the device build counts nothing.
struct EmulationCounts {
  int64_t vector_loads = 0, scalar_loads = 0;
  static EmulationCounts& current() {
    static thread_local EmulationCounts counts;
    return counts;
  }
  FASTPEFT_HD static void count_load(bool vector) {
#ifndef __CUDA_ARCH__
    ++(vector ? current().vector_loads : current().scalar_loads);
#endif
  }
};

struct HostBlock {
  static constexpr int kStates = kBlockThreads;
  static constexpr int kWarpStates = kBlockWarps;
  template <typename F>
  FASTPEFT_HD static void each(F&& f) {
#ifndef __CUDA_ARCH__
    phase([&] {
      for (int tid = 0; tid < kBlockThreads; ++tid) f(tid, tid);
    });
#endif
  }
  // A phase of warp-level work: f(warp, warp) once per warp (one call stands for its 32 lanes).
  template <typename F>
  FASTPEFT_HD static void each_warp(F&& f) {
#ifndef __CUDA_ARCH__
    phase([&] {
      for (int warp = 0; warp < kBlockWarps; ++warp) f(warp, warp);
    });
#endif
  }
  template <typename F>
  static void phase(F&& run) {
    HostShared* shared = HostShared::current();
    if (shared) shared->before_phase();
    run();
    if (shared) shared->after_phase();
  }
  // The call site's file and line name the barrier (HostShared::dropped_barrier).
  FASTPEFT_HD static void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
#ifndef __CUDA_ARCH__
    if (HostShared* shared = HostShared::current()) shared->barrier(file, line);
#endif
  }
};

// The emulation's order of a grid's blocks: 0 runs them in index order, any other value a
// permutation drawn from it (a test's way to show that no result depends on the order a GPU
// happens to run blocks in: emulation_block_order). Host only.
inline uint64_t& emulation_block_order() {
  static uint64_t seed = 0;
  return seed;
}

// Runs f(x, y, z) for every block of an nx x ny x nz grid on the CPU, in emulation_block_order().
template <typename F>
void emulate_grid(int64_t nx, int64_t ny, int64_t nz, F&& f) {
  std::vector<int64_t> order(static_cast<size_t>(nx * ny * nz));
  std::iota(order.begin(), order.end(), int64_t{0});
  if (emulation_block_order() != 0) std::shuffle(order.begin(), order.end(), std::mt19937_64(emulation_block_order()));
  for (int64_t b : order) f(b % nx, b / nx % ny, b / (nx * ny));
}

}  // namespace fastpeft
