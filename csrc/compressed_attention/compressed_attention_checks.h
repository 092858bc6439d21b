#pragma once
// Argument checks shared by the CPU and CUDA bindings of the key/value compression. Every message names the
// argument and the shape it expected; af2_ext/ops.py mirrors them for the fake (meta) kernels.
#include <torch/types.h>

#include "block_sparse_attention/block_sparse_attention_checks.h"
#include "compressed_attention/compressed_attention.h"

namespace af2_ext {

inline KvCompressShape check_kv_compress_inputs(const at::Tensor& k, const at::Tensor& v, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, int64_t ratio) {
  TORCH_CHECK(k.dim() == 4, "k must be (B, H, Nk, D), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  const auto dtype = k.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "k must be float32, float16 or bfloat16 (float64 on CPU), got ", dtype);
  TORCH_CHECK(v.scalar_type() == dtype, "v must have k's dtype ", dtype, ", got ", v.scalar_type());
  const int64_t B = k.size(0), H = k.size(1), Nk = k.size(2), D = k.size(3);
  TORCH_CHECK(B > 0 && H > 0 && Nk > 0, "k must be non-empty, got ", k.sizes());
  TORCH_CHECK(bsa_supported_head_dim(D), "head dim D (k.size(-1)) must be 16, 32, 64 or 128, got ", D);
  TORCH_CHECK(ratio >= 1, "ratio must be >= 1, got ", ratio);
  TORCH_CHECK(v.device() == k.device(), "v must be on k's device ", k.device(), ", got ", v.device());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "weight must be a floating tensor, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == H * D && weight.size(1) == D && weight.size(2) == ratio,
              "weight must be (H*D=", H * D, ", D=", D, ", ratio=", ratio, "), got ", weight.sizes());
  TORCH_CHECK(weight.device() == k.device(), "weight must be on k's device ", k.device(), ", got ",
              weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "bias must be a floating tensor, got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == H * D, "bias must be (H*D=", H * D, ",), got ",
                bias->sizes());
    TORCH_CHECK(bias->device() == k.device(), "bias must be on k's device ", k.device(), ", got ", bias->device());
  }
  KvCompressShape s;
  s.batch = B;
  s.heads = H;
  s.seq_k = Nk;
  s.head_dim = D;
  s.ratio = ratio;
  s.seq_c = (Nk + ratio - 1) / ratio;
  return s;
}

// grad_kc and grad_vc: (B, H, Nc, D) in k's dtype.
inline void check_kv_compress_grads(const at::Tensor& grad_kc, const at::Tensor& grad_vc, const at::Tensor& k,
                                    const KvCompressShape& s) {
  const std::vector<int64_t> want = {s.batch, s.heads, s.seq_c, s.head_dim};
  TORCH_CHECK(grad_kc.sizes() == at::IntArrayRef(want) && grad_vc.sizes() == at::IntArrayRef(want),
              "grad_kc and grad_vc must be (B, H, Nc, D) = ", at::IntArrayRef(want), ", got ", grad_kc.sizes(),
              " and ", grad_vc.sizes());
  TORCH_CHECK(grad_kc.scalar_type() == k.scalar_type() && grad_vc.scalar_type() == k.scalar_type(),
              "grad_kc and grad_vc must have k's dtype ", k.scalar_type(), ", got ", grad_kc.scalar_type(), " and ",
              grad_vc.scalar_type());
  TORCH_CHECK(grad_kc.device() == k.device() && grad_vc.device() == k.device(),
              "grad_kc and grad_vc must be on k's device ", k.device());
}

}  // namespace af2_ext
