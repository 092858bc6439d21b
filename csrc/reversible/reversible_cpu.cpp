// CPU kernels and binding of the fused coupling ops: elementwise, fp32 (fp64) arithmetic, at::parallel_for.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "reversible/reversible.h"
#include "reversible/reversible_checks.h"

namespace af2_ext {
namespace {

constexpr int64_t kGrain = 1 << 15;

// dst[i] = dst[i] + sign * src[i] for i in [begin, end), in the op-math type of dst.
template <typename T, typename S>
void update_range(T* dst, const S* src, int64_t begin, int64_t end, bool subtract) {
  using acc_t = at::opmath_type<T>;
  if (subtract) {
    for (int64_t i = begin; i < end; ++i) dst[i] = T(acc_t(dst[i]) - acc_t(src[i]));
  } else {
    for (int64_t i = begin; i < end; ++i) dst[i] = T(acc_t(dst[i]) + acc_t(src[i]));
  }
}

void update_range(const at::Tensor& dst, const at::Tensor& src, int64_t begin, int64_t end, bool subtract) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "coupling_update_cpu", [&] {
    scalar_t* d = dst.data_ptr<scalar_t>();
    switch (src.scalar_type()) {
      case at::kFloat: update_range(d, src.data_ptr<float>(), begin, end, subtract); break;
      case at::kHalf: update_range(d, src.data_ptr<at::Half>(), begin, end, subtract); break;
      case at::kBFloat16: update_range(d, src.data_ptr<at::BFloat16>(), begin, end, subtract); break;
      default: update_range(d, src.data_ptr<scalar_t>(), begin, end, subtract); break;  // fp64 with fp64
    }
  });
}

void coupling_forward_cpu(const at::Tensor& x, const at::Tensor& f) {
  check_coupling_pair(x, f, "x", "f");
  check_no_partial_overlap(x, f, "x", "f");
  const auto fc = f.contiguous();
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) { update_range(x, fc, begin, end, false); });
}

// One parallel loop over both ranges: [0, n_y) rebuilds y, [n_y, n_y + n_grad) accumulates the gradient.
void coupling_backward_cpu(const at::Tensor& y, const at::Tensor& f, const at::Tensor& grad, const at::Tensor& vjp) {
  check_coupling_pair(y, f, "y", "f");
  check_coupling_pair(grad, vjp, "grad", "vjp");
  TORCH_CHECK(grad.device() == y.device(), "grad must be on y's device ", y.device(), ", got ", grad.device());
  check_coupling_overlaps(y, f, grad, vjp);
  const auto fc = f.contiguous(), vc = vjp.contiguous();
  const int64_t ny = y.numel(), ng = grad.numel();
  at::parallel_for(0, ny + ng, kGrain, [&](int64_t begin, int64_t end) {
    if (begin < ny) update_range(y, fc, begin, std::min(end, ny), true);
    if (end > ny) update_range(grad, vc, std::max(begin, ny) - ny, end - ny, false);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(af2_ext, CPU, m) {
  m.impl("coupling_forward_", &coupling_forward_cpu);
  m.impl("coupling_backward_", &coupling_backward_cpu);
}

}  // namespace af2_ext
