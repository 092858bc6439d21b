// CPU binding of block-sparse attention: checks, fp32 (or fp64) staging copies, and at::parallel_for over the
// kernel's tasks. The kernels themselves live in block_sparse_attention_cpu_kernel.{h,cpp}.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "block_sparse_attention/block_sparse_attention.h"
#include "block_sparse_attention/block_sparse_attention_checks.h"
#include "common/binding_utils.h"
#include "common/cpu_isa.h"

namespace af2_ext {
namespace {

// Every counted entry must be a valid block, strictly ascending: a repeated block would be counted twice.
void check_index_values(const at::Tensor& count, const at::Tensor& index, const char* name, int64_t limit) {
  const auto c = count.contiguous();
  const auto idx = index.contiguous();
  const int32_t* cp = c.data_ptr<int32_t>();
  const int32_t* ip = idx.data_ptr<int32_t>();
  const int64_t rows = c.numel(), width = idx.size(2);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(cp[r] >= 0 && cp[r] <= width, name, ": count ", cp[r], " out of range [0, ", width, "]");
    for (int32_t e = 0; e < cp[r]; ++e) {
      const int32_t v = ip[r * width + e];
      TORCH_CHECK(v >= 0 && v < limit && (e == 0 || v > ip[r * width + e - 1]), name,
                  ": block indices must be ascending and in [0, ", limit, "), got ", v);
    }
  }
}

// (B, Nk): 0 where a key is visible, -inf where it is padded; undefined without a mask.
at::Tensor additive_key_mask(const std::optional<at::Tensor>& key_padding_mask, at::ScalarType acc) {
  if (!key_padding_mask.has_value()) return at::Tensor();
  const double inf = std::numeric_limits<double>::infinity();
  return at::full(key_padding_mask->sizes(), -inf, at::TensorOptions().dtype(acc)).masked_fill_(*key_padding_mask, 0.0);
}

// AF2_EXT_CPU_BACKWARD (read per call): "auto" (default) takes the fused pass where it is valid and has enough
// (batch, head) tasks for the threads, "fused" wherever it is valid, "two_pass" never: tests run every path
// against the reference, benchmarks measure one against the other.
enum class BackwardPlan { automatic, fused, two_pass };

BackwardPlan backward_plan() {
  const char* v = std::getenv("AF2_EXT_CPU_BACKWARD");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return BackwardPlan::automatic;
  if (std::strcmp(v, "fused") == 0) return BackwardPlan::fused;
  if (std::strcmp(v, "two_pass") == 0) return BackwardPlan::two_pass;
  TORCH_CHECK(false, "AF2_EXT_CPU_BACKWARD must be 'auto', 'fused' or 'two_pass', got '", v, "'");
}

// (B, H, num_k_blocks) uint8: 1 where a padded key of the block holds a non-finite k or v (see the params'
// padded_nonfinite). Reads only the padded rows.
template <typename T>
at::Tensor padded_nonfinite_blocks(const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask_add,
                                   const BlockSparseShape& s) {
  auto flags = at::zeros({s.batch, s.heads, s.num_k_blocks}, at::TensorOptions().dtype(at::kByte));
  uint8_t* f = flags.data_ptr<uint8_t>();
  const T* m = mask_add.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  at::parallel_for(0, s.batch * s.heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.heads, h = bh % s.heads;
      const T* kr = kp + b * k.stride(0) + h * k.stride(1);
      const T* vr = vp + b * v.stride(0) + h * v.stride(1);
      for (int64_t j = 0; j < s.seq_k; ++j) {
        if (m[b * s.seq_k + j] == T(0)) continue;
        bool finite = true;
        for (int64_t d = 0; d < s.head_dim; ++d)
          finite &= std::isfinite(kr[j * k.stride(2) + d]) && std::isfinite(vr[j * v.stride(2) + d]);
        if (!finite) f[bh * s.num_k_blocks + j / s.block_size] = 1;
      }
    }
  });
  return flags;
}

template <typename T, typename Fn>
void parallel_tasks(int64_t num_tasks, int64_t workspace_elems, const Fn& fn) {
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> workspace(workspace_elems);
    fn(begin, end, workspace.data());
  });
}

// delta (B, H, Nq) = rowsum(grad_out * out) in Acc, one query row at a time, both (B, H, Nq, D) read in In at
// their strides (head dim contiguous).
template <typename In, typename Acc>
void rowsum_product(const at::Tensor& grad_out, const at::Tensor& out, at::Tensor& delta) {
  const In* g = grad_out.data_ptr<In>();
  const In* o = out.data_ptr<In>();
  Acc* dl = delta.data_ptr<Acc>();
  const int64_t D = out.size(3), H = out.size(1), Nq = out.size(2);
  at::parallel_for(0, delta.numel(), 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * Nq), h = (r / Nq) % H, i = r % Nq;
      const In* gr = g + b * grad_out.stride(0) + h * grad_out.stride(1) + i * grad_out.stride(2);
      const In* orow = o + b * out.stride(0) + h * out.stride(1) + i * out.stride(2);
      Acc sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += Acc(gr[d]) * Acc(orow[d]);
      dl[r] = sum;
    }
  });
}

// (B, H, ceil(N / 2), D) int32: x's rows in pairs (cpu::pack_v_pairs_bf16), padded keys' rows zero.
at::Tensor key_pairs(const BlockSparseShape& s, const at::Tensor& x, const at::Tensor& mask_add) {
  auto pairs = at::empty({s.batch, s.heads, (s.seq_k + 1) / 2, s.head_dim}, x.options().dtype(at::kInt));
  PackVPairsBf16 pack;
  pack.s = s;
  pack.v = bf16_bits(x);
  set_strides(pack.v_stride, x);
  pack.mask_add = mask_add.defined() ? mask_add.data_ptr<float>() : nullptr;
  pack.v_pairs = reinterpret_cast<uint32_t*>(pairs.data_ptr<int32_t>());
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t b, int64_t e) { cpu::pack_v_pairs_bf16(pack, b, e); });
  return pairs;
}

// bf16 on the CPU's bf16 dot products: q, k read in place as bf16 (k's rows an even number of elements apart, for
// the kernel's 32-bit pair loads), v packed once into key pairs, out written in bf16, lse in fp32.
std::tuple<at::Tensor, at::Tensor> forward_bf16_cpu(const BlockSparseShape& s, const at::Tensor& q,
                                                    const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& row_count, const at::Tensor& row_index,
                                                    const std::optional<at::Tensor>& key_padding_mask,
                                                    const std::optional<at::Tensor>& bias, double scale) {
  const auto qb = unit_last_stride(q), kb = even_rows(k);
  const auto mask_add = additive_key_mask(key_padding_mask, at::kFloat);
  const auto bias_t = bias.has_value() ? bias->to(at::kFloat).transpose(2, 3).contiguous() : at::Tensor();
  const auto rc = row_count.contiguous();
  const auto ri = row_index.contiguous();
  const auto v_pairs = key_pairs(s, unit_last_stride(v), mask_add);
  auto out = at::empty({s.batch, s.seq_q, s.heads, s.head_dim}, q.options()).permute({0, 2, 1, 3});
  auto lse = at::empty({s.batch, s.heads, s.seq_q}, q.options().dtype(at::kFloat));
  BlockSparseCpuForwardBf16 p;
  p.s = s;
  p.q = bf16_bits(qb);
  p.k = bf16_bits(kb);
  set_strides(p.q_stride, qb);
  set_strides(p.k_stride, kb);
  p.v_pairs = reinterpret_cast<const uint32_t*>(v_pairs.data_ptr<int32_t>());
  p.bias_t = bias_t.defined() ? bias_t.data_ptr<float>() : nullptr;
  p.mask_add = mask_add.defined() ? mask_add.data_ptr<float>() : nullptr;
  p.row_count = rc.data_ptr<int32_t>();
  p.row_index = ri.data_ptr<int32_t>();
  p.scale = float(scale);
  p.out = bf16_bits_mut(out);
  set_strides(p.out_stride, out);
  p.lse = lse.data_ptr<float>();
  parallel_tasks<float>(cpu::forward_num_tasks(s), cpu::forward_bf16_workspace_floats(s),
                        [&](int64_t b, int64_t e, float* ws) { cpu::forward_bf16(p, b, e, ws); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& row_count, const at::Tensor& row_index,
                                               const at::Tensor& col_count, const at::Tensor& col_index,
                                               int64_t block_size,
                                               const std::optional<at::Tensor>& key_padding_mask,
                                               const std::optional<at::Tensor>& bias, double scale) {
  const BlockSparseShape s = check_block_sparse_inputs(q, k, v, row_count, row_index, col_count, col_index,
                                                       block_size, key_padding_mask, bias);
  check_index_values(row_count, row_index, "row_index", s.num_k_blocks);
  if (q.scalar_type() == at::kBFloat16 && cpu::bf16_kernels_available())
    return forward_bf16_cpu(s, q, k, v, row_count, row_index, key_padding_mask, bias, scale);
  const auto acc = cpu_accumulate_type(q.scalar_type());
  const auto qa = staged(q, acc), ka = staged(k, acc), va = staged(v, acc);
  const auto mask_add = additive_key_mask(key_padding_mask, acc);
  // The kernels add the bias to scores kept keys x queries: transposed once here, not at every block of every row.
  const auto bias_t = bias.has_value() ? bias->to(acc).transpose(2, 3).contiguous() : at::Tensor();
  const auto rc = row_count.contiguous();
  const auto ri = row_index.contiguous();
  // (B, H, Nq, D) in (B, Nq, H, D) memory: "b h n d -> b n (h d)", what the output projection reads, is then a
  // view, not a copy of the whole output (and the copy's storage) per call.
  auto out = at::empty({s.batch, s.seq_q, s.heads, s.head_dim}, qa.options()).permute({0, 2, 1, 3});
  auto lse = at::empty({s.batch, s.heads, s.seq_q}, qa.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "block_sparse_attention_forward_cpu", [&] {
    BlockSparseCpuForward<scalar_t> p;
    p.s = s;
    p.q = qa.data_ptr<scalar_t>();
    p.k = ka.data_ptr<scalar_t>();
    p.v = va.data_ptr<scalar_t>();
    set_strides(p.q_stride, qa);
    set_strides(p.k_stride, ka);
    set_strides(p.v_stride, va);
    p.bias_t = bias_t.defined() ? bias_t.data_ptr<scalar_t>() : nullptr;
    p.mask_add = mask_add.defined() ? mask_add.data_ptr<scalar_t>() : nullptr;
    const auto nonfinite = mask_add.defined() ? padded_nonfinite_blocks<scalar_t>(ka, va, mask_add, s) : at::Tensor();
    p.padded_nonfinite = nonfinite.defined() ? nonfinite.data_ptr<uint8_t>() : nullptr;
    p.row_count = rc.data_ptr<int32_t>();
    p.row_index = ri.data_ptr<int32_t>();
    p.scale = scalar_t(scale);
    p.out = out.data_ptr<scalar_t>();
    set_strides(p.out_stride, out);
    p.lse = lse.data_ptr<scalar_t>();
    parallel_tasks<scalar_t>(cpu::forward_num_tasks(s), cpu::forward_workspace_elems(s),
                             [&](int64_t b, int64_t e, scalar_t* ws) { cpu::forward<scalar_t>(p, b, e, ws); });
  });
  return {out.to(q.scalar_type()), lse};
}

// The fused backward on bf16 dot products (cpu::backward_fused_bf16): q, k, v, grad_out read in place, k packed in
// key pairs, the gradients written in bf16 (q, k, v's in (B, N, H, D) memory, as the fp32 path), the bias gradient
// in fp32 and returned in the bias' dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_bf16_cpu(
    const BlockSparseShape& s, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& row_count,
    const at::Tensor& row_index, const at::Tensor& col_count, const at::Tensor& col_index,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& bias, double scale, bool want_bias, std::array<bool, 4> output_mask) {
  const auto qb = unit_last_stride(q), kb = even_rows(k), vb = even_rows(v), gob = unit_last_stride(grad_out);
  const auto ob = unit_last_stride(out);
  const auto mask_add = additive_key_mask(key_padding_mask, at::kFloat);
  const auto bias_t = bias.has_value() ? bias->to(at::kFloat).transpose(2, 3).contiguous() : at::Tensor();
  const auto lse_f = lse.to(at::kFloat).contiguous();
  const auto rc = row_count.contiguous(), ri = row_index.contiguous();
  const auto cc = col_count.contiguous(), ci = col_index.contiguous();
  auto delta = at::empty({s.batch, s.heads, s.seq_q}, q.options().dtype(at::kFloat));
  rowsum_product<at::BFloat16, float>(gob, ob, delta);  // delta, in fp32
  const auto k_pairs = key_pairs(s, kb, mask_add);
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  auto heads_inner = [&](const at::Tensor& like) {
    return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, contiguous).permute({0, 2, 1, 3});
  };
  auto gq = heads_inner(q), gk = heads_inner(k), gv = heads_inner(v);
  auto gb = want_bias ? at::zeros(bias->sizes(), bias_t.options()) : at::Tensor();
  BlockSparseCpuBackwardBf16 p;
  p.s = s;
  p.q = bf16_bits(qb);
  p.k = bf16_bits(kb);
  p.v = bf16_bits(vb);
  p.grad_out = bf16_bits(gob);
  set_strides(p.q_stride, qb);
  set_strides(p.k_stride, kb);
  set_strides(p.v_stride, vb);
  set_strides(p.grad_out_stride, gob);
  p.k_pairs = reinterpret_cast<const uint32_t*>(k_pairs.data_ptr<int32_t>());
  p.lse = lse_f.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.bias_t = bias_t.defined() ? bias_t.data_ptr<float>() : nullptr;
  p.mask_add = mask_add.defined() ? mask_add.data_ptr<float>() : nullptr;
  p.row_count = rc.data_ptr<int32_t>();
  p.row_index = ri.data_ptr<int32_t>();
  p.col_count = cc.data_ptr<int32_t>();
  p.col_index = ci.data_ptr<int32_t>();
  p.scale = float(scale);
  p.grad_q = bf16_bits_mut(gq);
  p.grad_k = bf16_bits_mut(gk);
  p.grad_v = bf16_bits_mut(gv);
  set_strides(p.grad_q_stride, gq);
  set_strides(p.grad_k_stride, gk);
  set_strides(p.grad_v_stride, gv);
  p.grad_bias = gb.defined() ? gb.data_ptr<float>() : nullptr;
  const int64_t splits = cpu::backward_fused_bias_splits(s, want_bias);
  at::Tensor partials;
  if (splits > 0) {
    partials = at::zeros({splits * s.bias_batch * s.bias_heads * s.seq_k * s.seq_q}, bias_t.options());
    p.bias_partials = partials.data_ptr<float>();
    p.bias_splits = splits;
  }
  parallel_tasks<float>(cpu::backward_fused_num_tasks(s, want_bias), cpu::backward_bf16_workspace_floats(s),
                        [&](int64_t b, int64_t e, float* w) { cpu::backward_fused_bf16(p, b, e, w); });
  if (splits > 0) {
    BlockSparseCpuBackward<float> reduce;
    reduce.s = s;
    reduce.grad_bias = p.grad_bias;
    reduce.bias_partials = p.bias_partials;
    reduce.bias_splits = splits;
    at::parallel_for(0, cpu::backward_fused_reduce_num_tasks(s), 16,
                     [&](int64_t b, int64_t e) { cpu::backward_fused_reduce_bias<float>(reduce, b, e); });
  }
  const auto empty = at::empty({0}, q.options());
  return {output_mask[0] ? gq : empty, output_mask[1] ? gk : empty, output_mask[2] ? gv : empty,
          want_bias ? gb.to(bias->scalar_type()) : empty};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& row_count, const at::Tensor& row_index,
    const at::Tensor& col_count, const at::Tensor& col_index, int64_t block_size,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& bias, double scale,
    std::array<bool, 4> output_mask) {
  const BlockSparseShape s = check_block_sparse_inputs(q, k, v, row_count, row_index, col_count, col_index,
                                                       block_size, key_padding_mask, bias);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out and out must have q's shape ",
              q.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.batch && lse.size(1) == s.heads && lse.size(2) == s.seq_q,
              "lse must be (B, H, Nq) = (", s.batch, ", ", s.heads, ", ", s.seq_q, "), got ", lse.sizes());
  check_index_values(row_count, row_index, "row_index", s.num_k_blocks);
  check_index_values(col_count, col_index, "col_index", s.num_q_blocks);
  const bool want_q = output_mask[0], want_kv = output_mask[1] || output_mask[2];
  const bool want_bias = output_mask[3] && bias.has_value();
  const BackwardPlan plan = backward_plan();
  const bool fused = plan != BackwardPlan::two_pass &&
                     cpu::backward_fused_applies(s, want_q, want_kv, want_bias,
                                                 plan == BackwardPlan::fused ? 1 : at::get_num_threads());
  if (fused && q.scalar_type() == at::kBFloat16 && cpu::bf16_kernels_available())
    return backward_bf16_cpu(s, grad_out, q, k, v, out, lse, row_count, row_index, col_count, col_index,
                             key_padding_mask, bias, scale, want_bias, output_mask);
  const auto acc = cpu_accumulate_type(q.scalar_type());
  const auto qa = staged(q, acc), ka = staged(k, acc), va = staged(v, acc), go = staged(grad_out, acc);
  const auto oa = staged(out, acc);
  const auto lse_a = lse.to(acc).contiguous();
  auto delta = at::empty({s.batch, s.heads, s.seq_q}, qa.options());
  const auto mask_add = additive_key_mask(key_padding_mask, acc);
  const auto bias_t = bias.has_value() ? bias->to(acc).transpose(2, 3).contiguous() : at::Tensor();
  const auto rc = row_count.contiguous(), ri = row_index.contiguous();
  const auto cc = col_count.contiguous(), ci = col_index.contiguous();
  const auto contiguous = qa.options().memory_format(at::MemoryFormat::Contiguous);
  // Gradients in (B, N, H, D) memory, as the output: the input projections' backward reads them as (B * N, H * D)
  // without a copy.
  auto heads_inner = [&](const at::Tensor& like) {
    return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, contiguous).permute({0, 2, 1, 3});
  };
  auto gq = want_q ? heads_inner(q) : at::Tensor();
  auto gk = want_kv ? heads_inner(k) : at::Tensor();
  auto gv = want_kv ? heads_inner(v) : at::Tensor();
  auto gb = want_bias ? at::zeros(bias->sizes(), bias_t.options()) : at::Tensor();
  const bool prepare = !(fused && cpu::backward_fused_stages_queries(s));
  auto q_t_blocks = prepare ? at::empty({s.batch, s.heads, s.num_q_blocks, s.head_dim, block_size}, qa.options())
                            : at::Tensor();
  auto go_t_blocks = prepare ? at::empty_like(q_t_blocks) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "block_sparse_attention_backward_cpu", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    rowsum_product<scalar_t, scalar_t>(go, oa, delta);
    BlockSparseCpuBackward<scalar_t> p;
    p.s = s;
    p.q = ptr(qa);
    p.k = ptr(ka);
    p.v = ptr(va);
    p.grad_out = ptr(go);
    set_strides(p.q_stride, qa);
    set_strides(p.k_stride, ka);
    set_strides(p.v_stride, va);
    set_strides(p.grad_out_stride, go);
    p.lse = ptr(lse_a);
    p.delta = ptr(delta);
    p.bias_t = ptr(bias_t);
    p.mask_add = ptr(mask_add);
    const auto nonfinite = mask_add.defined() ? padded_nonfinite_blocks<scalar_t>(ka, va, mask_add, s) : at::Tensor();
    p.padded_nonfinite = nonfinite.defined() ? nonfinite.data_ptr<uint8_t>() : nullptr;
    p.row_count = rc.data_ptr<int32_t>();
    p.row_index = ri.data_ptr<int32_t>();
    p.col_count = cc.data_ptr<int32_t>();
    p.col_index = ci.data_ptr<int32_t>();
    p.scale = scalar_t(scale);
    p.grad_q = ptr(gq);
    p.grad_k = ptr(gk);
    p.grad_v = ptr(gv);
    if (want_q) set_strides(p.grad_q_stride, gq);
    if (want_kv) {
      set_strides(p.grad_k_stride, gk);
      set_strides(p.grad_v_stride, gv);
    }
    p.grad_bias = ptr(gb);
    p.q_t_blocks = ptr(q_t_blocks);
    p.grad_out_t_blocks = ptr(go_t_blocks);
    if (prepare)
      at::parallel_for(0, cpu::backward_prepare_num_tasks(s), 1,
                       [&](int64_t b, int64_t e) { cpu::backward_prepare<scalar_t>(p, b, e); });
    const int64_t ws = cpu::backward_workspace_elems(s);
    if (fused) {
      const int64_t splits = cpu::backward_fused_bias_splits(s, want_bias);
      at::Tensor partials;
      if (splits > 0) {
        partials = at::zeros({splits * s.bias_batch * s.bias_heads * s.seq_k * s.seq_q}, qa.options());
        p.bias_partials = ptr(partials);
        p.bias_splits = splits;
      }
      parallel_tasks<scalar_t>(cpu::backward_fused_num_tasks(s, want_bias), ws,
                               [&](int64_t b, int64_t e, scalar_t* w) { cpu::backward_fused<scalar_t>(p, b, e, w); });
      if (splits > 0)
        at::parallel_for(0, cpu::backward_fused_reduce_num_tasks(s), 16,
                         [&](int64_t b, int64_t e) { cpu::backward_fused_reduce_bias<scalar_t>(p, b, e); });
      return;
    }
    if (want_q || want_bias)
      parallel_tasks<scalar_t>(cpu::backward_rows_num_tasks(s, want_bias), ws, [&](int64_t b, int64_t e, scalar_t* w) {
        cpu::backward_rows<scalar_t>(p, b, e, w);
      });
    if (want_kv)
      parallel_tasks<scalar_t>(cpu::backward_cols_num_tasks(s), ws, [&](int64_t b, int64_t e, scalar_t* w) {
        cpu::backward_cols<scalar_t>(p, b, e, w);
      });
  });
  const auto empty = at::empty({0}, q.options());
  return {want_q ? gq.to(q.scalar_type()) : empty, want_kv && output_mask[1] ? gk.to(q.scalar_type()) : empty,
          want_kv && output_mask[2] ? gv.to(q.scalar_type()) : empty,
          want_bias ? gb.to(bias->scalar_type()) : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(af2_ext, CPU, m) {
  m.impl("block_sparse_attention_forward", &forward_cpu);
  m.impl("block_sparse_attention_backward", &backward_cpu);
}

}  // namespace af2_ext
