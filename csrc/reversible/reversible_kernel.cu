// CUDA kernel of the fused coupling ops: one grid-stride elementwise kernel applying up to two in-place
// updates (dst += sign * src) with fp32 arithmetic. Memory-bound: each element is read and written once.
// No torch headers (cuda_tests include this file's launcher directly).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "reversible/reversible.h"

namespace af2_ext {
namespace {

// The dtype switch is uniform across the grid, so it costs no divergence.
__device__ __forceinline__ float load_as_float(const void* p, ScalarKind kind, int64_t i) {
  switch (kind) {
    case ScalarKind::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case ScalarKind::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, ScalarKind kind, int64_t i, float v) {
  switch (kind) {
    case ScalarKind::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case ScalarKind::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

__device__ __forceinline__ void apply(const CouplingUpdate& u, int64_t i) {
  const float v = load_as_float(u.dst, u.dst_dtype, i) + u.sign * load_as_float(u.src, u.src_dtype, i);
  store_from_float(u.dst, u.dst_dtype, i, v);
}

__global__ void coupling_update_kernel(const CouplingUpdate first, const CouplingUpdate second) {
  const int64_t total = first.n + second.n;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    if (i < first.n) {
      apply(first, i);
    } else {
      apply(second, i - first.n);
    }
  }
}

}  // namespace

namespace cuda {

int coupling_update(const CouplingUpdate& first, const CouplingUpdate& second, CUstream_st* stream) {
  const int64_t total = first.n + second.n;
  if (total == 0) return 0;
  constexpr int kThreads = 256;
  // Enough blocks to fill any current GPU several times over; the grid-stride loop covers the rest.
  const int64_t blocks = ceil_div<int64_t>(total, kThreads);
  const int grid = int(blocks < 65536 ? blocks : 65536);
  coupling_update_kernel<<<grid, kThreads, 0, stream>>>(first, second);
  return int(cudaGetLastError());
}

}  // namespace cuda
}  // namespace af2_ext
