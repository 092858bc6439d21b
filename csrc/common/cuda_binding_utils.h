#pragma once
// Helpers shared by the torch bindings of the CUDA ops (csrc/<op>/<op>_cuda.cpp): the kernels' dtype tag, the
// layout the kernels read, and the launch check. Host-only; needs torch and the CUDA runtime headers.
#include <torch/types.h>

#include <cuda_runtime_api.h>

#include <cstdint>

#include "block_sparse_attention/block_sparse_attention.h"  // ScalarKind

namespace af2_ext {

// The kernels' dtype tag; any other dtype is a caller error naming the argument.
inline ScalarKind scalar_kind(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16 on CUDA, got ", t);
  }
}

// The kernels need a unit stride on the head dim; anything else is copied once.
inline at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// {batch, head, row} strides of a (B, H, N, D) tensor, in elements.
inline void set_strides(int64_t (&dst)[3], const at::Tensor& t) {
  dst[0] = t.stride(0);
  dst[1] = t.stride(1);
  dst[2] = t.stride(2);
}

// `err`: a launcher's return value (a cudaError_t as int).
inline void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace af2_ext
