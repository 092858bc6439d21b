// CUDA binding of the fused coupling ops: checks, device guard, current stream, launch check.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/cuda_binding_utils.h"
#include "reversible/reversible.h"
#include "reversible/reversible_checks.h"

namespace af2_ext {
namespace {

CouplingUpdate make_update(const at::Tensor& dst, const at::Tensor& src, float sign, const char* dst_name,
                           const char* src_name) {
  CouplingUpdate u;
  u.n = dst.numel();
  u.dst_dtype = scalar_kind(dst.scalar_type(), dst_name);
  u.src_dtype = scalar_kind(src.scalar_type(), src_name);
  u.dst = dst.data_ptr();
  u.src = src.data_ptr();
  u.sign = sign;
  return u;
}

void launch(const CouplingUpdate& first, const CouplingUpdate& second, const char* what) {
  check_launch(cuda::coupling_update(first, second, c10::cuda::getCurrentCUDAStream().stream()), what);
}

void coupling_forward_cuda(const at::Tensor& x, const at::Tensor& f) {
  check_coupling_pair(x, f, "x", "f");
  check_no_partial_overlap(x, f, "x", "f");
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fc = f.contiguous();
  launch(make_update(x, fc, 1.f, "x", "f"), CouplingUpdate{}, "coupling_forward_");
}

void coupling_backward_cuda(const at::Tensor& y, const at::Tensor& f, const at::Tensor& grad, const at::Tensor& vjp) {
  check_coupling_pair(y, f, "y", "f");
  check_coupling_pair(grad, vjp, "grad", "vjp");
  TORCH_CHECK(y.is_cuda(), "y must be a CUDA tensor, got ", y.device());
  TORCH_CHECK(grad.device() == y.device(), "grad must be on y's device ", y.device(), ", got ", grad.device());
  check_coupling_overlaps(y, f, grad, vjp);
  const c10::cuda::CUDAGuard guard(y.device());
  const auto fc = f.contiguous(), vc = vjp.contiguous();
  launch(make_update(y, fc, -1.f, "y", "f"), make_update(grad, vc, 1.f, "grad", "vjp"), "coupling_backward_");
}

}  // namespace

TORCH_LIBRARY_IMPL(af2_ext, CUDA, m) {
  m.impl("coupling_forward_", &coupling_forward_cuda);
  m.impl("coupling_backward_", &coupling_backward_cuda);
}

}  // namespace af2_ext
