// Fused bottleneck adapter forward and backward (fastpeft.kernels.bottleneck.cuda_launch):
//   out = residual + scaling * (act(dropout(h) W_down^T + b_down) W_up^T + b_up).
//
// OPT-IN: no GPU has run these kernels yet. They are compiled for sm_80/sm_90 and checked for
// register spills (and the tensor-core forward for HMMA instructions) by `fastpeft check --cuda`,
// and their per-element math (elementwise.h) is tested on the CPU; select them with
// FASTPEFT_BACKEND=cuda only until tests/test_gpu.py has passed on a GPU.
// Each kernel's body is written once against a Block (block.h) and also runs on the CPU, thread
// by thread (bottleneck_*_emulated), which is how the tests check the kernels' own code.
//
// Plan (fp32 accumulation throughout):
//   16-bit h, tensor cores (tensor_core.h; "Tensor-core row kernels" below): one block per 32
//             rows runs both products of the forward (dropout(h) W_down^T, act(z) W_up^T) and of
//             the backward's row step (dout W_up, dz W_down) with wmma m16n16k16, operands staged
//             32 deep as 16-bit in shared memory (16-byte loads and stores, conflict-free
//             pitches), fp32 tiles through shared memory to the epilogues.
//             Per block: 2 x 2 x 32 x D x Rk FLOPs on HMMA (Rk: R rounded up to 32); bytes: its
//             rows of h (dout) and out (dh) once, z/dz once, W_down and W_up once per block
//             (from L2 after the first blocks).
//   fp32 h, CUDA cores (tf32 products would round h, which the fp32 contract does not allow):
//             one block per kRows rows. Down: the rows' dropped h and W_down are staged kChunk
//             columns at a time in shared memory; each thread owns a few (row, r) dot products.
//             The activations stay in shared memory; up: each thread owns columns d of out. The
//             backward's row step is the same kernel on dout with the weights' roles swapped.
//   backward, weight gradients: a tiled kernel forms per-split fp32 partial sums of
//             dout^T act(z) and dz^T dropout(h) (and the bias sums, exact fp32), which the
//             launcher adds in a fixed order: no float atomics, bitwise reproducible. 16-bit h:
//             the products on tensor cores (outer_tc_block; act(z) and dz rounded to h's dtype
//             for them); fp32 h: CUDA cores (outer_block).
#include <cuda_runtime.h>

#include <string>
#include <type_traits>
#include <vector>

#include "block.h"
#include "dtypes.cuh"
#include "elementwise.h"
#include "tensor_core.h"

namespace fastpeft {
namespace {

constexpr int kThreads = kBlockThreads;                         // 8 warps per block
constexpr int kRows = static_cast<int>(kRowBlock);              // rows of h per row-kernel block
constexpr int kChunk = 32;                                      // columns staged per step: 8 Philox groups of 4
constexpr int kChunkPad = kChunk + 1;                           // odd row pitch: no bank conflicts on ws[r][j]
constexpr int kMaxRank = static_cast<int>(kBottleneckMaxRank);
constexpr int kAccPerThread = kRows * kMaxRank / kThreads;      // (row, r) dot products per thread at R = 256
constexpr int kOuterTile = static_cast<int>(kOuterTileSize);   // d x r tile of the weight-gradient kernel
constexpr int kOuterSub = kOuterTile / 16;                      // 4 x 4 outputs per thread (16 x 16 threads)
constexpr int kOuterM = static_cast<int>(kOuterRows);           // rows staged per step there
constexpr int kOuterSmemFloats = kOuterM * kOuterTile + kOuterM * (kOuterTile + 1);  // ps + qs

// Shared memory of the row kernels, in floats: staging (xs + ws), reused for the [kRows, R]
// bottleneck activations, plus kThreads floats for the block reduction of ds.
FASTPEFT_HD constexpr int64_t row_smem_floats(int64_t R) {
  return ((kRows * kChunk + R * kChunkPad) > kRows * R ? (kRows * kChunk + R * kChunkPad) : kRows * R) + kThreads;
}
static_assert(row_smem_floats(kMaxRank) * 4 <= 48 * 1024, "row kernel must fit the default 48 KB");

FASTPEFT_HD uint64_t load_seed(const Dropout& dropout) {
  return dropout.seed_ptr ? static_cast<uint64_t>(*reinterpret_cast<const int64_t*>(dropout.seed_ptr)) : 0;
}

FASTPEFT_HD float load_scaling(const Scaling& s) {
  return s.scale_ptr ? *reinterpret_cast<const float*>(s.scale_ptr) : s.value;
}

template <typename W>
FASTPEFT_HD float load_bias(const Vector& b, int64_t i) {
  return b.ptr ? to_float(reinterpret_cast<const W*>(b.ptr)[i * b.stride]) : 0.0f;
}

// v[0..3], columns d .. d+3 of row m (one Philox group: d a multiple of 4), times the dropout
// mask's keep / (1 - p) when dropout is on.
FASTPEFT_HD void drop_group4(float* v, int64_t m, int64_t d, int64_t D, const Dropout& dropout, uint64_t seed) {
  if (!dropout.seed_ptr) return;
  const Philox4 bits = philox4x32(dropout_counter(m, d, D), seed);
#pragma unroll
  for (int l = 0; l < 4; ++l) v[l] = keep_bits(philox_lane(bits, l), dropout.threshold) ? v[l] * dropout.inv_keep : 0.0f;
}

// Stages 4 columns d .. d+3 of row m of src (d a multiple of 4), dropped and scaled when dropout
// is on, zero outside [0, M) x [0, D), into dst[0..3].
template <typename T>
FASTPEFT_HD void stage_group(const Matrix& src, int64_t m, int64_t d, int64_t M, int64_t D, const Dropout& dropout,
                             uint64_t seed, float* dst) {
  const T* x = reinterpret_cast<const T*>(src.ptr);
#pragma unroll
  for (int l = 0; l < 4; ++l) dst[l] = m < M && d + l < D ? to_float(x[m * src.s0 + (d + l) * src.s1]) : 0.0f;
  if (m < M) drop_group4(dst, m, d, D, dropout, seed);
}

// v = columns d .. d+7 of row m of src (d a multiple of 8) as stage_group has them: 16-byte
// loads along a unit stride (dtypes.cuh: load_row_group).
template <typename T>
FASTPEFT_HD void load_dropped_group(const Matrix& src, int64_t m, int64_t d, int64_t M, int64_t D,
                                    const Dropout& dropout, uint64_t seed, float (&v)[kVec]) {
  if (m >= M) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = 0.0f;
    return;
  }
  load_row_group<T>(src, m, d, D, v);
  drop_group4(v, m, d, D, dropout, seed);
  drop_group4(v + 4, m, d + 4, D, dropout, seed);
}

// acc[state][k] (k-th (row, r) pair of thread tid, o = tid + k * kThreads, row = o / R, r = o % R)
// = sum_d keep(m, d) * src(m0 + row, d) * w(r, d), src [M, D] and w [R, D] as Matrix views.
// Sums run over d in increasing order in fp32. Ends with shared memory free for reuse.
template <typename B, typename T, typename W>
FASTPEFT_HD void project_down(const Matrix& src, int64_t m0, int64_t M, int64_t D, int R, const Matrix& w,
                              const Dropout& dropout, uint64_t seed, float* smem, float (*acc)[kAccPerThread]) {
  float* xs = smem;                    // [kRows][kChunk]
  float* ws = smem + kRows * kChunk;   // [R][kChunkPad]
  const W* wp = reinterpret_cast<const W*>(w.ptr);
  const bool r_fastest = w.s0 == 1 && w.s1 != 1;  // stage along the unit stride, so the loads coalesce
  B::each([&](int, int s) {
#pragma unroll
    for (int k = 0; k < kAccPerThread; ++k) acc[s][k] = 0.0f;
  });
  for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
    B::each([&](int tid, int) {
      // The first kRows * kChunk / 4 threads stage one group of 4 columns each.
      if (tid < kRows * kChunk / 4) {
        const int row = tid / (kChunk / 4), j = (tid % (kChunk / 4)) * 4;
        stage_group<T>(src, m0 + row, d0 + j, M, D, dropout, seed, xs + row * kChunk + j);
      }
      for (int i = tid; i < R * kChunk; i += kThreads) {
        const int r = r_fastest ? i % R : i / kChunk, j = r_fastest ? i / R : i % kChunk;
        const int64_t d = d0 + j;
        ws[r * kChunkPad + j] = d < D ? to_float(wp[r * w.s0 + d * w.s1]) : 0.0f;
      }
    });
    B::sync();
    B::each([&](int tid, int s) {
#pragma unroll
      for (int k = 0; k < kAccPerThread; ++k) {
        const int o = tid + k * kThreads;
        if (o < kRows * R) {
          const float* x_row = xs + (o / R) * kChunk;
          const float* w_row = ws + (o % R) * kChunkPad;
#pragma unroll 8
          for (int j = 0; j < kChunk; ++j) acc[s][k] = fmaf(x_row[j], w_row[j], acc[s][k]);
        }
      }
    });
    B::sync();
  }
}

// For every row of the block and every column d (thread-strided): epilogue(row, d, sum_r
// cs[row, r] * v(d, r)), v [D, R] as a Matrix view, sums over r in increasing order.
template <typename B, typename W, typename Epilogue>
FASTPEFT_HD void project_up(const float* cs, int R, int64_t D, const Matrix& v, Epilogue&& epilogue) {
  const W* vp = reinterpret_cast<const W*>(v.ptr);
  B::each([&](int tid, int) {
    for (int64_t d = tid; d < D; d += kThreads) {
      float acc[kRows];
#pragma unroll
      for (int row = 0; row < kRows; ++row) acc[row] = 0.0f;
      for (int r = 0; r < R; ++r) {
        const float vr = to_float(vp[d * v.s0 + r * v.s1]);
#pragma unroll
        for (int row = 0; row < kRows; ++row) acc[row] = fmaf(cs[row * R + r], vr, acc[row]);
      }
#pragma unroll
      for (int row = 0; row < kRows; ++row) epilogue(row, d, acc[row]);
    }
  });
}

// The forward of rows [block * kRows, ...) (launchers.h: BottleneckForward).
template <typename B, typename T, typename W>
FASTPEFT_HD void forward_block(const BottleneckForward& a, int64_t block, float* smem) {
  const int R = static_cast<int>(a.R);
  const int64_t m0 = block * kRows;
  float acc[B::kStates][kAccPerThread];
  project_down<B, T, W>(a.h, m0, a.M, a.D, R, a.w_down, a.dropout, load_seed(a.dropout), smem, acc);
  float* cs = smem;  // [kRows][R] activations
  float* z = reinterpret_cast<float*>(a.z);
  B::each([&](int tid, int s) {
#pragma unroll
    for (int k = 0; k < kAccPerThread; ++k) {
      const int o = tid + k * kThreads;
      if (o < kRows * R) {
        const int64_t m = m0 + o / R;
        const float zv = acc[s][k] + load_bias<W>(a.b_down, o % R);
        if (m < a.M) z[m * R + o % R] = zv;
        cs[o] = m < a.M ? activate(a.activation, zv) : 0.0f;
      }
    }
  });
  B::sync();
  const Matrix res = a.residual.ptr ? a.residual : a.h;
  const T* res_p = reinterpret_cast<const T*>(res.ptr);
  T* out = reinterpret_cast<T*>(a.out);
  const float scaling = load_scaling(a.scaling);
  project_up<B, W>(cs, R, a.D, a.w_up, [&](int row, int64_t d, float u) {
    const int64_t m = m0 + row;
    if (m < a.M) {
      u += load_bias<W>(a.b_up, d);
      out[m * a.D + d] = from_float<T>(to_float(res_p[m * res.s0 + d * res.s1]) + scaling * u);
    }
  });
}

// ---- Tensor-core row kernels (16-bit h; tensor_core.h) ----
// One block per kTcRows rows; 8 warps. Both row kernels are two products with fp32 accumulation:
//   down: acc[32, Rk] = rows(src) Wd, Wd [D, Rk], in kTcStep-deep steps: each step stages the rows
//         (dropped when dropout is on) and the step's rows of the weight operand as 16-bit in
//         shared memory (16-byte loads and stores), then each warp adds 2 mma k-steps into its
//         accumulator tiles (tile t of warp w is tile w + 8 t of the 2 x Rk/16 grid); the fp32
//         tiles then go through shared memory (zs) to the kernel's epilogue, which keeps a 16-bit
//         [32, Rk] operand (cs) for
//   up:   per kTcUpCols output columns, out[32, 128] = cs Wu, Wu [Rk, 128], in the same steps
//         over Rk, then the fp32 tile goes through shared memory (os) to the kernel's epilogue,
//         8 columns per thread, 16-byte stores.
// forward:  src = h (dropout), Wd = W_down^T (W_down's rows staged as they are: ColMajor),
//           epilogue z = acc + b_down, cs = act(z); Wu = W_up^T (W_up's rows: ColMajor), epilogue
//           out = residual + scaling * (u + b_up).
// backward: src = dout, Wd = W_up (rows d staged along r: RowMajor), epilogue dz = scaling * acc *
//           act'(z), ds, cs = dz; Wu = W_down (rows r along d: RowMajor), epilogue dh = dropout'(u)
//           (+ dout). fp32 weights, act(z) and dz are rounded to h's dtype for the products (one
//           rounding each, within the 16-bit tests' tolerance of 4 unit roundoffs per element).
// Every staged operand is read along its unit stride, so the loads coalesce; a strided view
// (no unit column stride) is read element by element (dtypes.cuh: load_row_group).
// Rows per block: 2 mma row tiles. Every block reads both weights, so the rows per block set
// the L2 traffic: at M = 8192, D = 4096, R = 256 in bf16 (34 GFLOP, 8.4 M HMMA, 143 MB of DRAM
// at the least) the 256 blocks read 1.07 GB of weights from L2, likely the bound (est. ~150 us
// at ~7 TB/s against ~70 us of HMMA). 64 rows would halve it for twice the shared memory
// (~101 KB: one block per SM on an A100) and the accumulator registers (64 at R = 256): a GPU
// measurement should decide.
constexpr int kTcRows = 32;
constexpr int kTcRowTiles = kTcRows / kMmaTile;
constexpr int kTcStep = 32;                      // reduction depth staged per step: 2 mma k-steps
// 16-bit staging pitches are the width + 8 (widths multiples of 32): rows are an odd number of
// 16 B chunks long (80 B at width 32), so any 8 consecutive rows' 16-byte chunks fall on distinct
// banks (the fragment loads read 8 rows x 16 B at a time), and every tile stays 32-byte aligned.
constexpr int kTcPad16 = 8;
constexpr int kTcPitch = kTcStep + kTcPad16;
// fp32 pitches are the width + 8: the accumulator stores (8 B per lane, 4 rows per half-warp)
// then hit 4 distinct 32-byte bank ranges.
constexpr int kTcF32Pad = 8;
constexpr int kTcUpCols = 128;                   // output columns per up step: 8 tiles, 2 per warp
constexpr int kTcDownTiles = kTcRowTiles * (kMaxRank / kMmaTile) / kBlockWarps;  // 4 per warp at Rk = 256
constexpr int kTcUpTiles = kTcRowTiles * (kTcUpCols / kMmaTile) / kBlockWarps;   // 2 per warp

// R rounded up to whole steps (the padding holds zero weights).
FASTPEFT_HD constexpr int tc_rank(int64_t R) { return static_cast<int>((R + kTcStep - 1) / kTcStep * kTcStep); }
FASTPEFT_HD constexpr int64_t tc_max(int64_t a, int64_t b) { return a > b ? a : b; }
// The 16-bit weight operand of an up step: kTcUpCols x kTcStep either way round.
constexpr int64_t kTcUpStageFloats = tc_max(kTcUpCols * kTcPitch, kTcStep * (kTcUpCols + kTcPad16)) / 2;
// Shared memory (floats): a region reused by the down staging (rows + weight step, either
// layout), the fp32 zs tile and the up step (weight step + fp32 os tile), 32-byte aligned;
// then cs [kTcRows][Rk + 8] (16-bit); the backward adds kTcRowTiles x kThreads floats for ds.
FASTPEFT_HD constexpr int64_t tc_region_floats(int Rk) {
  return (tc_max(tc_max((kTcRows * kTcPitch + tc_max(Rk * kTcPitch, kTcStep * (Rk + kTcPad16))) / 2,
                        kTcRows * (Rk + kTcF32Pad)),
                 kTcUpStageFloats + kTcRows * (kTcUpCols + kTcF32Pad)) + 7) / 8 * 8;
}
FASTPEFT_HD constexpr int64_t tc_smem_floats(int64_t R, bool backward) {
  return tc_region_floats(tc_rank(R)) + kTcRows * (tc_rank(R) + kTcPad16) / 2 + (backward ? kTcRowTiles * kThreads : 0);
}
// 52,736 B at R = 256 (backward): above the 48 KB default, so the launch opts in (an A100
// takes up to 163 KB per block).
static_assert(tc_smem_floats(kMaxRank, true) * 4 <= 160 * 1024, "tensor-core kernels must fit an A100's shared memory");

// The warp's tile t of a grid of row_tiles x col_tiles tiles: (row tile, col tile), or false
// when the grid has no such tile (warp-uniform). Tile t of warp w is tile w + 8 t.
FASTPEFT_HD bool tc_tile(int warp, int t, int row_tiles, int col_tiles, int* rt, int* ct) {
  const int tile = warp + t * kBlockWarps;
  *rt = tile % row_tiles;
  *ct = tile / row_tiles;
  return *ct < col_tiles;
}

// acc[tile] (zeroed first when `first`) += A[tile rows, 0:depth] B[0:depth, tile cols] over the
// warp's tiles of a row_tiles x col_tiles grid: A at a in layout LA (pitch lda), B at b in
// layout LB (pitch ldb), 16-bit in shared memory. (Zeroing here rather than in a phase of its
// own keeps one phase per step.)
template <typename Mma, typename LA, typename LB, typename T, int kTiles>
FASTPEFT_HD void tc_step(typename Mma::Acc (&acc)[kTiles], bool first, int warp, int row_tiles, int col_tiles,
                         int depth, const T* a, int lda, const T* b, int ldb) {
  constexpr bool a_rows = std::is_same<LA, RowMajor>::value, b_rows = std::is_same<LB, RowMajor>::value;
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    int rt, ct;
    if (!tc_tile(warp, t, row_tiles, col_tiles, &rt, &ct)) continue;
    if (first) Mma::zero(acc[t]);
    for (int k = 0; k < depth; k += kMmaTile) {
      typename Mma::template FragA<T, LA> fa;
      typename Mma::template FragB<T, LB> fb;
      const int i0 = rt * kMmaTile, j0 = ct * kMmaTile;
      Mma::template load_a<LA>(fa, a_rows ? a + i0 * lda + k : a + k * lda + i0, lda);
      Mma::template load_b<LB>(fb, b_rows ? b + k * ldb + j0 : b + j0 * ldb + k, ldb);
      Mma::mma(acc[t], fa, fb);
    }
  }
}

// The warp's accumulator tiles into the fp32 [row_tiles x 16][ld] tile at dst.
template <typename Mma, int kTiles>
FASTPEFT_HD void tc_store(const typename Mma::Acc (&acc)[kTiles], int warp, int row_tiles, int col_tiles, float* dst,
                          int ld) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    int rt, ct;
    if (tc_tile(warp, t, row_tiles, col_tiles, &rt, &ct)) {
      Mma::store(dst + rt * kMmaTile * ld + ct * kMmaTile, acc[t], ld);
    }
  }
}

// Thread tid's share of staging rows [row0, row0 + rows) x columns [c0, c0 + width) of src (a
// Matrix view of E) into dst [rows][ld] as T, zero where a row >= valid_rows or a column >= cols:
// one 8-element group per thread and step of kThreads, 16-byte loads and stores.
template <typename T, typename E>
FASTPEFT_HD void tc_stage_rows(int tid, T* dst, int ld, int rows, int width, const Matrix& src, int64_t row0,
                               int64_t valid_rows, int64_t c0, int64_t cols) {
  const int groups = width / kVec;
  for (int g = tid; g < rows * groups; g += kThreads) {
    const int row = g / groups, j = g % groups * kVec;
    float v[kVec] = {};
    if (row0 + row < valid_rows) load_row_group<E>(src, row0 + row, c0 + j, cols, v);
    store_group(dst + row * ld + j, kVec, v);
  }
}

// The weight operand of a step in layout L: ColMajor stages kTcStep columns [k0, k0 + kTcStep) of
// `width` rows [n0, ...) of w (w's rows are outputs n); RowMajor stages kTcStep rows [k0, ...) of
// w, `width` columns [n0, ...) each (w's rows are inputs k). valid_n / valid_k bound n and k.
template <typename L, typename T, typename W>
FASTPEFT_HD void tc_stage_weight(int tid, T* dst, int width, const Matrix& w, int64_t n0, int64_t valid_n, int64_t k0,
                                 int64_t valid_k) {
  if (std::is_same<L, ColMajor>::value) {
    tc_stage_rows<T, W>(tid, dst, kTcPitch, width, kTcStep, w, n0, valid_n, k0, valid_k);
  } else {
    tc_stage_rows<T, W>(tid, dst, width + kTcPad16, kTcStep, width, w, k0, valid_k, n0, valid_n);
  }
}

// Leading dimension of a staged weight step of `width` outputs in layout L.
template <typename L>
FASTPEFT_HD constexpr int tc_weight_ld(int width) {
  return std::is_same<L, ColMajor>::value ? kTcPitch : width + kTcPad16;
}

// Down: the block's zs [kTcRows][Rk + 8] (fp32, at smem) = rows [m0, m0 + kTcRows) of src,
// dropped when dropout is on, times w (outputs r < R, inputs d < D, layout L), sums over d in
// steps of kTcStep. Ends after a barrier, with zs ready and the rest of the region free.
template <typename B, typename L, typename T, typename W>
FASTPEFT_HD void tc_down(const Matrix& src, int64_t m0, int64_t M, int64_t D, const Dropout& dropout, uint64_t seed,
                         const Matrix& w, int R, float* smem) {
  using Mma = typename MmaOf<B>::type;
  const int Rk = tc_rank(R), rank_tiles = Rk / kMmaTile;
  T* xs = reinterpret_cast<T*>(smem);  // [kTcRows][kTcPitch] rows of src, one step
  T* ws = xs + kTcRows * kTcPitch;     // the weight step, layout L
  typename Mma::Acc acc[B::kWarpStates][kTcDownTiles];
  for (int64_t d0 = 0; d0 == 0 || d0 < D; d0 += kTcStep) {  // once at least: D = 0 gives zeros
    B::each([&](int tid, int) {
      if (tid < kTcRows * kTcStep / kVec) {  // the rows: one group per thread
        const int row = tid / (kTcStep / kVec), j = tid % (kTcStep / kVec) * kVec;
        float v[kVec];
        load_dropped_group<T>(src, m0 + row, d0 + j, M, D, dropout, seed, v);
        store_group(xs + row * kTcPitch + j, kVec, v);
      }
      tc_stage_weight<L, T, W>(tid, ws, Rk, w, 0, R, d0, D);
    });
    B::sync();
    B::each_warp([&](int warp, int s) {
      tc_step<Mma, RowMajor, L>(acc[s], d0 == 0, warp, kTcRowTiles, rank_tiles, kTcStep, xs, kTcPitch, ws,
                                tc_weight_ld<L>(Rk));
    });
    B::sync();
  }
  B::each_warp([&](int warp, int s) { tc_store<Mma>(acc[s], warp, kTcRowTiles, rank_tiles, smem, Rk + kTcF32Pad); });
  B::sync();
}

// Up: for each kTcUpCols columns n0 of the output, u[kTcRows][kTcUpCols] = cs [kTcRows][Rk]
// (16-bit, pitch Rk + 8) times w (outputs d < D, inputs r < R, layout L), then epilogue(m, d,
// u[0..7]) for each group of 8 columns d < D of each row m = m0 + row < M (thread-strided).
template <typename B, typename L, typename T, typename W, typename Epilogue>
FASTPEFT_HD void tc_up(const T* cs, int64_t m0, int64_t M, int64_t D, const Matrix& w, int R, float* smem,
                       Epilogue&& epilogue) {
  using Mma = typename MmaOf<B>::type;
  constexpr int kColTiles = kTcUpCols / kMmaTile, kGroupsPerRow = kTcUpCols / kVec, os_ld = kTcUpCols + kTcF32Pad;
  const int Rk = tc_rank(R);
  T* vs = reinterpret_cast<T*>(smem);      // the weight step, layout L
  float* os = smem + kTcUpStageFloats;     // [kTcRows][os_ld] the output tile
  for (int64_t n0 = 0; n0 < D; n0 += kTcUpCols) {
    typename Mma::Acc up[B::kWarpStates][kTcUpTiles];
    for (int r0 = 0; r0 < Rk; r0 += kTcStep) {
      B::each([&](int tid, int) { tc_stage_weight<L, T, W>(tid, vs, kTcUpCols, w, n0, D, r0, R); });
      B::sync();
      B::each_warp([&](int warp, int s) {
        tc_step<Mma, RowMajor, L>(up[s], r0 == 0, warp, kTcRowTiles, kColTiles, kTcStep, cs + r0, Rk + kTcPad16, vs,
                                  tc_weight_ld<L>(kTcUpCols));
      });
      B::sync();
    }
    B::each_warp([&](int warp, int s) { tc_store<Mma>(up[s], warp, kTcRowTiles, kColTiles, os, os_ld); });
    B::sync();
    B::each([&](int tid, int) {
      for (int g = tid; g < kTcRows * kGroupsPerRow; g += kThreads) {
        const int row = g / kGroupsPerRow, j = g % kGroupsPerRow * kVec;
        const int64_t m = m0 + row, d = n0 + j;
        if (m >= M || d >= D) continue;
        float u[kVec];
#pragma unroll
        for (int l = 0; l < kVec; ++l) u[l] = os[row * os_ld + j + l];
        epilogue(m, d, u);
      }
    });
    // The next step's staging overwrites vs, which this interval's first phase (the tile
    // store) did not read: the emulation's write-after-read rule still wants a barrier here.
    B::sync();
  }
}

// Sums each of `arrays` consecutive kThreads-float arrays at sums into its element 0, by a tree
// in a fixed order (bitwise reproducible).
template <typename B>
FASTPEFT_HD void tree_sum(float* sums, int arrays) {
  for (int width = kThreads / 2; width > 0; width /= 2) {
    B::each([&](int tid, int) {
      if (tid < width) {
        for (int i = 0; i < arrays; ++i) sums[i * kThreads + tid] += sums[i * kThreads + tid + width];
      }
    });
    B::sync();
  }
}

// The forward of rows [block * kTcRows, ...) on tensor cores (launchers.h: BottleneckForward).
template <typename B, typename T, typename W>
FASTPEFT_HD void forward_tc_block(const BottleneckForward& a, int64_t block, float* smem) {
  const int R = static_cast<int>(a.R), Rk = tc_rank(a.R), zs_ld = Rk + kTcF32Pad, cs_ld = Rk + kTcPad16;
  const int64_t m0 = block * kTcRows;
  tc_down<B, ColMajor, T, W>(a.h, m0, a.M, a.D, a.dropout, load_seed(a.dropout), a.w_down, R, smem);
  const float* zs = smem;
  T* cs = reinterpret_cast<T*>(smem + tc_region_floats(Rk));
  float* z = reinterpret_cast<float*>(a.z);
  B::each([&](int tid, int) {
    for (int i = tid; i < kTcRows * Rk; i += kThreads) {
      const int row = i / Rk, r = i % Rk;
      const int64_t m = m0 + row;
      float c = 0.0f;
      if (m < a.M && r < R) {
        const float zv = zs[row * zs_ld + r] + load_bias<W>(a.b_down, r);
        z[m * R + r] = zv;
        c = activate(a.activation, zv);
      }
      cs[row * cs_ld + r] = from_float<T>(c);
    }
  });
  B::sync();
  const Matrix res = a.residual.ptr ? a.residual : a.h;
  T* out = reinterpret_cast<T*>(a.out);
  const float scaling = load_scaling(a.scaling);
  tc_up<B, ColMajor, T, W>(cs, m0, a.M, a.D, a.w_up, R, smem, [&](int64_t m, int64_t d, float (&u)[kVec]) {
    float v[kVec];
    load_row_group<T>(res, m, d, a.D, v);
#pragma unroll
    for (int l = 0; l < kVec; ++l) v[l] += scaling * (u[l] + (d + l < a.D ? load_bias<W>(a.b_up, d + l) : 0.0f));
    store_group(out + m * a.D + d, a.D - d, v);
  });
}

// Step 1 of the backward for rows [block * kTcRows, ...) on tensor cores (launchers.h:
// BottleneckBackward; ds_partials gets one entry per kRowBlock = 16 rows: one per row tile).
template <typename B, typename T, typename W>
FASTPEFT_HD void dz_dh_tc_block(const BottleneckBackward& a, int64_t block, float* smem) {
  static_assert(kRowBlock == kMmaTile, "one ds partial per row tile");
  const int R = static_cast<int>(a.R), Rk = tc_rank(a.R), zs_ld = Rk + kTcF32Pad, cs_ld = Rk + kTcPad16;
  const int64_t m0 = block * kTcRows;
  const Dropout no_dropout{0, 0, 1.0f};
  tc_down<B, RowMajor, T, W>(a.dout, m0, a.M, a.D, no_dropout, 0, a.w_up, R, smem);  // (dout W_up)[m, r]
  const float* zs = smem;
  T* cs = reinterpret_cast<T*>(smem + tc_region_floats(Rk));
  float* ds_sum = smem + tc_smem_floats(R, true) - kTcRowTiles * kThreads;  // [kTcRowTiles][kThreads]
  const float* z = reinterpret_cast<const float*>(a.z);
  float* dz = reinterpret_cast<float*>(a.dz);
  const float scaling = load_scaling(a.scaling);
  B::each([&](int tid, int) {
    // This thread's share of sum act(z) * (dout W_up) per row tile, in i order (two scalars, not
    // an array: ptxas put a runtime-indexed array in local memory).
    static_assert(kTcRowTiles == 2, "one ds scalar per row tile");
    float ds0 = 0.0f, ds1 = 0.0f;
    for (int i = tid; i < kTcRows * Rk; i += kThreads) {
      const int row = i / Rk, r = i % Rk;
      const int64_t m = m0 + row;
      float g = 0.0f;
      if (m < a.M && r < R) {
        const float zv = z[m * R + r], p = zs[row * zs_ld + r];
        g = scaling * p * activate_grad(a.activation, zv);
        const float term = activate(a.activation, zv);
        ds0 = row < kMmaTile ? fmaf(term, p, ds0) : ds0;
        ds1 = row < kMmaTile ? ds1 : fmaf(term, p, ds1);
        dz[m * R + r] = g;
      }
      cs[row * cs_ld + r] = from_float<T>(g);
    }
    ds_sum[tid] = ds0;
    ds_sum[kThreads + tid] = ds1;
  });
  B::sync();
  if (a.dh) {
    const uint64_t seed = load_seed(a.dropout);
    T* dh = reinterpret_cast<T*>(a.dh);
    tc_up<B, RowMajor, T, W>(cs, m0, a.M, a.D, a.w_down, R, smem, [&](int64_t m, int64_t d, float (&u)[kVec]) {
      drop_group4(u, m, d, a.D, a.dropout, seed);  // (dz W_down)[m, d], dropped and scaled
      drop_group4(u + 4, m, d + 4, a.D, a.dropout, seed);
      if (a.add_dout) {
        float v[kVec];
        load_row_group<T>(a.dout, m, d, a.D, v);
#pragma unroll
        for (int l = 0; l < kVec; ++l) u[l] += v[l];
      }
      store_group(dh + m * a.D + d, a.D - d, u);
    });
  }
  if (a.ds_partials) {  // ds_sum has a region of its own: the reduction can wait until here
    tree_sum<B>(ds_sum, kTcRowTiles);
    B::each([&](int tid, int) {
      const int64_t entry = block * kTcRowTiles + tid;
      if (tid < kTcRowTiles && entry * kRowBlock < a.M) {
        reinterpret_cast<float*>(a.ds_partials)[entry] = ds_sum[tid * kThreads];
      }
    });
  }
}

// Step 1 of the backward for rows [block * kRows, ...) (launchers.h: BottleneckBackward).
template <typename B, typename T, typename W>
FASTPEFT_HD void dz_dh_block(const BottleneckBackward& a, int64_t block, float* smem) {
  const int R = static_cast<int>(a.R);
  const int64_t m0 = block * kRows;
  const Dropout no_dropout{0, 0, 1.0f};
  float acc[B::kStates][kAccPerThread];
  // (dout W_up)[m, r] = sum_d dout[m, d] w_up[d, r]: w_up seen as [R, D] is its transpose.
  const Matrix w_up_t{a.w_up.ptr, a.w_up.s1, a.w_up.s0};
  project_down<B, T, W>(a.dout, m0, a.M, a.D, R, w_up_t, no_dropout, 0, smem, acc);
  float* cs = smem;  // [kRows][R] dz
  float* ds_sum = smem + row_smem_floats(a.R) - kThreads;
  const float* z = reinterpret_cast<const float*>(a.z);
  float* dz = reinterpret_cast<float*>(a.dz);
  const float scaling = load_scaling(a.scaling);
  B::each([&](int tid, int s) {
    float ds = 0.0f;  // this thread's share of sum act(z) * (dout W_up), in k order
#pragma unroll
    for (int k = 0; k < kAccPerThread; ++k) {
      const int o = tid + k * kThreads;
      if (o < kRows * R) {
        const int64_t m = m0 + o / R;
        float g = 0.0f;
        if (m < a.M) {
          const float zv = z[m * R + o % R];
          g = scaling * acc[s][k] * activate_grad(a.activation, zv);
          ds = fmaf(activate(a.activation, zv), acc[s][k], ds);
          dz[m * R + o % R] = g;
        }
        cs[o] = g;
      }
    }
    ds_sum[tid] = ds;
  });
  B::sync();
  if (a.ds_partials) {
    tree_sum<B>(ds_sum, 1);
    B::each([&](int tid, int) {
      if (tid == 0) reinterpret_cast<float*>(a.ds_partials)[block] = ds_sum[0];
    });
  }
  if (!a.dh) return;
  const uint64_t seed = load_seed(a.dropout);
  const T* dout = reinterpret_cast<const T*>(a.dout.ptr);
  T* dh = reinterpret_cast<T*>(a.dh);
  // (dz W_down)[m, d] = sum_r dz[m, r] w_down[r, d]: w_down seen as [D, R] is its transpose.
  const Matrix w_down_t{a.w_down.ptr, a.w_down.s1, a.w_down.s0};
  project_up<B, W>(cs, R, a.D, w_down_t, [&](int row, int64_t d, float g) {
    const int64_t m = m0 + row;
    if (m < a.M) {
      if (a.dropout.seed_ptr) g = keep_element(seed, m, d, a.D, a.dropout.threshold) ? g * a.dropout.inv_keep : 0.0f;
      if (a.add_dout) g += to_float(dout[m * a.dout.s0 + d * a.dout.s1]);
      dh[m * a.D + d] = from_float<T>(g);
    }
  });
}

// Split `split` of sum_m P(m, d) * Q(m, r) over its rows, for the 64 x 64 tile (d_tile, r_tile);
// P [M, D] (dtype T, optionally dropped), Q fp32 [M, R] contiguous (optionally act()): out[split,
// d, r] (or [split, r, d] when r_major), each pointer written only if not null. Tiles with
// r_tile == 0 also write sum_m P(m, d) to p_sums[split, d]; tiles with d_tile == 0, sum_m Q(m, r)
// to q_sums[split, r]. Grid (cdiv(D, 64), cdiv(R, 64), splits).
struct OuterArgs {
  Matrix p;
  const float* q;
  float* out;
  float* p_sums;
  float* q_sums;
  int64_t M, D, R, rows_per_split;
  int q_activation;  // -1: Q = q as is
  bool r_major;
  Dropout dropout;
};

template <typename B, typename T>
FASTPEFT_HD void outer_block(const OuterArgs& a, int64_t d_tile, int64_t r_tile, int64_t split, float* smem) {
  float* ps = smem;                              // [kOuterM][kOuterTile]
  float* qs = smem + kOuterM * kOuterTile;       // [kOuterM][kOuterTile + 1]
  const int64_t d_base = d_tile * kOuterTile, r_base = r_tile * kOuterTile;
  const int64_t m_begin = split * a.rows_per_split;
  const int64_t m_end = m_begin + a.rows_per_split < a.M ? m_begin + a.rows_per_split : a.M;
  const uint64_t seed = load_seed(a.dropout);
  float acc[B::kStates][kOuterSub][kOuterSub];
  float col_sum[B::kStates];  // threads 0..63: P column d_base + tid; 64..127: Q column r_base + tid - 64
  B::each([&](int, int s) {
#pragma unroll
    for (int i = 0; i < kOuterSub; ++i)
#pragma unroll
      for (int j = 0; j < kOuterSub; ++j) acc[s][i][j] = 0.0f;
    col_sum[s] = 0.0f;
  });
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kOuterM) {
    B::each([&](int tid, int) {
      // P: kOuterM rows x 64 columns, one group of 4 columns per thread.
      const int row = tid / (kOuterTile / 4), j = (tid % (kOuterTile / 4)) * 4;
      stage_group<T>(a.p, m0 + row, d_base + j, m_end, a.D, a.dropout, seed, ps + row * kOuterTile + j);
      for (int i = tid; i < kOuterM * kOuterTile; i += kThreads) {
        const int qrow = i / kOuterTile, qj = i % kOuterTile;
        const int64_t m = m0 + qrow, r = r_base + qj;
        float v = 0.0f;
        if (m < m_end && r < a.R) {
          v = a.q[m * a.R + r];
          if (a.q_activation >= 0) v = activate(a.q_activation, v);
        }
        qs[qrow * (kOuterTile + 1) + qj] = v;
      }
    });
    B::sync();
    B::each([&](int tid, int s) {
      const int tx = tid % 16, ty = tid / 16;
#pragma unroll 4
      for (int mm = 0; mm < kOuterM; ++mm) {
#pragma unroll
        for (int i = 0; i < kOuterSub; ++i) {
#pragma unroll
          for (int j = 0; j < kOuterSub; ++j) {
            acc[s][i][j] = fmaf(ps[mm * kOuterTile + tx + 16 * i], qs[mm * (kOuterTile + 1) + ty + 16 * j], acc[s][i][j]);
          }
        }
      }
      if (tid < kOuterTile) {
        for (int mm = 0; mm < kOuterM; ++mm) col_sum[s] += ps[mm * kOuterTile + tid];
      } else if (tid < 2 * kOuterTile) {
        for (int mm = 0; mm < kOuterM; ++mm) col_sum[s] += qs[mm * (kOuterTile + 1) + tid - kOuterTile];
      }
    });
    B::sync();
  }
  B::each([&](int tid, int s) {
    const int tx = tid % 16, ty = tid / 16;
    if (a.out) {
#pragma unroll
      for (int i = 0; i < kOuterSub; ++i) {
#pragma unroll
        for (int j = 0; j < kOuterSub; ++j) {
          const int64_t d = d_base + tx + 16 * i, r = r_base + ty + 16 * j;
          if (d < a.D && r < a.R) {
            a.out[a.r_major ? (split * a.R + r) * a.D + d : (split * a.D + d) * a.R + r] = acc[s][i][j];
          }
        }
      }
    }
    if (tid < kOuterTile && r_tile == 0 && a.p_sums && d_base + tid < a.D) {
      a.p_sums[split * a.D + d_base + tid] = col_sum[s];
    } else if (tid >= kOuterTile && tid < 2 * kOuterTile && d_tile == 0 && a.q_sums && r_base + tid - kOuterTile < a.R) {
      a.q_sums[split * a.R + r_base + tid - kOuterTile] = col_sum[s];
    }
  });
}

// outer_block's split on tensor cores (16-bit P): the same outputs, kTcOuterM rows per step
// staged as 16-bit [m][d] (P, the A operand seen column-major) and [m][r] (Q rounded to P's
// dtype, B row-major), 16-byte loads and stores, wmma products into fp32 (4 x 4 tiles, 2 per
// warp), the tile written through shared memory along the output's unit stride. The column
// sums stay exact fp32, added in m order from the rows' values in global memory (L1 hits:
// the staging has just read them), only in the tiles that write them.
constexpr int kTcOuterM = 64;                        // rows per step: 4 mma k-steps per barrier pair
constexpr int kTcOuterLd = kOuterTile + kTcPad16;    // 144 B rows: conflict-free fragment loads
constexpr int kTcOuterTileTiles = kOuterTile / kMmaTile;
constexpr int kTcOuterTiles = kTcOuterTileTiles * kTcOuterTileTiles / kBlockWarps;  // 2 per warp
// ps + qs (16-bit), reused for the fp32 [64][kTcOuterLd] output tile, in floats.
constexpr int kTcOuterSmemFloats = kOuterTile * kTcOuterLd;
static_assert(2 * kTcOuterM * kTcOuterLd / 2 <= kTcOuterSmemFloats, "the staged rows fit the output tile's space");

template <typename B, typename T>
FASTPEFT_HD void outer_tc_block(const OuterArgs& a, int64_t d_tile, int64_t r_tile, int64_t split, float* smem) {
  using Mma = typename MmaOf<B>::type;
  constexpr int kGroups = kOuterTile / kVec;  // 8-element groups per staged row
  T* ps = reinterpret_cast<T*>(smem);         // [kTcOuterM][kTcOuterLd] P rows
  T* qs = ps + kTcOuterM * kTcOuterLd;        // [kTcOuterM][kTcOuterLd] Q rows
  const int64_t d_base = d_tile * kOuterTile, r_base = r_tile * kOuterTile;
  const int64_t m_begin = split * a.rows_per_split;
  const int64_t m_end = m_begin + a.rows_per_split < a.M ? m_begin + a.rows_per_split : a.M;
  const uint64_t seed = load_seed(a.dropout);
  // Threads 0..63 sum P column d_base + tid, 64..127 Q column r_base + tid - 64, when written.
  const bool p_sums = a.p_sums && r_tile == 0, q_sums = a.q_sums && d_tile == 0;
  float col_sum[B::kStates];
  typename Mma::Acc acc[B::kWarpStates][kTcOuterTiles];
  for (int64_t m0 = m_begin; m0 == m_begin || m0 < m_end; m0 += kTcOuterM) {  // once at least: zeros
    B::each([&](int tid, int s) {
      for (int g = tid; g < kTcOuterM * kGroups; g += kThreads) {
        const int row = g / kGroups, j = g % kGroups * kVec;
        const int64_t m = m0 + row, r = r_base + j;
        float v[kVec];
        load_dropped_group<T>(a.p, m, d_base + j, m_end, a.D, a.dropout, seed, v);
        store_group(ps + row * kTcOuterLd + j, kVec, v);
        const Matrix q{reinterpret_cast<uintptr_t>(a.q), a.R, 1};
        float w[kVec] = {};
        if (m < m_end) load_row_group<float>(q, m, r, a.R, w);
#pragma unroll
        for (int l = 0; l < kVec; ++l) {
          if (a.q_activation >= 0 && m < m_end && r + l < a.R) w[l] = activate(a.q_activation, w[l]);
        }
        store_group(qs + row * kTcOuterLd + j, kVec, w);
      }
      if (m0 == m_begin) col_sum[s] = 0.0f;
      const int64_t rows_end = m0 + kTcOuterM < m_end ? m0 + kTcOuterM : m_end;
      if (p_sums && tid < kOuterTile && d_base + tid < a.D) {
        const int64_t d = d_base + tid;
        const T* p = reinterpret_cast<const T*>(a.p.ptr);
        for (int64_t m = m0; m < rows_end; ++m) {
          float v = to_float(p[m * a.p.s0 + d * a.p.s1]);
          if (a.dropout.seed_ptr) v = keep_element(seed, m, d, a.D, a.dropout.threshold) ? v * a.dropout.inv_keep : 0.0f;
          col_sum[s] += v;
        }
      } else if (q_sums && tid >= kOuterTile && tid < 2 * kOuterTile && r_base + tid - kOuterTile < a.R) {
        const int64_t r = r_base + tid - kOuterTile;
        for (int64_t m = m0; m < rows_end; ++m) {
          const float v = a.q[m * a.R + r];
          col_sum[s] += a.q_activation >= 0 ? activate(a.q_activation, v) : v;
        }
      }
    });
    B::sync();
    B::each_warp([&](int warp, int s) {
      if (!a.out) return;  // only the column sums were asked for
      tc_step<Mma, ColMajor, RowMajor>(acc[s], m0 == m_begin, warp, kTcOuterTileTiles, kTcOuterTileTiles, kTcOuterM,
                                       ps, kTcOuterLd, qs, kTcOuterLd);
    });
    B::sync();
  }
  B::each_warp([&](int warp, int s) {
    if (a.out) tc_store<Mma>(acc[s], warp, kTcOuterTileTiles, kTcOuterTileTiles, smem, kTcOuterLd);  // [d][r]
  });
  B::sync();
  B::each([&](int tid, int s) {
    if (a.out) {
      for (int i = tid; i < kOuterTile * kOuterTile; i += kThreads) {
        // Consecutive threads along the output's unit stride: d when r_major, else r.
        const int dd = a.r_major ? i % kOuterTile : i / kOuterTile, rr = a.r_major ? i / kOuterTile : i % kOuterTile;
        const int64_t d = d_base + dd, r = r_base + rr;
        if (d < a.D && r < a.R) {
          a.out[a.r_major ? (split * a.R + r) * a.D + d : (split * a.D + d) * a.R + r] = smem[dd * kTcOuterLd + rr];
        }
      }
    }
    if (p_sums && tid < kOuterTile && d_base + tid < a.D) {
      a.p_sums[split * a.D + d_base + tid] = col_sum[s];
    } else if (q_sums && tid >= kOuterTile && tid < 2 * kOuterTile && r_base + tid - kOuterTile < a.R) {
      a.q_sums[split * a.R + r_base + tid - kOuterTile] = col_sum[s];
    }
  });
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) bottleneck_forward_kernel(BottleneckForward a) {
  extern __shared__ float smem[];
  forward_block<DeviceBlock, T, W>(a, blockIdx.x, smem);
}

// Two blocks per SM (16 warps to overlap one block's staging with the other's products): up to
// 128 registers. Without the minimum, ptxas aimed at 80 and spilled (the forward on sm_80 with
// bf16 weights; the weight-gradient kernel on sm_90 with bf16: 8 B).
constexpr int kTcBlocksPerSm = 2;

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads, kTcBlocksPerSm) bottleneck_forward_tc_kernel(BottleneckForward a) {
  extern __shared__ __align__(32) float tc_smem[];
  forward_tc_block<DeviceBlock, T, W>(a, blockIdx.x, tc_smem);
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads, kTcBlocksPerSm) bottleneck_dz_dh_tc_kernel(BottleneckBackward a) {
  extern __shared__ __align__(32) float tc_smem[];
  dz_dh_tc_block<DeviceBlock, T, W>(a, blockIdx.x, tc_smem);
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) bottleneck_dz_dh_kernel(BottleneckBackward a) {
  extern __shared__ float smem[];
  dz_dh_block<DeviceBlock, T, W>(a, blockIdx.x, smem);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) outer_partials_kernel(OuterArgs a) {
  __shared__ float smem[kOuterSmemFloats];
  outer_block<DeviceBlock, T>(a, blockIdx.x, blockIdx.y, blockIdx.z, smem);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kTcBlocksPerSm) outer_partials_tc_kernel(OuterArgs a) {
  __shared__ __align__(32) float smem[kTcOuterSmemFloats];
  outer_tc_block<DeviceBlock, T>(a, blockIdx.x, blockIdx.y, blockIdx.z, smem);
}

// The (h, weight) dtype pairs the op takes: weights in h's dtype, or fp32 weights on 16-bit h
// (five pairs: the four 16-bit ones go to the tensor-core kernels, fp32/fp32 to the CUDA-core
// ones, which keeps the build and `fastpeft check` small).
template <typename F>
void with_dtype_pair(DType dtype, DType weight_dtype, F&& f) {
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if (weight_dtype == dtype) return f(T{}, T{});
    if (weight_dtype == DType::kFloat32) return f(T{}, float{});
    throw std::invalid_argument("fastpeft._C bottleneck: weights must have h's dtype or float32");
  });
}

void check_rank(int64_t R) {
  if (R < 1 || R > kMaxRank) throw std::invalid_argument("fastpeft._C bottleneck: rank must be in [1, 256]");
}

int64_t row_blocks(int64_t M) { return (M + kRows - 1) / kRows; }

// Runs a step of a launch: on the stream (device), or every block on the CPU (emulate, in
// emulate_grid's order).
struct Runner {
  cudaStream_t stream;
  bool emulate;
};

// Runs a row kernel over `blocks` blocks with `floats` floats of dynamic shared memory: on the
// stream (opting in above the default 48 KB), or on the CPU, emulated(block, smem) per block.
template <typename Args, typename Emulated>
void run_rows(const Runner& run, int64_t blocks, int64_t floats, void (*kernel)(Args), const Args& args,
              Emulated&& emulated, const char* what) {
  if (run.emulate) {
    HostShared host_smem(floats);
    emulate_grid(blocks, 1, 1, [&](int64_t b, int64_t, int64_t) { emulated(b, host_smem.begin_block()); });
    return;
  }
  const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, run.stream>>>(args);
  check_launch(what);
}

int64_t tc_blocks(int64_t M) { return (M + kTcRows - 1) / kTcRows; }

// fp32 h: CUDA cores (fp32 products, as the fp32 contract promises; tf32 would round h);
// 16-bit h: tensor cores, with fp32 weights rounded to h's dtype as they are staged.
void forward(const BottleneckForward& a, const Runner& run) {
  check_rank(a.R);
  if (a.M == 0) return;
  with_dtype_pair(a.dtype, a.weight_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    if constexpr (std::is_same<T, float>::value) {
      run_rows(run, row_blocks(a.M), row_smem_floats(a.R), bottleneck_forward_kernel<T, W>, a,
               [&](int64_t b, float* smem) { forward_block<HostBlock, T, W>(a, b, smem); }, "bottleneck_forward_kernel");
    } else {
      run_rows(run, tc_blocks(a.M), tc_smem_floats(a.R, false), bottleneck_forward_tc_kernel<T, W>, a,
               [&](int64_t b, float* smem) { forward_tc_block<HostBlock, T, W>(a, b, smem); },
               "bottleneck_forward_tc_kernel");
    }
  });
}

// The weight-gradient partials: fp32 P on CUDA cores, 16-bit P on tensor cores.
template <typename T>
void outer(const OuterArgs& o, int64_t splits, const Runner& run, const char* what) {
  const int64_t d_tiles = (o.D + kOuterTile - 1) / kOuterTile, r_tiles = (o.R + kOuterTile - 1) / kOuterTile;
  constexpr bool tensor_cores = !std::is_same<T, float>::value;
  if (run.emulate) {
    HostShared host_smem(tensor_cores ? kTcOuterSmemFloats : kOuterSmemFloats);
    emulate_grid(d_tiles, r_tiles, splits, [&](int64_t dt, int64_t rt, int64_t s) {
      if constexpr (tensor_cores) {
        outer_tc_block<HostBlock, T>(o, dt, rt, s, host_smem.begin_block());
      } else {
        outer_block<HostBlock, T>(o, dt, rt, s, host_smem.begin_block());
      }
    });
    return;
  }
  const dim3 grid(static_cast<unsigned>(d_tiles), static_cast<unsigned>(r_tiles), static_cast<unsigned>(splits));
  if constexpr (tensor_cores) {
    outer_partials_tc_kernel<T><<<grid, kThreads, 0, run.stream>>>(o);
  } else {
    outer_partials_kernel<T><<<grid, kThreads, 0, run.stream>>>(o);
  }
  check_launch(what);
}

void backward(const BottleneckBackward& a, const Runner& run) {
  check_rank(a.R);
  if (a.rows_per_split % kOuterRows != 0 || a.splits < 1 || a.splits * a.rows_per_split < a.M) {
    throw std::invalid_argument("fastpeft._C bottleneck_backward: splits must cover M in multiples of 16 rows");
  }
  const Dropout no_dropout{0, 0, 1.0f};
  with_dtype_pair(a.dtype, a.weight_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    if (a.dz && a.M > 0) {  // as the forward: fp32 on CUDA cores, 16-bit on tensor cores
      if constexpr (std::is_same<T, float>::value) {
        run_rows(run, row_blocks(a.M), row_smem_floats(a.R), bottleneck_dz_dh_kernel<T, W>, a,
                 [&](int64_t b, float* smem) { dz_dh_block<HostBlock, T, W>(a, b, smem); }, "bottleneck_dz_dh_kernel");
      } else {
        run_rows(run, tc_blocks(a.M), tc_smem_floats(a.R, true), bottleneck_dz_dh_tc_kernel<T, W>, a,
                 [&](int64_t b, float* smem) { dz_dh_tc_block<HostBlock, T, W>(a, b, smem); },
                 "bottleneck_dz_dh_tc_kernel");
      }
    }
    if (a.wu_partials || a.bu_partials) {  // dout^T act(z) and sum_m dout
      outer<T>(OuterArgs{a.dout, reinterpret_cast<const float*>(a.z), reinterpret_cast<float*>(a.wu_partials),
                         reinterpret_cast<float*>(a.bu_partials), nullptr, a.M, a.D, a.R, a.rows_per_split,
                         a.activation, false, no_dropout},
               a.splits, run, "bottleneck outer_partials_kernel (dW_up)");
    }
    if (a.wd_partials || a.bd_partials) {  // dz^T dropout(h) and sum_m dz
      outer<T>(OuterArgs{a.h, reinterpret_cast<const float*>(a.dz), reinterpret_cast<float*>(a.wd_partials), nullptr,
                         reinterpret_cast<float*>(a.bd_partials), a.M, a.D, a.R, a.rows_per_split, -1, true,
                         a.dropout},
               a.splits, run, "bottleneck outer_partials_kernel (dW_down)");
    }
  });
}

}  // namespace

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastpeft._C: launching ") + what + " failed: " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
  }
}

void bottleneck_forward(const BottleneckForward& args, uintptr_t stream) {
  forward(args, Runner{reinterpret_cast<cudaStream_t>(stream), false});
}

void bottleneck_backward(const BottleneckBackward& args, uintptr_t stream) {
  backward(args, Runner{reinterpret_cast<cudaStream_t>(stream), false});
}

void bottleneck_forward_emulated(const BottleneckForward& args) { forward(args, Runner{nullptr, true}); }

void bottleneck_backward_emulated(const BottleneckBackward& args) { backward(args, Runner{nullptr, true}); }

}  // namespace fastpeft
