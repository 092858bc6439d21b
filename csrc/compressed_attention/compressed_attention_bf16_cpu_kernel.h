// Key/value compression forward in bf16 on the CPU's bf16 dot products (AVX512-BF16). Compiled by
// compressed_attention_bf16_cpu_kernel.cpp through common/cpu_bf16_region.h (after common/cpu_bf16_dot.h's
// dot_gemm); no include guard, includes nothing itself.

// One task per (k or v, batch, head), as kv_compress_forward_impl: out (Nc x D, fp32 in the workspace) = bias +
// sum over taps t of K_t W_t, K_t the input rows j * ratio + t read as D-pairs in place; rounded to bf16 once.
static void kv_compress_forward_bf16_impl(const KvCompressBf16Params& p, int64_t begin, int64_t end, float* out) {
  const KvCompressShape& s = p.s;
  const int64_t BH = s.batch * s.heads, D = s.head_dim, r = s.ratio, Nc = s.seq_c;
  for (int64_t task = begin; task < end; ++task) {
    const int which = int(task / BH);
    const int64_t bh = task % BH, b = bh / s.heads, h = bh % s.heads;
    const int64_t* st = which == 0 ? p.k_stride : p.v_stride;
    const uint16_t* x = (which == 0 ? p.k : p.v) + b * st[0] + h * st[1];
    const int64_t row = st[2];
    for (int64_t j = 0; j < Nc; ++j)
      for (int64_t e = 0; e < D; ++e) out[j * D + e] = p.bias != nullptr ? p.bias[h * D + e] : 0.0f;
    for (int64_t t = 0; t < r; ++t) {
      const int64_t rows = t < s.seq_k ? (s.seq_k - t + r - 1) / r : 0;  // input rows tap t reads
      dot_gemm(int(rows), int(D), int(D / 2), reinterpret_cast<const uint32_t*>(x + t * row), r * row / 2, 1,
               p.weight_pairs + (h * r + t) * (D / 2) * D, D, out, D, /*accumulate=*/true);
      if (rows < Nc) add_padding_products(out, p.weight_in_out + (h * r + t) * D * D, rows, Nc, D);
    }
    uint16_t* dst = (which == 0 ? p.kc : p.vc) + bh * Nc * D;
    for (int64_t i = 0; i < Nc * D; i += 16)
      _mm256_storeu_si256((__m256i*)(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(out + i)));
  }
}
