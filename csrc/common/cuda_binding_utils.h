#pragma once
// Helpers shared by the torch bindings of the CUDA ops (csrc/<op>/<op>_cuda.cpp): the kernels' dtype tag and the
// launch check (plus common/binding_utils.h: strides and staging). Host-only; needs torch and the CUDA runtime headers.
#include <torch/types.h>

#include <cuda_runtime_api.h>

#include <cstdint>

#include "block_sparse_attention/block_sparse_attention.h"  // ScalarKind
#include "common/binding_utils.h"

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

// `err`: a launcher's return value (a cudaError_t as int).
inline void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace af2_ext
