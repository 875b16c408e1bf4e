// Device-side helpers shared by the GPU tiers: element conversion to and from fp32, and dispatch from the
// run-time DType to a kernel template's element type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>

#include "common/problem.hpp"

namespace attn::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

/// Calls body(T{}) with T the element type of dtype: float, __nv_bfloat16 or __half.
template <class Body>
void dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::f32: body(float{}); return;
    case DType::bf16: body(__nv_bfloat16{}); return;
    case DType::f16: body(__half{}); return;
  }
  throw std::invalid_argument("dtype: unknown value");
}

/// Ceiling division for grid sizes.
constexpr __host__ __device__ int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace attn::cuda
