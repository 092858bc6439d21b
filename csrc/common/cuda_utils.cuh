// Small device helpers shared by the af2_ext kernels. Plain CUDA: no torch headers, so kernel
// sources and cuda_tests can include this without ATen.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace af2_ext {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// max that propagates a NaN from either operand (fmaxf returns the other one).
__device__ __forceinline__ float fmax_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// Butterfly reduction with `op` over groups of kWidth consecutive lanes (lanes [g*kWidth, (g+1)*kWidth)).
// Contract: all 32 lanes of the warp must reach the call (full mask), even for kWidth < 32;
// every lane of a group gets the group's result.
template <int kWidth, typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
  static_assert(kWidth >= 1 && kWidth <= 32 && (kWidth & (kWidth - 1)) == 0,
                "kWidth must be a power of two in [1, 32]");
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// fmaxf: -inf is the identity, a NaN input is ignored rather than propagated.
template <int kWidth = 32>
__device__ __forceinline__ float warp_reduce_max(float v) {
  return warp_reduce<kWidth>(v, [](float a, float b) { return fmaxf(a, b); });
}

// As warp_reduce_max, but a NaN in any lane of the group gives NaN in every lane (the softmax's running max: a
// NaN logit must poison its row, not vanish).
template <int kWidth = 32>
__device__ __forceinline__ float warp_reduce_max_nan(float v) {
  return warp_reduce<kWidth>(v, [](float a, float b) { return fmax_nan(a, b); });
}

template <int kWidth = 32>
__device__ __forceinline__ float warp_reduce_sum(float v) {
  return warp_reduce<kWidth>(v, [](float a, float b) { return a + b; });
}

// Storage-type <-> fp32 compute-type conversions; narrowing rounds to nearest even.
__host__ __device__ __forceinline__ float to_float(float x) { return x; }
__host__ __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__host__ __device__ __forceinline__ T from_float(float x);

template <>
__host__ __device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Host-side: report a failed CUDA runtime call with its location and error string.
// Returns true when `err` is cudaSuccess.
inline bool cuda_check_ok(cudaError_t err, const char* expr, const char* file, int line) {
  if (err == cudaSuccess) return true;
  std::fprintf(stderr, "%s:%d: %s failed: %s (%s)\n", file, line, expr, cudaGetErrorName(err),
               cudaGetErrorString(err));
  return false;
}

}  // namespace af2_ext

// For host code outside torch (cuda_tests): a failed call prints the error and exits, because
// after most CUDA errors the context is unusable and later checks would only add noise.
#define CUDA_CHECK(expr)                                                   \
  do {                                                                     \
    if (!::af2_ext::cuda_check_ok((expr), #expr, __FILE__, __LINE__)) {    \
      std::exit(EXIT_FAILURE);                                             \
    }                                                                      \
  } while (0)
