// fp32 <-> storage dtype conversions of the CUDA kernels, and the dtype codes the module passes.
// OPT-IN: no GPU has run the kernels that use this header yet.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"

namespace fastpeft {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

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
