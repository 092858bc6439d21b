#pragma once
// Argument checks shared by the CPU and CUDA bindings of the coupling ops; af2_ext/ops.py mirrors them.
#include <torch/types.h>

namespace af2_ext {

// dst: the buffer updated in place (contiguous); src: same shape and device, dst's dtype or float32.
inline void check_coupling_pair(const at::Tensor& dst, const at::Tensor& src, const char* dst_name,
                                const char* src_name) {
  const auto dtype = dst.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              dst_name, " must be float32, float16 or bfloat16 (float64 on CPU), got ", dtype);
  TORCH_CHECK(dst.is_contiguous(), dst_name, " must be contiguous (it is updated in place)");
  TORCH_CHECK(src.sizes() == dst.sizes(), src_name, " must have ", dst_name, "'s shape ", dst.sizes(), ", got ",
              src.sizes());
  const auto st = src.scalar_type();
  TORCH_CHECK(st == dtype || st == at::kFloat || st == at::kHalf || st == at::kBFloat16, src_name, " must have ",
              dst_name, "'s dtype ", dtype, " or be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(src.device() == dst.device(), src_name, " must be on ", dst_name, "'s device ", dst.device(),
              ", got ", src.device());
}

}  // namespace af2_ext
