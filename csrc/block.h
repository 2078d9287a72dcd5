// A CUDA thread block written once, run two ways: on the GPU (DeviceBlock: each thread runs its
// own share of every phase) and on the CPU (HostBlock: every thread of the block in turn, phase by
// phase), so the tests run the kernels' exact code on CPU memory (the module's *_emulated entry
// points) although no GPU is present.
//
// Rules for code written against a Block B: per-thread state lives in arrays of B::kStates
// entries indexed by the `state` argument (one entry per thread on the host, one register-
// resident entry on the device); B::each(f) calls f(tid, state) for the calling thread
// (device) or for every tid (host); shared memory is a float* the caller provides; phases
// that read what other threads wrote are separated by B::sync() (__syncthreads on the device).
// OPT-IN: no GPU has run the kernels written this way yet.
#pragma once

#include "elementwise.h"

namespace fastpeft {

constexpr int kBlockThreads = 256;  // 8 warps: every kernel here uses 256-thread blocks

struct DeviceBlock {
  static constexpr int kStates = 1;
  template <typename F>
  FASTPEFT_HD static void each(F&& f) {
#ifdef __CUDA_ARCH__
    f(static_cast<int>(threadIdx.x), 0);
#endif
  }
  FASTPEFT_HD static void sync() {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

struct HostBlock {
  static constexpr int kStates = kBlockThreads;
  template <typename F>
  FASTPEFT_HD static void each(F&& f) {
#ifndef __CUDA_ARCH__
    for (int tid = 0; tid < kBlockThreads; ++tid) f(tid, tid);
#endif
  }
  FASTPEFT_HD static void sync() {}
};

}  // namespace fastpeft
