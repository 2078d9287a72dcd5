// Multi-LoRA decode kernel, BGMV style (fastpeft.kernels.multi_lora.cuda_launch): every token
// row t has its own adapter i = adapter_ids[t] and
//   y[t] += scalings[i] * (x[t] A_i[:r_i]^T) B_i[:, :r_i]^T,   r_i = ranks[i].
//
// OPT-IN: no GPU has run these kernels yet. They are compiled for sm_80/sm_90 and checked for
// register spills by `fastpeft check`; select them with FASTPEFT_BACKEND=cuda only until
// tests/test_gpu.py has passed on a GPU.
//
// Safety: an id outside [0, L) (-1 = base model only) leaves its row of y untouched and reads
// no adapter; ranks are clamped to [0, R_max]; so no id or rank reads out of bounds.
// Plan: shrink, one block per token: warp w computes t[r] for r = w, w + 8, ... (lanes stride K,
// fixed-order shuffle reduction) into an fp32 workspace [T, R_max]; expand, one block per
// (token, 256 columns of y): each thread sums r < r_i of t[r] B_i[n, r] in order. The padding of a
// smaller rank is skipped, not multiplied by zeros. Deterministic (no atomics).
#include <cuda_runtime.h>

#include "dtypes.cuh"

namespace fastpeft {
namespace {

constexpr int kThreads = 256;  // 8 warps: 8 rank rows in flight per token in the shrink
constexpr int kWarps = kThreads / 32;
// Most R_max the expand stages in shared memory (the multi-LoRA op's ranks go to 256).
constexpr int kMaxRank = 256;

// The adapter of row t, or -1 if its id is outside [0, L); its rank clamped to [0, R_max].
__device__ __forceinline__ int64_t row_adapter(const BgmvForward& a, int64_t t, int64_t* rank) {
  const int64_t id = reinterpret_cast<const int64_t*>(a.adapter_ids)[t];
  if (id < 0 || id >= a.L) return -1;
  const int64_t r = reinterpret_cast<const int64_t*>(a.ranks)[id];
  *rank = r < 0 ? 0 : (r > a.R_max ? a.R_max : r);
  return id;
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) bgmv_shrink_kernel(BgmvForward a) {
  const int64_t t = blockIdx.x;
  int64_t rank = 0;
  const int64_t id = row_adapter(a, t, &rank);
  if (id < 0) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* x = reinterpret_cast<const T*>(a.x) + t * a.ld_x;
  const W* lora_a = reinterpret_cast<const W*>(a.lora_a) + id * a.R_max * a.K;
  float* shrunk = reinterpret_cast<float*>(a.shrunk) + t * a.R_max;
  for (int64_t r = warp; r < rank; r += kWarps) {
    const W* a_row = lora_a + r * a.K;
    float acc = 0.0f;
    for (int64_t k = lane; k < a.K; k += 32) acc = fmaf(to_float(x[k]), to_float(a_row[k]), acc);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) shrunk[r] = acc;
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) bgmv_expand_kernel(BgmvForward a) {
  __shared__ float ts[kMaxRank];
  const int64_t t = blockIdx.x;
  int64_t rank = 0;
  const int64_t id = row_adapter(a, t, &rank);
  if (id < 0) return;
  const float* shrunk = reinterpret_cast<const float*>(a.shrunk) + t * a.R_max;
  for (int64_t r = threadIdx.x; r < rank; r += kThreads) ts[r] = shrunk[r];
  __syncthreads();
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (n >= a.N) return;
  const W* b_row = reinterpret_cast<const W*>(a.lora_b) + (id * a.N + n) * a.R_max;
  float acc = 0.0f;
  for (int64_t r = 0; r < rank; ++r) acc = fmaf(ts[r], to_float(b_row[r]), acc);
  T* y = reinterpret_cast<T*>(a.y) + t * a.ld_y + n;
  *y = from_float<T>(to_float(*y) + reinterpret_cast<const float*>(a.scalings)[id] * acc);
}

template <typename T, typename W>
void launch(const BgmvForward& args, cudaStream_t s) {
  bgmv_shrink_kernel<T, W><<<static_cast<unsigned>(args.T), kThreads, 0, s>>>(args);
  check_launch("bgmv_shrink_kernel");
  const dim3 grid(static_cast<unsigned>(args.T), static_cast<unsigned>((args.N + kThreads - 1) / kThreads));
  bgmv_expand_kernel<T, W><<<grid, kThreads, 0, s>>>(args);
  check_launch("bgmv_expand_kernel");
}

}  // namespace

void bgmv_forward(const BgmvForward& args, uintptr_t stream) {
  if (args.R_max < 1 || args.R_max > kMaxRank) throw std::invalid_argument("fastpeft._C bgmv: R_max must be in [1, 256]");
  if (args.T == 0 || args.N == 0 || args.L == 0) return;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  // The (x, adapter) dtype pairs: adapters in x's dtype, or fp32 adapters on 16-bit x
  // (five instantiations per kernel).
  with_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (args.lora_dtype == args.dtype) return launch<T, T>(args, s);
    if (args.lora_dtype == DType::kFloat32) return launch<T, float>(args, s);
    throw std::invalid_argument("fastpeft._C bgmv: lora_a/lora_b must have x's dtype or float32");
  });
}

}  // namespace fastpeft
