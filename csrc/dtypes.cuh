// fp32 <-> storage dtype conversions of the CUDA kernels (host and device: the emulated
// kernels run them on the CPU), and the dtype dispatch of the launchers.
// OPT-IN: no GPU has run the kernels that use this header yet.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>

#include "block.h"
#include "elementwise.h"
#include "launchers.h"

namespace fastpeft {

FASTPEFT_HD float to_float(float v) { return v; }
FASTPEFT_HD float to_float(__half v) { return __half2float(v); }
FASTPEFT_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
FASTPEFT_HD T from_float(float v);
template <>
FASTPEFT_HD float from_float<float>(float v) { return v; }
template <>
FASTPEFT_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
FASTPEFT_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements of one vector group: 8 x 16-bit = one 16-byte load (LDG.128), the widest a thread
// issues; fp32 groups take two.
constexpr int kVec = 8;

// v[j] = p[j] as fp32 for j < min(count, kVec), 0 for the rest. When p is 16-byte aligned and
// the whole group lies below count, with 16-byte loads (one for 16-bit E, two for fp32); else
// element by element (a row's tail, or a row that does not start on 16 bytes), reading nothing
// at or past p[count]. Both paths give the same values, so results do not depend on alignment.
template <typename E>
FASTPEFT_HD void load_group(const E* p, int64_t count, float (&v)[kVec]) {
  constexpr int kPerLoad = 16 / static_cast<int>(sizeof(E));
  if (count >= kVec && reinterpret_cast<uintptr_t>(p) % 16 == 0) {
#pragma unroll
    for (int i = 0; i < kVec / kPerLoad; ++i) {
      const uint4 bits = reinterpret_cast<const uint4*>(p)[i];
      E e[kPerLoad];
      memcpy(e, &bits, sizeof bits);
#pragma unroll
      for (int j = 0; j < kPerLoad; ++j) v[i * kPerLoad + j] = to_float(e[j]);
    }
    EmulationCounts::count_load(true);
    return;
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) v[j] = j < count ? to_float(p[j]) : 0.0f;
  EmulationCounts::count_load(false);
}

// v[j] = element (row, c + j) of a Matrix view of E as fp32 for j < kVec, 0 where c + j >= cols:
// load_group along a unit column stride, element by element along any other.
template <typename E>
FASTPEFT_HD void load_row_group(const Matrix& m, int64_t row, int64_t c, int64_t cols, float (&v)[kVec]) {
  const E* p = reinterpret_cast<const E*>(m.ptr) + row * m.s0 + c * m.s1;
  if (m.s1 == 1) return load_group(p, cols - c, v);
#pragma unroll
  for (int j = 0; j < kVec; ++j) v[j] = c + j < cols ? to_float(p[j * m.s1]) : 0.0f;
  EmulationCounts::count_load(false);
}

// p[j] = v[j] in E for j < min(count, kVec): one 16-byte store when p is 16-byte aligned and
// count >= kVec (16-bit E), else element by element.
template <typename E>
FASTPEFT_HD void store_group(E* p, int64_t count, const float (&v)[kVec]) {
  if (sizeof(E) * kVec == 16 && count >= kVec && reinterpret_cast<uintptr_t>(p) % 16 == 0) {
    E e[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) e[j] = from_float<E>(v[j]);
    uint4 bits;
    memcpy(&bits, e, sizeof bits);
    *reinterpret_cast<uint4*>(p) = bits;
    return;
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    if (j < count) p[j] = from_float<E>(v[j]);
  }
}

// Calls f(T{}) with the C++ type of a DType code; throws on an unknown code.
template <typename F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  throw std::invalid_argument("fastpeft._C: unknown dtype code");
}

// Throws std::runtime_error naming `what` if the last launch failed.
void check_launch(const char* what);

}  // namespace fastpeft
