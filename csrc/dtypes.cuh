// fp32 <-> storage dtype conversions of the CUDA kernels (host and device: the emulated
// kernels run them on the CPU), and the dtype dispatch of the launchers.
// OPT-IN: no GPU has run the kernels that use this header yet.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

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
