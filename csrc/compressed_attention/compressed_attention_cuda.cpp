// CUDA binding of the key/value compression: checks, device guard, current stream, params, launch check.
// Compiled only against a CUDA torch (setup.py), and syntax-checked in CI against the CPU wheel
// (.ci/check_cuda_binding.sh).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/cuda_binding_utils.h"
#include "compressed_attention/compressed_attention.h"
#include "compressed_attention/compressed_attention_checks.h"

namespace af2_ext {
namespace {

// k and v need a unit stride on the head dim (copied otherwise); weight and bias go to the kernels in fp32.
struct Operands {
  at::Tensor k, v, weight, bias;  // bias undefined without one
};

// Only what the kernels will read is staged: in the backward, autograd passes shape-only stand-ins (expanded
// zeros) for k and v when the weight needs no gradient, and for the weight when k and v need none.
Operands prepare(const at::Tensor& k, const at::Tensor& v, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, bool need_kv = true, bool need_weight = true) {
  return {need_kv ? unit_last_stride(k) : at::Tensor(), need_kv ? unit_last_stride(v) : at::Tensor(),
          need_weight ? weight.to(at::kFloat).contiguous() : at::Tensor(),
          bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor()};
}

// The CUDA kernels' grid limits, named before anything is launched (the launchers would refuse the shape unnamed).
void check_cuda_limits(const KvCompressShape& s) {
  TORCH_CHECK(s.ratio <= cuda::kKvCompressMaxRatio, "kv_compress: ratio = ", s.ratio,
              " exceeds the CUDA kernels' limit of ", cuda::kKvCompressMaxRatio);
  TORCH_CHECK(s.seq_c <= cuda::kKvCompressMaxRows / s.batch, "kv_compress: B * ceil(Nk/ratio) = ", s.batch, " * ",
              s.seq_c, " compressed rows exceed the CUDA kernels' limit of ", cuda::kKvCompressMaxRows);
}

KvCompressCudaParams make_params(const KvCompressShape& s, ScalarKind dtype, const Operands& in) {
  KvCompressCudaParams p;
  p.s = s;
  p.dtype = dtype;
  if (in.k.defined()) {
    p.k = in.k.data_ptr();
    p.v = in.v.data_ptr();
    set_strides(p.k_stride, in.k);
    set_strides(p.v_stride, in.v);
  }
  p.weight = in.weight.defined() ? in.weight.data_ptr<float>() : nullptr;
  p.bias = in.bias.defined() ? in.bias.data_ptr<float>() : nullptr;
  return p;
}

std::tuple<at::Tensor, at::Tensor> kv_compress_forward_cuda(const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias, int64_t ratio) {
  const KvCompressShape s = check_kv_compress_inputs(k, v, weight, bias, ratio);
  TORCH_CHECK(k.is_cuda(), "k must be a CUDA tensor, got ", k.device());
  check_cuda_limits(s);
  const ScalarKind dtype = scalar_kind(k.scalar_type(), "k");
  const c10::cuda::CUDAGuard guard(k.device());
  const Operands in = prepare(k, v, weight, bias);
  auto kc = at::empty({s.batch, s.heads, s.seq_c, s.head_dim}, k.options());
  auto vc = at::empty_like(kc);
  KvCompressCudaParams p = make_params(s, dtype, in);
  p.kc = kc.data_ptr();
  p.vc = vc.data_ptr();
  check_launch(cuda::kv_compress_forward(p, c10::cuda::getCurrentCUDAStream().stream()), "kv_compress_forward");
  return {kc, vc};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kv_compress_backward_cuda(
    const at::Tensor& grad_kc, const at::Tensor& grad_vc, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t ratio, std::array<bool, 4> output_mask) {
  const KvCompressShape s = check_kv_compress_inputs(k, v, weight, bias, ratio);
  check_kv_compress_grads(grad_kc, grad_vc, k, s);
  TORCH_CHECK(k.is_cuda(), "k must be a CUDA tensor, got ", k.device());
  check_cuda_limits(s);
  const ScalarKind dtype = scalar_kind(k.scalar_type(), "k");
  const c10::cuda::CUDAGuard guard(k.device());
  const bool want_k = output_mask[0], want_v = output_mask[1], want_weight = output_mask[2];
  const bool want_bias = output_mask[3] && bias.has_value();
  const auto empty = at::empty({0}, k.options());
  if (!want_k && !want_v && !want_weight && !want_bias) return {empty, empty, empty, empty};

  const Operands in = prepare(k, v, weight, bias, /*need_kv=*/want_weight, /*need_weight=*/want_k || want_v);
  const auto gkc = grad_kc.contiguous(), gvc = grad_vc.contiguous();
  // (B, H, Nk, D) contiguous in k's (and v's) dtype; weight and bias gradients in fp32, converted below.
  const auto contiguous = k.options().memory_format(at::MemoryFormat::Contiguous);
  auto grad_k = want_k ? at::empty(k.sizes(), contiguous) : at::Tensor();
  auto grad_v = want_v ? at::empty(v.sizes(), contiguous) : at::Tensor();
  auto grad_weight = want_weight ? at::empty(weight.sizes(), weight.options().dtype(at::kFloat)) : at::Tensor();
  auto grad_bias = want_bias ? at::empty(in.bias.sizes(), in.bias.options()) : at::Tensor();
  // The row splits' partial sums of the weight and bias gradients (none for most shapes); allocated on the current
  // stream, which the kernels use, so the caching allocator may reuse it once they are done.
  const int64_t workspace_floats = cuda::kv_compress_backward_workspace_floats(s, want_weight, want_bias);
  auto workspace = workspace_floats > 0 ? at::empty({workspace_floats}, k.options().dtype(at::kFloat)) : at::Tensor();
  KvCompressCudaParams p = make_params(s, dtype, in);
  p.grad_kc = gkc.data_ptr();
  p.grad_vc = gvc.data_ptr();
  p.grad_k = want_k ? grad_k.data_ptr() : nullptr;
  p.grad_v = want_v ? grad_v.data_ptr() : nullptr;
  p.grad_weight = want_weight ? grad_weight.data_ptr<float>() : nullptr;
  p.grad_bias = want_bias ? grad_bias.data_ptr<float>() : nullptr;
  p.workspace = workspace_floats > 0 ? workspace.data_ptr<float>() : nullptr;
  check_launch(cuda::kv_compress_backward(p, c10::cuda::getCurrentCUDAStream().stream()), "kv_compress_backward");
  return {want_k ? grad_k : empty, want_v ? grad_v : empty,
          want_weight ? grad_weight.to(weight.scalar_type()) : empty,
          want_bias ? grad_bias.to(bias->scalar_type()) : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(af2_ext, CUDA, m) {
  m.impl("kv_compress_forward", &kv_compress_forward_cuda);
  m.impl("kv_compress_backward", &kv_compress_backward_cuda);
}

}  // namespace af2_ext
