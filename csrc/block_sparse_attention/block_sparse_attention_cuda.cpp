// CUDA binding of block-sparse attention: checks, device guard, current stream, params, launch check.
// Compiled only against a CUDA torch (setup.py), and syntax-checked in CI against the CPU wheel with a stub of
// the one generated c10 CUDA header it lacks (.ci/check_cuda_binding.sh).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cuda_runtime_api.h>

#include "block_sparse_attention/block_sparse_attention.h"
#include "block_sparse_attention/block_sparse_attention_checks.h"
#include "common/cuda_binding_utils.h"

namespace af2_ext {
namespace {

// The configuration's shared memory fits the device (the launchers would refuse it with a bare "invalid
// argument"). A caller error naming the sizes; ops.py asks first and falls back to the reference under "auto".
void check_smem(const BlockSparseShape& s, ScalarKind dtype, at::ScalarType scalar_type, bool backward,
                const at::Device& device) {
  const int64_t need = block_sparse_cuda_smem_bytes(dtype, s.head_dim, s.block_size, backward);
  const int64_t limit = cuda::smem_optin_limit();
  TORCH_CHECK(limit < 0 || need <= limit, "block_sparse_attention on ", device, ": ", scalar_type,
              " with head dim D=", s.head_dim, " and block_size=", s.block_size, " needs ", need,
              " bytes of shared memory per block", backward ? " (backward)" : "", ", more than this GPU's ", limit,
              "; use a smaller block_size or head dim, or impl=\"reference\"");
}

void fill_inputs(BlockSparseCudaParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& rc, const at::Tensor& ri, const at::Tensor& cc, const at::Tensor& ci,
                 const at::Tensor& kpm, const at::Tensor& bias, double scale) {
  p.dtype = scalar_kind(q.scalar_type(), "q");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  set_strides(p.q_stride, q);
  set_strides(p.k_stride, k);
  set_strides(p.v_stride, v);
  p.row_count = rc.data_ptr<int32_t>();
  p.row_index = ri.data_ptr<int32_t>();
  p.col_count = cc.data_ptr<int32_t>();
  p.col_index = ci.data_ptr<int32_t>();
  p.key_padding_mask = kpm.defined() ? kpm.data_ptr<bool>() : nullptr;
  if (bias.defined()) {
    p.bias = bias.data_ptr();
    p.bias_dtype = scalar_kind(bias.scalar_type(), "bias");
  }
  p.scale = float(scale);
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                const at::Tensor& row_count, const at::Tensor& row_index,
                                                const at::Tensor& col_count, const at::Tensor& col_index,
                                                int64_t block_size, const std::optional<at::Tensor>& key_padding_mask,
                                                const std::optional<at::Tensor>& bias, double scale) {
  const BlockSparseShape s = check_block_sparse_inputs(q_in, k_in, v_in, row_count, row_index, col_count, col_index,
                                                       block_size, key_padding_mask, bias);
  TORCH_CHECK(q_in.is_cuda(), "q must be a CUDA tensor, got ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  check_smem(s, scalar_kind(q_in.scalar_type(), "q"), q_in.scalar_type(), false, q_in.device());
  const auto q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const auto rc = row_count.contiguous(), ri = row_index.contiguous();
  const auto cc = col_count.contiguous(), ci = col_index.contiguous();
  const auto kpm = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  const auto bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({s.batch, s.heads, s.seq_q}, q.options().dtype(at::kFloat));
  BlockSparseCudaParams p;
  p.s = s;
  fill_inputs(p, q, k, v, rc, ri, cc, ci, kpm, bias_c, scale);
  p.out = out.data_ptr();
  set_strides(p.out_stride, out);
  p.lse = lse.data_ptr<float>();
  check_launch(cuda::forward(p, c10::cuda::getCurrentCUDAStream().stream()), "block_sparse_attention_forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const at::Tensor& row_count, const at::Tensor& row_index,
    const at::Tensor& col_count, const at::Tensor& col_index, int64_t block_size,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& bias, double scale,
    std::array<bool, 4> output_mask) {
  const BlockSparseShape s = check_block_sparse_inputs(q_in, k_in, v_in, row_count, row_index, col_count, col_index,
                                                       block_size, key_padding_mask, bias);
  TORCH_CHECK(q_in.is_cuda(), "q must be a CUDA tensor, got ", q_in.device());
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "grad_out and out must have q's shape ", q_in.sizes(), ", got ", grad_out_in.sizes(), " and ",
              out_in.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.batch && lse.size(1) == s.heads && lse.size(2) == s.seq_q &&
                  lse.scalar_type() == at::kFloat,
              "lse must be float32 (B, H, Nq) = (", s.batch, ", ", s.heads, ", ", s.seq_q, "), got ",
              lse.scalar_type(), " ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  check_smem(s, scalar_kind(q_in.scalar_type(), "q"), q_in.scalar_type(), true, q_in.device());
  const bool want_q = output_mask[0], want_kv = output_mask[1] || output_mask[2];
  const bool want_bias = output_mask[3] && bias.has_value();
  const auto q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const auto grad_out = unit_last_stride(grad_out_in.to(q.scalar_type()));
  const auto out = unit_last_stride(out_in.to(q.scalar_type()));  // the delta kernel reads out in q's dtype
  const auto rc = row_count.contiguous(), ri = row_index.contiguous();
  const auto cc = col_count.contiguous(), ci = col_index.contiguous();
  const auto kpm = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  const auto bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto lse_c = lse.contiguous();
  auto delta = at::empty({s.batch, s.heads, s.seq_q}, q.options().dtype(at::kFloat));
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  auto gq = want_q ? at::empty(q.sizes(), contiguous) : at::Tensor();
  auto gk = want_kv ? at::empty(k.sizes(), contiguous) : at::Tensor();
  auto gv = want_kv ? at::empty(v.sizes(), contiguous) : at::Tensor();
  const int64_t workspace_floats = block_sparse_backward_workspace_floats(s, want_bias);
  // Without a split the row pass adds into grad_bias itself (zeroed); with one, the last pass writes all of it.
  const auto bias_grad_options = bias_c.defined() ? bias_c.options().dtype(at::kFloat) : q.options();
  auto gb = !want_bias ? at::Tensor()
            : workspace_floats > 0 ? at::empty(bias_c.sizes(), bias_grad_options)
                                   : at::zeros(bias_c.sizes(), bias_grad_options);
  auto workspace = workspace_floats > 0 ? at::empty({workspace_floats}, q.options().dtype(at::kFloat)) : at::Tensor();
  BlockSparseCudaParams p;
  p.s = s;
  fill_inputs(p, q, k, v, rc, ri, cc, ci, kpm, bias_c, scale);
  p.out = const_cast<void*>(out.data_ptr());  // read only in the backward (delta)
  set_strides(p.out_stride, out);
  p.lse = const_cast<float*>(lse_c.data_ptr<float>());  // read only in the backward
  p.grad_out = grad_out.data_ptr();
  set_strides(p.grad_out_stride, grad_out);
  p.delta = delta.data_ptr<float>();
  p.grad_q = want_q ? gq.data_ptr() : nullptr;
  p.grad_k = want_kv ? gk.data_ptr() : nullptr;
  p.grad_v = want_kv ? gv.data_ptr() : nullptr;
  p.grad_bias = want_bias ? gb.data_ptr<float>() : nullptr;
  p.workspace = workspace.defined() ? workspace.data_ptr<float>() : nullptr;
  check_launch(cuda::backward(p, c10::cuda::getCurrentCUDAStream().stream()), "block_sparse_attention_backward");
  const auto empty = at::empty({0}, q.options());
  return {want_q ? gq : empty, want_kv && output_mask[1] ? gk : empty, want_kv && output_mask[2] ? gv : empty,
          want_bias ? gb.to(bias->scalar_type()) : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(af2_ext, CUDA, m) {
  m.impl("block_sparse_attention_forward", &forward_cuda);
  m.impl("block_sparse_attention_backward", &backward_cuda);
}

}  // namespace af2_ext
