// Host entry points of fastpeft's CUDA kernels, called by the pybind11 module (module.cpp).
// They take raw device addresses (Python ints from tensor.data_ptr()) and a cudaStream_t as an
// integer (torch.cuda.current_stream().cuda_stream), so the extension links only cudart and
// never torch's C++ ABI. Every launch is asynchronous on that stream (no host sync).
// OPT-IN: no GPU has run these kernels yet.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "elementwise.h"

namespace fastpeft {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Dropout of the adapter input: seed_ptr is the device address of the op's int64 seed
// (0: no dropout), kept iff Philox bits >> 1 >= threshold, kept values scaled by inv_keep.
struct Dropout {
  uintptr_t seed_ptr;
  uint32_t threshold;
  float inv_keep;
};

// A 2-D operand: element (i, j) at ptr[i * s0 + j * s1] (any strides, no copies).
struct Matrix {
  uintptr_t ptr;
  int64_t s0, s1;
};

// A vector operand (bias): element i at ptr[i * stride]; ptr 0 = absent.
struct Vector {
  uintptr_t ptr;
  int64_t stride;
};

// The adapter's scaling: *scale_ptr (fp32, on the device: AdapterHub's learned scaling) when
// scale_ptr != 0, else `value`.
struct Scaling {
  uintptr_t scale_ptr;
  float value;
};

// Forward (fastpeft.kernels.bottleneck.launch.bottleneck_forward's contract):
//   z = dropout(h) W_down^T + b_down (fp32 [M, R], contiguous; saved for the backward),
//   out = residual + scaling * (act(z) W_up^T + b_up) ([M, D] in h's dtype, contiguous).
// h, residual [M, D]; w_down [R, D]; w_up [D, R]; residual.ptr 0 = h.
struct BottleneckForward {
  Matrix h, w_down, w_up, residual;
  Vector b_down, b_up;
  uintptr_t out, z;
  int64_t M, D, R;
  int activation;
  Scaling scaling;
  Dropout dropout;
  DType dtype, weight_dtype;
};

// Backward, step 1 (row blocks: 16 rows for fp32 h, 32 for 16-bit h on tensor cores): dz =
// scaling * (dout W_up) * act'(z) (fp32 [M, R] -> dz), the partial sums of act(z) * (dout W_up)
// per kRowBlock rows (the gradient of a device scaling, before the b_up term: ds_partials
// [ceil(M / kRowBlock)], ptr 0 = skip), and, when
// dh != 0, dh = keep/(1-p) * (dz W_down) (+ dout when add_dout, i.e. the residual was h).
// Step 2 (tiled over d and r, one grid z-slice per split of rows_per_split rows, a multiple
// of kOuterRows): fp32 partial sums per split, written only where the pointer is not 0:
//   wu_partials [splits, D, R] = dout^T act(z),  bu_partials [splits, D] = sum_m dout,
//   wd_partials [splits, R, D] = dz^T dropout(h) (1/(1-p) included), bd_partials [splits, R] = sum_m dz.
// The launcher adds the splits in order (no atomics: bitwise reproducible) and scales/casts.
struct BottleneckBackward {
  Matrix dout, h, w_down, w_up;
  uintptr_t z, dz, ds_partials, dh;
  uintptr_t wu_partials, bu_partials, wd_partials, bd_partials;
  int64_t M, D, R, splits, rows_per_split;
  int activation;
  Scaling scaling;
  bool add_dout;
  Dropout dropout;
  DType dtype, weight_dtype;
};

// Most adapter rank the bottleneck kernels take (their staging buffers are sized for it).
constexpr int64_t kBottleneckMaxRank = 256;
// Rows per block of the backward's row kernel (ds_partials has one entry per block).
constexpr int64_t kRowBlock = 16;
// Rows per step of the weight-gradient kernel: rows_per_split must be a multiple of it.
constexpr int64_t kOuterRows = 16;
// The weight-gradient kernel's blocks cover kOuterTile x kOuterTile tiles of [D, R].
constexpr int64_t kOuterTileSize = 64;

void bottleneck_forward(const BottleneckForward& args, uintptr_t stream);
void bottleneck_backward(const BottleneckBackward& args, uintptr_t stream);
// The same kernels' code run on the CPU, block after block and thread after thread (block.h),
// on host memory: what the tests check without a GPU.
void bottleneck_forward_emulated(const BottleneckForward& args);
void bottleneck_backward_emulated(const BottleneckBackward& args);

// Multi-LoRA decode (BGMV), fastpeft.kernels.multi_lora.launch.multi_lora_decode's contract:
// y[t] += scalings[i] * (x[t] A_i[:r]^T) B_i[:, :r]^T with i = adapter_ids[t] (int64; rows
// with i outside [0, L) untouched, no slot read for them) and r = clamp(ranks[i], 0, R_max)
// (int64). x [T, K] and y [T, N] with unit column stride and row strides ld_x, ld_y;
// lora_a [L, R_max, K], lora_b [L, N, R_max] contiguous, in x's dtype or fp32 (lora_dtype);
// scalings fp32 [L]; shrunk: an fp32 workspace [T, bgmv_slices(K), R_max] (the shrink's
// partial sums, one per kBgmvSliceK columns of K).
struct BgmvForward {
  uintptr_t x, lora_a, lora_b, scalings, adapter_ids, ranks, y, shrunk;
  int64_t T, K, N, L, R_max, ld_x, ld_y;
  DType dtype, lora_dtype;
};

// Columns of K per shrink block (bgmv.cu: 64 threads x 8 elements per rank row).
constexpr int64_t kBgmvSliceK = 512;
FASTPEFT_HD constexpr int64_t bgmv_slices(int64_t K) { return (K + kBgmvSliceK - 1) / kBgmvSliceK; }

void bgmv_forward(const BgmvForward& args, uintptr_t stream);
void bgmv_forward_emulated(const BgmvForward& args);  // on the CPU, as above

}  // namespace fastpeft
