#pragma once
// Argument checks shared by the CPU and CUDA bindings of block-sparse attention. Every message names the
// argument and the shape it expected; python/af2_ext/ops.py mirrors them for the fake (meta) kernels.
#include <torch/types.h>

#include "block_sparse_attention/block_sparse_attention.h"

namespace af2_ext {

inline bool bsa_supported_block_size(int64_t bs) { return bs == 16 || bs == 32 || bs == 64 || bs == 128; }
inline bool bsa_supported_head_dim(int64_t d) { return d == 16 || d == 32 || d == 64 || d == 128; }

inline void check_layout_index(const at::Tensor& count, const at::Tensor& index, const char* count_name,
                               const char* index_name, int64_t heads, int64_t outer, int64_t inner) {
  TORCH_CHECK(count.scalar_type() == at::kInt && index.scalar_type() == at::kInt, count_name, " and ",
              index_name, " must be int32, got ", count.scalar_type(), " and ", index.scalar_type());
  TORCH_CHECK(count.dim() == 2 && (count.size(0) == 1 || count.size(0) == heads) && count.size(1) == outer,
              count_name, " must be (1 or H=", heads, ", ", outer, "), got ", count.sizes());
  TORCH_CHECK(index.dim() == 3 && index.size(0) == count.size(0) && index.size(1) == outer &&
                  index.size(2) == inner,
              index_name, " must be (", count.size(0), ", ", outer, ", ", inner, "), got ", index.sizes());
}

// Validates the inputs and returns the shape record the kernels use.
inline BlockSparseShape check_block_sparse_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& row_count, const at::Tensor& row_index,
                                                  const at::Tensor& col_count, const at::Tensor& col_index,
                                                  int64_t block_size,
                                                  const std::optional<at::Tensor>& key_padding_mask,
                                                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 4, "q must be (B, H, Nq, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k must be (B, H, Nk, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "v must be (B, H, Nk, D), got ", v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "q must be float32, float16 or bfloat16 (float64 on CPU), got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "k and v must have q's dtype ", dtype,
              ", got ", k.scalar_type(), " and ", v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, "k must be (B=", B, ", H=", H, ", Nk, D=", D,
              "), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(bsa_supported_head_dim(D), "head dim D (q.size(-1)) must be 16, 32, 64 or 128, got ", D);
  TORCH_CHECK(bsa_supported_block_size(block_size), "block_size must be 16, 32, 64 or 128, got ", block_size);
  TORCH_CHECK(B > 0 && H > 0 && Nq > 0 && Nk > 0, "q and k must be non-empty, got q ", q.sizes(), " and k ",
              k.sizes());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "k and v must be on q's device ",
              q.device(), ", got ", k.device(), " and ", v.device());
  BlockSparseShape s;
  s.batch = B;
  s.heads = H;
  s.seq_q = Nq;
  s.seq_k = Nk;
  s.head_dim = D;
  s.block_size = int(block_size);
  s.num_q_blocks = (Nq + block_size - 1) / block_size;
  s.num_k_blocks = (Nk + block_size - 1) / block_size;
  for (const at::Tensor* t : {&row_count, &row_index, &col_count, &col_index})
    TORCH_CHECK(t->device() == q.device(), "the layout index must be on q's device ", q.device(), ", got ",
                t->device());
  check_layout_index(row_count, row_index, "row_count", "row_index", H, s.num_q_blocks, s.num_k_blocks);
  check_layout_index(col_count, col_index, "col_count", "col_index", H, s.num_k_blocks, s.num_q_blocks);
  TORCH_CHECK(col_count.size(0) == row_count.size(0), "col_count must have row_count's layout heads ",
              row_count.size(0), ", got ", col_count.size(0));
  s.layout_heads = row_count.size(0);
  if (key_padding_mask.has_value()) {
    const auto& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "key_padding_mask must be bool (True = keep), got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == Nk, "key_padding_mask must be (B=", B, ", Nk=", Nk,
                "), got ", m.sizes());
    TORCH_CHECK(m.device() == q.device(), "key_padding_mask must be on q's device ", q.device(), ", got ",
                m.device());
  }
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(at::isFloatingType(b.scalar_type()), "bias must be a floating tensor, got ", b.scalar_type());
    TORCH_CHECK(b.dim() == 4 && b.size(0) > 0 && B % b.size(0) == 0 && (b.size(1) == 1 || b.size(1) == H) &&
                    b.size(2) == Nq && b.size(3) == Nk,
                "bias must be (Bb, 1 or H=", H, ", Nq=", Nq, ", Nk=", Nk, ") with B=", B,
                " divisible by Bb, got ", b.sizes());
    TORCH_CHECK(b.device() == q.device(), "bias must be on q's device ", q.device(), ", got ", b.device());
    s.bias_batch = b.size(0);
    s.bias_heads = b.size(1);
  }
  return s;
}

}  // namespace af2_ext
