#pragma once
// Fused coupling steps of reversible recompute (af2_ext/reversible.py). Plain C++, no torch headers.
//
//   forward:  x += f                      (y = x + f, in place on the coupling's target half)
//   backward: y -= f;  grad += vjp        (rebuild the target's input, and accumulate the gradient of the
//                                          coupling's input half: one launch, each buffer read and written once)
// Arithmetic is fp32 for fp32/fp16/bf16 storage (a rounded fp32 result is stored), fp64 for fp64 (CPU).
// The added tensor (f, vjp) may be in the buffer's dtype or in any of fp32, fp16, bf16 (e.g. a bf16 function
// output under autocast added to fp32 storage, or an fp32 output to bf16 storage): it is never rounded before
// the add.
#include <cstdint>

#include "block_sparse_attention/block_sparse_attention.h"  // ScalarKind, CUstream_st

namespace af2_ext {

// One in-place update dst[i] = dst[i] + sign * src[i], i < n; both contiguous.
struct CouplingUpdate {
  int64_t n = 0;
  ScalarKind dst_dtype = ScalarKind::kFloat32;
  ScalarKind src_dtype = ScalarKind::kFloat32;
  void* dst = nullptr;
  const void* src = nullptr;
  float sign = 1.f;
};

namespace cuda {

// Applies up to two updates in one launch (the second is skipped when its n is 0). Returns the launch error
// (a cudaError_t as int, 0 = success) without syncing. dst ranges must not overlap each other or a src.
int coupling_update(const CouplingUpdate& first, const CouplingUpdate& second, CUstream_st* stream);

}  // namespace cuda
}  // namespace af2_ext
