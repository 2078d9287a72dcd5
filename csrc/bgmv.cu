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
//
// Plan. Decode moves A_i and B_i (r_i x K and N x r_i elements per token) once and does 2 FLOPs
// per element loaded: memory-bound, and at T = 1 the whole problem is a few hundred KB, so the
// grids are sized by bytes, not by tokens, to spread it over every SM (132 on an H100):
//   shrink: grid (T, S = ceil(K / 512), ceil(R_max / 4)). A block covers 4 rank rows x 512
//           columns of K: each thread one group of 8 consecutive elements (one 16-byte load of
//           16-bit A, two of fp32; consecutive threads read consecutive groups of a row:
//           coalesced). The 64 group sums of a row are added in thread order through shared
//           memory into the fp32 workspace part[t, s, r] (K = 4096, R_max = 64: 128 blocks).
//   expand: grid (T, ceil(N / cols)), cols = 256 / ceil(R_max / 8) columns of y per block
//           (8 at R_max = 256, 32 at 64, 128 at 16: N = 4096, R_max = 64 gives 128 blocks).
//           The block first adds its token's S partials per rank in slice order (shrunk[r]),
//           then each thread takes one group of 8 consecutive elements of B_i (the rows of B_i
//           are contiguous, so consecutive threads read consecutive 16 bytes) and the groups of
//           a column are added in order through shared memory before y is read and written.
// Every sum runs in a fixed order (groups, threads, slices): no atomics, bitwise reproducible,
// and independent of the grid. A group is loaded with 16-byte loads when it is 16-byte aligned
// and lies inside the row (dtypes.cuh: load_group), else element by element: the same values,
// so odd K, R_max or row strides only cost the vector loads. Padding past r_i is never read.
// Bytes per call: sum over tokens of r_i K + N r_i adapter elements (tokens sharing an adapter
// re-read it, mostly from L2), x and y once each, T S r_i x 4 B of partials written, and read
// back by every expand block of the token (S r_i x 4 B each, from L2).
#include <cuda_runtime.h>

#include <vector>

#include "block.h"
#include "dtypes.cuh"

namespace fastpeft {
namespace {

constexpr int kThreads = kBlockThreads;
// Rank rows per shrink block. A block reads 256 groups of 8 elements whatever the split, so the
// shrink has K R_max / 2048 blocks per token (128 at K = 4096, R_max = 64: about one per SM);
// 4 rows x 512 columns balance the partials each expand block re-reads (K / 512 per rank: 8 at
// K = 4096) against the serial sum of a row's group sums (64 adds; 1 row x 2048 would be 256).
constexpr int kShrinkRows = 4;
constexpr int kGroupsPerRow = kThreads / kShrinkRows;
static_assert(kGroupsPerRow * kVec == kBgmvSliceK, "a shrink block covers one slice of K");
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

// Groups of 8 rank elements per row of B_i, and columns of y per expand block (one group each).
FASTPEFT_HD int64_t rank_groups(int64_t R_max) { return (R_max + kVec - 1) / kVec; }
FASTPEFT_HD int64_t expand_cols(int64_t R_max) { return kThreads / rank_groups(R_max); }

// part[t, slice, r] = sum over k in the slice of x[t, k] A_i[r, k], for the block's 4 rows r.
// smem: kThreads floats (the groups' sums).
template <typename B, typename T, typename W>
FASTPEFT_HD void shrink_block(const BgmvForward& a, int64_t t, int64_t slice, int64_t row_block, float* smem) {
  int64_t rank = 0;
  const int64_t id = row_adapter(a, t, &rank);
  if (id < 0 || row_block * kShrinkRows >= rank) return;
  const T* x = reinterpret_cast<const T*>(a.x) + t * a.ld_x;
  const W* lora_a = reinterpret_cast<const W*>(a.lora_a) + id * a.R_max * a.K;
  B::each([&](int tid, int) {
    const int64_t r = row_block * kShrinkRows + tid / kGroupsPerRow;
    const int64_t k = slice * kBgmvSliceK + (tid % kGroupsPerRow) * kVec;
    float acc = 0.0f;
    if (r < rank && k < a.K) {
      float xv[kVec], av[kVec];
      load_group(x + k, a.K - k, xv);
      load_group(lora_a + r * a.K + k, a.K - k, av);
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc = fmaf(xv[j], av[j], acc);
    }
    smem[tid] = acc;
  });
  B::sync();
  float* part = reinterpret_cast<float*>(a.shrunk) + (t * bgmv_slices(a.K) + slice) * a.R_max;
  B::each([&](int tid, int) {
    const int64_t r = row_block * kShrinkRows + tid;
    if (tid < kShrinkRows && r < rank) {
      float sum = 0.0f;
      for (int g = 0; g < kGroupsPerRow; ++g) sum += smem[tid * kGroupsPerRow + g];
      part[r] = sum;
    }
  });
}

// y[t, n] += scaling_i * sum_r shrunk[r] B_i[n, r] for the block's expand_cols(R_max) columns n.
// smem: kMaxRank floats (shrunk) + kThreads floats (the groups' sums).
template <typename B, typename T, typename W>
FASTPEFT_HD void expand_block(const BgmvForward& a, int64_t t, int64_t col_block, float* smem) {
  int64_t rank = 0;
  const int64_t id = row_adapter(a, t, &rank);
  if (id < 0 || rank == 0) return;
  float* shrunk = smem;
  float* sums = smem + kMaxRank;
  const int64_t slices = bgmv_slices(a.K);
  const float* part = reinterpret_cast<const float*>(a.shrunk) + t * slices * a.R_max;
  B::each([&](int tid, int) {
    for (int64_t r = tid; r < rank; r += kThreads) {
      float v = 0.0f;
      for (int64_t s = 0; s < slices; ++s) v += part[s * a.R_max + r];
      shrunk[r] = v;
    }
  });
  B::sync();
  const int64_t groups = rank_groups(a.R_max), cols = expand_cols(a.R_max);
  const W* lora_b = reinterpret_cast<const W*>(a.lora_b) + id * a.N * a.R_max;
  B::each([&](int tid, int) {
    const int64_t n = col_block * cols + tid / groups, r = (tid % groups) * kVec;
    float acc = 0.0f;
    if (tid < cols * groups && n < a.N && r < rank) {
      float bv[kVec];
      load_group(lora_b + n * a.R_max + r, rank - r, bv);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (r + j < rank) acc = fmaf(shrunk[r + j], bv[j], acc);
      }
    }
    sums[tid] = acc;
  });
  B::sync();
  const float scaling = reinterpret_cast<const float*>(a.scalings)[id];
  B::each([&](int tid, int) {
    const int64_t n = col_block * cols + tid;
    if (tid >= cols || n >= a.N) return;
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; ++g) acc += sums[tid * groups + g];
    T* y = reinterpret_cast<T*>(a.y) + t * a.ld_y + n;
    *y = from_float<T>(to_float(*y) + scaling * acc);
  });
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) bgmv_shrink_kernel(BgmvForward a) {
  __shared__ float smem[kThreads];
  shrink_block<DeviceBlock, T, W>(a, blockIdx.x, blockIdx.y, blockIdx.z, smem);
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) bgmv_expand_kernel(BgmvForward a) {
  __shared__ float smem[kMaxRank + kThreads];
  expand_block<DeviceBlock, T, W>(a, blockIdx.x, blockIdx.y, smem);
}

template <typename T, typename W>
void run(const BgmvForward& a, cudaStream_t s, bool emulate) {
  const int64_t slices = bgmv_slices(a.K);
  const int64_t row_blocks = (a.R_max + kShrinkRows - 1) / kShrinkRows;
  const int64_t col_blocks = (a.N + expand_cols(a.R_max) - 1) / expand_cols(a.R_max);
  if (emulate) {
    HostShared smem(kMaxRank + kThreads);
    emulate_grid(a.T, slices, row_blocks, [&](int64_t t, int64_t sl, int64_t rb) {
      shrink_block<HostBlock, T, W>(a, t, sl, rb, smem.begin_block());
    });
    emulate_grid(a.T, col_blocks, 1, [&](int64_t t, int64_t cb, int64_t) {
      expand_block<HostBlock, T, W>(a, t, cb, smem.begin_block());
    });
    return;
  }
  if (slices > 0) {  // K = 0: no shrink; the expand adds zero-sized sums (y unchanged in value)
    const dim3 grid(static_cast<unsigned>(a.T), static_cast<unsigned>(slices), static_cast<unsigned>(row_blocks));
    bgmv_shrink_kernel<T, W><<<grid, kThreads, 0, s>>>(a);
    check_launch("bgmv_shrink_kernel");
  }
  const dim3 grid(static_cast<unsigned>(a.T), static_cast<unsigned>(col_blocks));
  bgmv_expand_kernel<T, W><<<grid, kThreads, 0, s>>>(a);
  check_launch("bgmv_expand_kernel");
}

void forward(const BgmvForward& args, cudaStream_t s, bool emulate) {
  if (args.R_max < 1 || args.R_max > kMaxRank) throw std::invalid_argument("fastpeft._C bgmv: R_max must be in [1, 256]");
  if (args.T < 0 || args.K < 0 || args.N < 0 || args.L < 0) {
    throw std::invalid_argument("fastpeft._C bgmv: T, K, N and L must be >= 0");
  }
  // Grid limits: y and z dimensions take at most 65535 blocks.
  if (bgmv_slices(args.K) > 65535 || (args.N + expand_cols(args.R_max) - 1) / expand_cols(args.R_max) > 65535) {
    throw std::invalid_argument("fastpeft._C bgmv: K or N too large for the grid (at most 65535 blocks per axis)");
  }
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
