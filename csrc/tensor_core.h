// 16 x 16 x 16 tile products on tensor cores (fp16/bf16 inputs, fp32 accumulation), written once
// against a Block's Mma (MmaOf<B>::type) and run two ways:
//   DeviceMma: nvcuda::wmma's m16n16k16 fragments (HMMA on sm_80/sm_90; `fastpeft check --cuda`
//              fails a kernel listed in check_cuda.TENSOR_CORE_KERNELS that compiles to none);
//   HostMma:   the CPU emulation. A fragment is one warp's whole 16 x 16 tile (a warp-level
//              object, as on the GPU, where its elements are spread over the 32 lanes); loads
//              convert to fp32, mma adds sum_k a[i][k] b[k][j] in k order with fmaf, stores write
//              fp32. The GPU's HMMA adds the same products in fp32 in an unspecified order, so
//              the two agree to fp32 rounding, not bit for bit.
// Rules for code using them (block.h: B::each_warp): every lane of a warp makes the same calls
// with the same arguments (wmma is warp-collective), and each_warp bodies do nothing else (on the
// GPU all 32 lanes run them, in the emulation one call stands for the warp). Pointers are to
// 32-byte aligned shared memory; ld (elements) is a multiple of 8 for 16-bit, 4 for fp32.
// OPT-IN: no GPU has run the kernels that use this header yet.
#pragma once

#include <mma.h>

#include <type_traits>

#include "dtypes.cuh"

namespace fastpeft {

constexpr int kMmaTile = 16;  // m = n = k of one wmma product

// Layouts of an operand tile in shared memory, as wmma's: RowMajor keeps A[i][k] at p[i * ld + k]
// and B[k][n] at p[k * ld + n]; ColMajor keeps A[i][k] at p[k * ld + i] and B[k][n] at
// p[n * ld + k] (a weight staged with its rows along n: each row one output's inputs).
struct RowMajor {
  using wmma_layout = nvcuda::wmma::row_major;
};
struct ColMajor {
  using wmma_layout = nvcuda::wmma::col_major;
};

// Element (row, col) of a tile in layout L at p with leading dimension ld.
template <typename L, typename T>
FASTPEFT_HD const T& tile_at(const T* p, int ld, int row, int col) {
  return std::is_same<L, RowMajor>::value ? p[row * ld + col] : p[col * ld + row];
}

struct DeviceMma {
  // A [16 x 16] and B [16 x 16] in layouts LA, LB (RowMajor / ColMajor); the accumulator fp32.
  template <typename T, typename L>
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, kMmaTile, kMmaTile, kMmaTile, T, typename L::wmma_layout>;
  template <typename T, typename L>
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, kMmaTile, kMmaTile, kMmaTile, T, typename L::wmma_layout>;
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kMmaTile, kMmaTile, kMmaTile, float>;

  FASTPEFT_HD static void zero(Acc& c) {
#ifdef __CUDA_ARCH__
    nvcuda::wmma::fill_fragment(c, 0.0f);
#endif
  }
  template <typename L, typename T>
  FASTPEFT_HD static void load_a(FragA<T, L>& a, const T* p, int ld) {
#ifdef __CUDA_ARCH__
    nvcuda::wmma::load_matrix_sync(a, p, ld);
#endif
  }
  template <typename L, typename T>
  FASTPEFT_HD static void load_b(FragB<T, L>& b, const T* p, int ld) {
#ifdef __CUDA_ARCH__
    nvcuda::wmma::load_matrix_sync(b, p, ld);
#endif
  }
  // c += a b
  template <typename FA, typename FB>
  FASTPEFT_HD static void mma(Acc& c, const FA& a, const FB& b) {
#ifdef __CUDA_ARCH__
    nvcuda::wmma::mma_sync(c, a, b, c);
#endif
  }
  // p[i * ld + j] = c[i][j]
  FASTPEFT_HD static void store(float* p, const Acc& c, int ld) {
#ifdef __CUDA_ARCH__
    nvcuda::wmma::store_matrix_sync(p, c, ld, nvcuda::wmma::mem_row_major);
#endif
  }
};

struct HostMma {
  struct Tile {
    float v[kMmaTile][kMmaTile];
  };
  template <typename T, typename L>
  using FragA = Tile;  // a[i][k]
  template <typename T, typename L>
  using FragB = Tile;  // b[k][j]
  using Acc = Tile;    // c[i][j]

  FASTPEFT_HD static void zero(Acc& c) {
#ifndef __CUDA_ARCH__
    for (auto& row : c.v)
      for (float& v : row) v = 0.0f;
#endif
  }
  template <typename L, typename T>
  FASTPEFT_HD static void load_a(Tile& a, const T* p, int ld) {
#ifndef __CUDA_ARCH__
    for (int i = 0; i < kMmaTile; ++i)
      for (int k = 0; k < kMmaTile; ++k) a.v[i][k] = to_float(tile_at<L>(p, ld, i, k));
#endif
  }
  template <typename L, typename T>
  FASTPEFT_HD static void load_b(Tile& b, const T* p, int ld) {
#ifndef __CUDA_ARCH__
    for (int k = 0; k < kMmaTile; ++k)
      for (int j = 0; j < kMmaTile; ++j) b.v[k][j] = to_float(tile_at<L>(p, ld, k, j));
#endif
  }
  FASTPEFT_HD static void mma(Acc& c, const Tile& a, const Tile& b) {
#ifndef __CUDA_ARCH__
    for (int i = 0; i < kMmaTile; ++i)
      for (int j = 0; j < kMmaTile; ++j)
        for (int k = 0; k < kMmaTile; ++k) c.v[i][j] = fmaf(a.v[i][k], b.v[k][j], c.v[i][j]);
#endif
  }
  FASTPEFT_HD static void store(float* p, const Acc& c, int ld) {
#ifndef __CUDA_ARCH__
    for (int i = 0; i < kMmaTile; ++i)
      for (int j = 0; j < kMmaTile; ++j) p[i * ld + j] = c.v[i][j];
#endif
  }
};

// The Mma of a Block: wmma in the kernels, the emulation on the CPU.
template <typename B>
struct MmaOf;
template <>
struct MmaOf<DeviceBlock> {
  using type = DeviceMma;
};
template <>
struct MmaOf<HostBlock> {
  using type = HostMma;
};

}  // namespace fastpeft
