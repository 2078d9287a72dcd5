// Multi-LoRA decode kernel, BGMV style (fastpeft.kernels.multi_lora.cuda_launch): every token
// row t has its own adapter i = adapter_ids[t] and
//   y[t] += scalings[i] * (x[t] A_i[:r_i]^T) B_i[:, :r_i]^T,   r_i = clamp(ranks[i], 0, R_max).
//
// OPT-IN: no GPU has run these kernels yet. They are compiled for sm_80/sm_90 and checked for
// register spills by `fastpeft check --cuda`; select them with FASTPEFT_BACKEND=cuda only until
// tests/test_gpu.py has passed on a GPU. Each kernel's body is written once against a Block
// (block.h) and also runs on the CPU (bgmv_forward_emulated), which is how the tests check it.
//
// Safety: an id outside [0, L) (-1 = base model only) leaves its row of y untouched and reads
// no adapter; ranks are clamped to [0, R_max]; so no id or rank reads out of bounds.
// Plan: shrink, one block per token: warp w computes t[r] for r = w, w + 8, ... (lanes stride K)
// and the 32 lane sums are added in lane order through shared memory, into an fp32 workspace
// [T, R_max]; expand, one block per (token, 256 columns of y): each thread adds r < r_i of
// t[r] B_i[n, r] in order. The padding of a smaller rank is skipped, not multiplied by zeros.
// Deterministic (no atomics).
#include <cuda_runtime.h>

#include <vector>

#include "block.h"
#include "dtypes.cuh"

namespace fastpeft {
namespace {

constexpr int kThreads = kBlockThreads;
constexpr int kWarps = kThreads / 32;  // rank rows in flight per token in the shrink
// Most R_max the kernels take (the multi-LoRA op's ranks go to 256).
constexpr int kMaxRank = 256;

// The adapter of row t, or -1 if its id is outside [0, L); its rank clamped to [0, R_max].
FASTPEFT_HD int64_t row_adapter(const BgmvForward& a, int64_t t, int64_t* rank) {
  const int64_t id = reinterpret_cast<const int64_t*>(a.adapter_ids)[t];
  if (id < 0 || id >= a.L) return -1;
  const int64_t r = reinterpret_cast<const int64_t*>(a.ranks)[id];
  *rank = r < 0 ? 0 : (r > a.R_max ? a.R_max : r);
  return id;
}

// smem: kThreads floats (the lanes' partial sums).
template <typename B, typename T, typename W>
FASTPEFT_HD void shrink_block(const BgmvForward& a, int64_t t, float* smem) {
  int64_t rank = 0;
  const int64_t id = row_adapter(a, t, &rank);
  if (id < 0) return;
  const T* x = reinterpret_cast<const T*>(a.x) + t * a.ld_x;
  const W* lora_a = reinterpret_cast<const W*>(a.lora_a) + id * a.R_max * a.K;
  float* shrunk = reinterpret_cast<float*>(a.shrunk) + t * a.R_max;
  for (int64_t r0 = 0; r0 < rank; r0 += kWarps) {
    B::each([&](int tid, int) {
      const int64_t r = r0 + tid / 32;
      float acc = 0.0f;
      if (r < rank) {
        const W* a_row = lora_a + r * a.K;
        for (int64_t k = tid % 32; k < a.K; k += 32) acc = fmaf(to_float(x[k]), to_float(a_row[k]), acc);
      }
      smem[tid] = acc;
    });
    B::sync();
    B::each([&](int tid, int) {
      const int64_t r = r0 + tid / 32;
      if (tid % 32 == 0 && r < rank) {
        float sum = 0.0f;
        for (int lane = 0; lane < 32; ++lane) sum += smem[tid + lane];
        shrunk[r] = sum;
      }
    });
    B::sync();
  }
}

// smem: R_max floats (the token's shrunk row).
template <typename B, typename T, typename W>
FASTPEFT_HD void expand_block(const BgmvForward& a, int64_t t, int64_t n_block, float* smem) {
  int64_t rank = 0;
  const int64_t id = row_adapter(a, t, &rank);
  if (id < 0) return;
  const float* shrunk = reinterpret_cast<const float*>(a.shrunk) + t * a.R_max;
  B::each([&](int tid, int) {
    for (int64_t r = tid; r < rank; r += kThreads) smem[r] = shrunk[r];
  });
  B::sync();
  const float scaling = reinterpret_cast<const float*>(a.scalings)[id];
  B::each([&](int tid, int) {
    const int64_t n = n_block * kThreads + tid;
    if (n >= a.N) return;
    const W* b_row = reinterpret_cast<const W*>(a.lora_b) + (id * a.N + n) * a.R_max;
    float acc = 0.0f;
    for (int64_t r = 0; r < rank; ++r) acc = fmaf(smem[r], to_float(b_row[r]), acc);
    T* y = reinterpret_cast<T*>(a.y) + t * a.ld_y + n;
    *y = from_float<T>(to_float(*y) + scaling * acc);
  });
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) bgmv_shrink_kernel(BgmvForward a) {
  __shared__ float smem[kThreads];
  shrink_block<DeviceBlock, T, W>(a, blockIdx.x, smem);
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) bgmv_expand_kernel(BgmvForward a) {
  __shared__ float smem[kMaxRank];
  expand_block<DeviceBlock, T, W>(a, blockIdx.x, blockIdx.y, smem);
}

template <typename T, typename W>
void run(const BgmvForward& a, cudaStream_t s, bool emulate) {
  const int64_t n_blocks = (a.N + kThreads - 1) / kThreads;
  if (emulate) {
    HostShared smem(kThreads > kMaxRank ? kThreads : kMaxRank);
    for (int64_t t = 0; t < a.T; ++t) shrink_block<HostBlock, T, W>(a, t, smem.begin_block());
    for (int64_t t = 0; t < a.T; ++t)
      for (int64_t nb = 0; nb < n_blocks; ++nb) expand_block<HostBlock, T, W>(a, t, nb, smem.begin_block());
    return;
  }
  bgmv_shrink_kernel<T, W><<<static_cast<unsigned>(a.T), kThreads, 0, s>>>(a);
  check_launch("bgmv_shrink_kernel");
  const dim3 grid(static_cast<unsigned>(a.T), static_cast<unsigned>(n_blocks));
  bgmv_expand_kernel<T, W><<<grid, kThreads, 0, s>>>(a);
  check_launch("bgmv_expand_kernel");
}

void forward(const BgmvForward& args, cudaStream_t s, bool emulate) {
  if (args.R_max < 1 || args.R_max > kMaxRank) throw std::invalid_argument("fastpeft._C bgmv: R_max must be in [1, 256]");
  if (args.T == 0 || args.N == 0 || args.L == 0) return;
  // The (x, adapter) dtype pairs: adapters in x's dtype, or fp32 adapters on 16-bit x
  // (five instantiations per kernel).
  with_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (args.lora_dtype == args.dtype) return run<T, T>(args, s, emulate);
    if (args.lora_dtype == DType::kFloat32) return run<T, float>(args, s, emulate);
    throw std::invalid_argument("fastpeft._C bgmv: lora_a/lora_b must have x's dtype or float32");
  });
}

}  // namespace

void bgmv_forward(const BgmvForward& args, uintptr_t stream) { forward(args, reinterpret_cast<cudaStream_t>(stream), false); }

void bgmv_forward_emulated(const BgmvForward& args) { forward(args, nullptr, true); }

}  // namespace fastpeft
