// CPU binding of the key/value compression: checks, fp32 (or fp64) staging, the packed weight layouts the
// kernels stream, and at::parallel_for over the kernels' tasks (compressed_attention_cpu_kernel.{h,cpp}).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "compressed_attention/compressed_attention.h"
#include "compressed_attention/compressed_attention_checks.h"
#include "common/binding_utils.h"
#include "common/cpu_isa.h"

#include <vector>

namespace af2_ext {
namespace {

// weight (H*D, D, ratio) -> (H, D_out, D_in, ratio) view, permuted to the kernels' packed layouts.
at::Tensor weight_view(const at::Tensor& weight, const KvCompressShape& s, at::ScalarType acc) {
  return weight.to(acc).reshape({s.heads, s.head_dim, s.head_dim, s.ratio});
}

// bf16 on bf16 dot products (cpu::kv_compress_forward_bf16): k and v read in place (rows an even number of elements
// apart, else copied), the weight rounded to bf16 and packed in D-pairs, kc and vc written in bf16.
std::tuple<at::Tensor, at::Tensor> kv_compress_forward_bf16_cpu(const KvCompressShape& s, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias) {
  const auto kb = even_rows(k), vb = even_rows(v);
  const auto w_in_out = weight_view(weight, s, at::kFloat).permute({0, 3, 2, 1}).contiguous();  // [h][t][d][e]
  const auto w_pairs = w_in_out.to(at::kBFloat16)
                           .reshape({s.heads, s.ratio, s.head_dim / 2, 2, s.head_dim})
                           .permute({0, 1, 2, 4, 3})
                           .contiguous()
                           .view(at::kInt);  // [h][t][d / 2][e]: (W[2dp][e], W[2dp + 1][e])
  const auto bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const auto options = k.options().memory_format(at::MemoryFormat::Contiguous);
  auto kc = at::empty({s.batch, s.heads, s.seq_c, s.head_dim}, options);
  auto vc = at::empty_like(kc);
  KvCompressBf16Params p;
  p.s = s;
  p.k = bf16_bits(kb);
  p.v = bf16_bits(vb);
  set_strides(p.k_stride, kb);
  set_strides(p.v_stride, vb);
  p.weight_pairs = reinterpret_cast<const uint32_t*>(w_pairs.data_ptr<int32_t>());
  p.weight_in_out = w_in_out.data_ptr<float>();
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.kc = bf16_bits_mut(kc);
  p.vc = bf16_bits_mut(vc);
  at::parallel_for(0, cpu::kv_compress_forward_num_tasks(s), 1, [&](int64_t b, int64_t e) {
    std::vector<float> workspace(cpu::kv_compress_bf16_workspace_floats(s));
    cpu::kv_compress_forward_bf16(p, b, e, workspace.data());
  });
  return {kc, vc};
}

std::tuple<at::Tensor, at::Tensor> kv_compress_forward_cpu(const at::Tensor& k, const at::Tensor& v,
                                                           const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias, int64_t ratio) {
  const KvCompressShape s = check_kv_compress_inputs(k, v, weight, bias, ratio);
  if (k.scalar_type() == at::kBFloat16 && cpu::bf16_kernels_available())
    return kv_compress_forward_bf16_cpu(s, k, v, weight, bias);
  const auto acc = cpu_accumulate_type(k.scalar_type());
  const auto ka = staged(k, acc), va = staged(v, acc);
  const auto w_in_out = weight_view(weight, s, acc).permute({0, 3, 2, 1}).contiguous();  // [h][t][d][e]
  const auto bias_a = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  auto kc = at::empty({s.batch, s.heads, s.seq_c, s.head_dim}, ka.options().memory_format(at::MemoryFormat::Contiguous));
  auto vc = at::empty_like(kc);
  AT_DISPATCH_FLOATING_TYPES(acc, "kv_compress_forward_cpu", [&] {
    KvCompressCpuParams<scalar_t> p;
    p.s = s;
    p.k = ka.data_ptr<scalar_t>();
    p.v = va.data_ptr<scalar_t>();
    set_strides(p.k_stride, ka);
    set_strides(p.v_stride, va);
    p.weight_in_out = w_in_out.data_ptr<scalar_t>();
    p.bias = bias_a.defined() ? bias_a.data_ptr<scalar_t>() : nullptr;
    p.kc = kc.data_ptr<scalar_t>();
    p.vc = vc.data_ptr<scalar_t>();
    at::parallel_for(0, cpu::kv_compress_forward_num_tasks(s), 1,
                   [&](int64_t b, int64_t e) { cpu::kv_compress_forward<scalar_t>(p, b, e); });
  });
  return {kc.to(k.scalar_type()), vc.to(k.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kv_compress_backward_cpu(
    const at::Tensor& grad_kc, const at::Tensor& grad_vc, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t ratio, std::array<bool, 4> output_mask) {
  const KvCompressShape s = check_kv_compress_inputs(k, v, weight, bias, ratio);
  check_kv_compress_grads(grad_kc, grad_vc, k, s);
  const bool want_k = output_mask[0], want_v = output_mask[1], want_w = output_mask[2];
  const bool want_b = output_mask[3] && bias.has_value();
  const auto acc = cpu_accumulate_type(k.scalar_type());
  // Only what the wanted gradients read is staged: autograd passes shape-only stand-ins (expanded zeros) for
  // k and v when the weight needs no gradient, and for the weight when k and v need none.
  const auto ka = want_w ? staged(k, acc) : at::Tensor(), va = want_w ? staged(v, acc) : at::Tensor();
  const auto gkc = grad_kc.to(acc).contiguous(), gvc = grad_vc.to(acc).contiguous();
  const auto w_out_in = want_k || want_v ? weight_view(weight, s, acc).permute({0, 3, 1, 2}).contiguous()
                                         : at::Tensor();  // [h][t][e][d]
  const auto options = gkc.options().memory_format(at::MemoryFormat::Contiguous);
  auto gk = want_k ? at::empty({s.batch, s.heads, s.seq_k, s.head_dim}, options) : at::Tensor();
  auto gv = want_v ? at::empty({s.batch, s.heads, s.seq_k, s.head_dim}, options) : at::Tensor();
  auto gw = want_w ? at::empty({s.heads, s.ratio, s.head_dim, s.head_dim}, options) : at::Tensor();
  auto gb = want_b ? at::empty({s.heads * s.head_dim}, options) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "kv_compress_backward_cpu", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    KvCompressCpuParams<scalar_t> p;
    p.s = s;
    p.k = ptr(ka);
    p.v = ptr(va);
    if (want_w) {
      set_strides(p.k_stride, ka);
      set_strides(p.v_stride, va);
    }
    p.weight_out_in = ptr(w_out_in);
    p.grad_kc = ptr(gkc);
    p.grad_vc = ptr(gvc);
    p.grad_k = ptr(gk);
    p.grad_v = ptr(gv);
    p.grad_weight_out_in = ptr(gw);
    p.grad_bias = ptr(gb);
    if (want_k || want_v)
      at::parallel_for(0, cpu::kv_compress_backward_input_num_tasks(s), 1,
                     [&](int64_t b, int64_t e) { cpu::kv_compress_backward_input<scalar_t>(p, b, e); });
    if (want_w || want_b)
      at::parallel_for(0, cpu::kv_compress_backward_weight_num_tasks(s), 1,
                     [&](int64_t b, int64_t e) { cpu::kv_compress_backward_weight<scalar_t>(p, b, e); });
  });
  const auto empty = at::empty({0}, k.options());
  return {want_k ? gk.to(k.scalar_type()) : empty, want_v ? gv.to(v.scalar_type()) : empty,
          // [h][t][e][d] -> the convolution's (H*D, D, ratio)
          want_w ? gw.permute({0, 2, 3, 1}).reshape({s.heads * s.head_dim, s.head_dim, s.ratio}).to(weight.scalar_type())
                 : empty,
          want_b ? gb.to(bias->scalar_type()) : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(af2_ext, CPU, m) {
  m.impl("kv_compress_forward", &kv_compress_forward_cpu);
  m.impl("kv_compress_backward", &kv_compress_backward_cpu);
}

}  // namespace af2_ext
