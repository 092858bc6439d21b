#pragma once
// Argument checks shared by the CPU and CUDA bindings of the coupling ops; af2_ext/ops.py mirrors them.
#include <ATen/MemoryOverlap.h>
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

// dst is written element by element while src is read: src may be dst itself, but a partial overlap (a shifted
// view of the same storage) would read elements already written. (TooHard, a non-dense view, is copied by the
// bindings before the kernels read it.)
inline void check_no_partial_overlap(const at::Tensor& dst, const at::Tensor& src, const char* dst_name,
                                     const char* src_name) {
  TORCH_CHECK(at::get_overlap_status(dst, src) != at::MemOverlapStatus::Partial, src_name,
              " must not partially overlap ", dst_name, " (it is read while ", dst_name, " is written)");
}

inline void check_no_overlap(const at::Tensor& written, const at::Tensor& other, const char* written_name,
                             const char* other_name) {
  const auto status = at::get_overlap_status(written, other);
  TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, other_name,
              " must not overlap ", written_name, " (", written_name, " is updated in place)");
}

// coupling_backward_ writes y and grad: they must not alias each other or the other pair's input.
inline void check_coupling_overlaps(const at::Tensor& y, const at::Tensor& f, const at::Tensor& grad,
                                    const at::Tensor& vjp) {
  check_no_overlap(grad, y, "grad", "y");
  check_no_partial_overlap(y, f, "y", "f");
  check_no_partial_overlap(grad, vjp, "grad", "vjp");
  check_no_overlap(y, vjp, "y", "vjp");
  check_no_overlap(grad, f, "grad", "f");
}

}  // namespace af2_ext
