// Block-sparse flash attention in bf16 on the CPU's bf16 dot products (AVX512-BF16). Compiled by
// block_sparse_attention_bf16_cpu_kernel.cpp through common/cpu_bf16_region.h (after common/cpu_simd.h and
// common/cpu_bf16_dot.h's dot_gemm); it includes the fp32 kernel header, whose logit finishing and task mapping it
// shares. No include guard.
#include "block_sparse_attention/block_sparse_attention_cpu_kernel.h"
//
// vdpbf16ps multiplies pairs: lane n of the result accumulates a.lo * b.lo + a.hi * b.hi in fp32, where a and b
// hold two bf16 per 32-bit lane. Each product below has its reduction dimension in pairs:
//   St (keys x queries) = K Qᵀ over the head dim: K read in place (two bf16 of a row are one 32-bit broadcast),
//     the query block transposed into (D / 2) x bs pairs in the workspace;
//   acc (queries x D) += P V over the keys: P (fp32, St's probabilities) rounded to bf16 into (keys / 2) x bs
//     pairs, V packed once per call into (keys / 2) x D pairs (pack_v_pairs_bf16).

void pack_v_pairs_bf16_impl(const PackVPairsBf16& p, int64_t begin, int64_t end) {
  const BlockSparseShape& s = p.s;
  const int D = int(s.head_dim);
  const int64_t pairs = (s.seq_k + 1) / 2;
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / s.heads, h = bh % s.heads;
    const uint16_t* V = p.v + b * p.v_stride[0] + h * p.v_stride[1];
    const int64_t ldv = p.v_stride[2];
    const float* mask = p.mask_add ? p.mask_add + b * s.seq_k : nullptr;
    uint32_t* out = p.v_pairs + bh * pairs * D;
    for (int64_t u = 0; u < pairs; ++u) {
      const int64_t j0 = 2 * u, j1 = 2 * u + 1;
      // A padded key's row (and the missing key past an odd end) is zero: its probability is 0, and 0 * a NaN
      // or inf in its v would not be.
      const bool keep0 = mask == nullptr || mask[j0] == 0.0f;
      const bool keep1 = j1 < s.seq_k && (mask == nullptr || mask[j1] == 0.0f);
      for (int d = 0; d < D; d += 16) {
        const __m512i lo = keep0 ? widen_u16(_mm256_loadu_si256((const __m256i*)(V + j0 * ldv + d)))
                                 : _mm512_setzero_si512();
        const __m512i hi = keep1 ? widen_u16(_mm256_loadu_si256((const __m256i*)(V + j1 * ldv + d)))
                                 : _mm512_setzero_si512();
        _mm512_storeu_si512(out + u * D + d, pair_halves(lo, hi));
      }
    }
  }
}

// Lanes (lo[i], hi[i]) of two vectors of 16 floats, rounded to bf16 (nearest even; NaN stays NaN), as 16 pairs.
static inline __m512i pair_bf16(__m512 lo, __m512 hi) {
  // cvtne2ps gives lo's 16 values in elements 0-15 and hi's in 16-31; the permutation interleaves them.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                              6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// 2^y lane-wise for y <= 0, -inf or NaN (the softmax's exponents): y = n + f with n an integer and |f| <= 1/2,
// 2^f by a degree-3 polynomial fitted for relative error (1.1e-4, 35x below bf16's rounding of P; 2^0 exactly 1,
// so a row whose max does not move is not rescaled), scaled by 2^n. 2^-inf = 0 and NaN stays NaN. Eight
// instructions where cpu_simd.h's vexp (fp32-accurate) takes about seventeen.
static inline __m512 exp2_lanes(__m512 y) {
  // -inf becomes -160 (2^-160 is 0 in fp32); a NaN y is kept: vmaxps returns its second operand when either is NaN.
  // (The zero-masked forms, all lanes: GCC 12's unmasked ones start from an undefined vector -Wall flags.)
  const __mmask16 all = 0xFFFF;
  y = _mm512_maskz_max_ps(all, _mm512_set1_ps(-160.0f), y);
  const __m512 n = _mm512_maskz_roundscale_ps(all, y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(0.05459282547235489f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24221789836883545f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6933686137199402f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(all, p, n);
}

// The fp32 kernel's finish_logits and online_softmax_step on a chunk of raw scores St (cols x bs, keys x
// queries), fused into two passes per 16 queries, with the probabilities written as bf16 key pairs for P V:
//   1. logits in base 2, St * (scale * log2 e) (+ bias * log2 e; -inf for a padded key, by a select), stored
//      back, and their max;
//   2. P = 2^(logits - m_new), summed in fp32 into l, and written to Pp[u * bs + i] = (P[i, 2u], P[i, 2u + 1]),
//      the missing key of an odd tail 0.
// m holds the running max in base 2 (lse = m ln 2 + ln l). The non-finite semantics of the fp32 path: a NaN logit
// poisons its row, a query with no visible key keeps probabilities 0. acc (rows x D) is rescaled by
// 2^(m_old - m_new).
static inline void softmax_step_pairs(float* St, int cols, int rows, int bs, int D, float scale, const float* bias_t,
                                      int64_t ld_bias_t, const float* mask_add, float* m, float* l, float* alpha,
                                      float* acc, uint32_t* Pp) {
  typedef Vec<float, 16> V;
  typedef V::type vec;
  constexpr float kLog2e = 1.44269504088896341f;
  const vec ninf = V::broadcast(neg_inf<float>()), zero = V::broadcast(0.0f), mul = V::broadcast(scale * kLog2e);
  const vec log2e = V::broadcast(kLog2e);
  const __mmask16 all = 0xFFFF;
  for (int i = 0; i < bs; i += 16) {
    const int bias_lanes = bias_t == nullptr ? 0 : std::max(0, std::min(16, rows - i));  // none past the rows
    // The max in two chains; vmaxps drops a NaN that meets a later number, so NaN lanes are tracked in a mask.
    __m512 mx0 = (__m512)ninf, mx1 = (__m512)ninf;
    __mmask16 nan = 0;
    for (int j = 0; j < cols; ++j) {
      vec x = V::load(St + j * bs + i) * mul;
      if (bias_lanes == 16) {
        x += V::load(bias_t + j * ld_bias_t + i) * log2e;
      } else {
        for (int r = 0; r < bias_lanes; ++r) x[r] += bias_t[j * ld_bias_t + i + r] * kLog2e;
      }
      if (mask_add != nullptr && mask_add[j] != 0.0f) x = ninf;
      if (bias_t != nullptr) V::store(St + j * bs + i, x);  // without a bias pass 2 recomputes it in one fmsub
      nan |= _mm512_cmp_ps_mask((__m512)x, (__m512)x, _CMP_UNORD_Q);
      if (j & 1)
        mx1 = _mm512_maskz_max_ps(all, mx1, (__m512)x);
      else
        mx0 = _mm512_maskz_max_ps(all, mx0, (__m512)x);
    }
    const __m512 mx = _mm512_mask_mov_ps(_mm512_maskz_max_ps(all, mx0, mx1), nan, _mm512_set1_ps(NAN));
    const vec m_old = V::load(m + i);
    vec m_new = max_nan<float, 16>(m_old, (vec)mx);
    V::store(m + i, m_new);
    m_new = V::select(m_new == ninf, zero, m_new);
    const vec a = (vec)exp2_lanes((__m512)(m_old - m_new));
    // P of key j: 2^(logit - m_new), 0 for a padded key (whatever its score).
    auto prob = [&](int j) -> __m512 {
      if (mask_add != nullptr && mask_add[j] != 0.0f) return _mm512_setzero_ps();
      const __m512 x = _mm512_loadu_ps(St + j * bs + i);
      return exp2_lanes(bias_t != nullptr ? _mm512_sub_ps(x, (__m512)m_new)
                                          : _mm512_fmsub_ps(x, (__m512)mul, (__m512)m_new));
    };
    vec sum0 = zero, sum1 = zero;
    int j = 0;
    for (; j + 2 <= cols; j += 2) {
      const __m512 e0 = prob(j), e1 = prob(j + 1);
      sum0 += (vec)e0;
      sum1 += (vec)e1;
      _mm512_storeu_si512(Pp + (j / 2) * bs + i, pair_bf16(e0, e1));
    }
    if (j < cols) {
      const __m512 e0 = prob(j);
      sum0 += (vec)e0;
      _mm512_storeu_si512(Pp + (j / 2) * bs + i, pair_bf16(e0, _mm512_setzero_ps()));
    }
    V::store(alpha + i, a);
    V::store(l + i, V::load(l + i) * a + (sum0 + sum1));
  }
  for (int i = 0; i < rows; ++i)
    if (alpha[i] != 1.0f) scale_row<float, 16>(acc + i * D, D, alpha[i]);
}

void forward_bf16_impl(const BlockSparseCpuForwardBf16& p, int64_t begin, int64_t end, float* ws) {
  constexpr int VL = 16;
  const BlockSparseShape& s = p.s;
  const int bs = s.block_size;
  const int D = int(s.head_dim), DP = D / 2;
  const int64_t nqb = s.num_q_blocks, nkb = s.num_k_blocks, pairs_k = (s.seq_k + 1) / 2;
  float* St = ws;                                        // kKeyChunk x bs scores, then probabilities
  float* acc = St + kKeyChunk * bs;                      // bs x D: the unnormalised output block
  uint32_t* Qp = reinterpret_cast<uint32_t*>(acc + bs * D);  // DP x bs: the query block, transposed in pairs
  uint32_t* Pp = Qp + DP * bs;                           // (kKeyChunk / 2) x bs: P in bf16 pairs
  float* m = reinterpret_cast<float*>(Pp + (kKeyChunk / 2) * bs);  // running max per query
  float* l = m + bs;                                     // running sum per query
  float* alpha = l + bs;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t qb = t % nqb, bh = t / nqb, b = bh / s.heads, h = bh % s.heads;
    const int64_t hl = s.layout_heads == 1 ? 0 : h;
    const int64_t r0 = qb * bs;
    const int rows = int(std::min<int64_t>(bs, s.seq_q - r0));
    const uint16_t* Kn = p.k + b * p.k_stride[0] + h * p.k_stride[1];
    const int64_t ldk = p.k_stride[2];
    const uint32_t* Vp = p.v_pairs + bh * pairs_k * D;
    const float* mask = p.mask_add ? p.mask_add + b * s.seq_k : nullptr;
    const float* bias = bias_block(s, p.bias_t, b, h);
    if (bias != nullptr) bias += r0;
    stage_d_pairs(p.q + b * p.q_stride[0] + h * p.q_stride[1] + r0 * p.q_stride[2], p.q_stride[2], rows, DP, bs, Qp);
    std::fill(m, m + bs, neg_inf<float>());
    std::fill(l, l + bs, 0.0f);
    std::fill(acc, acc + bs * D, 0.0f);
    const int32_t count = p.row_count[hl * nqb + qb];
    const int32_t* idx = p.row_index + (hl * nqb + qb) * nkb;
    for (int32_t e = 0; e < count; ++e) {
      const int64_t block_start = int64_t(idx[e]) * bs;
      const int block_cols = int(std::min<int64_t>(bs, s.seq_k - block_start));
      for (int chunk = 0; chunk < block_cols; chunk += kKeyChunk) {
        const int64_t c0 = block_start + chunk;  // even: block sizes are even
        const int cols = std::min(kKeyChunk, block_cols - chunk);
        dot_gemm(cols, bs, DP, reinterpret_cast<const uint32_t*>(Kn + c0 * ldk), ldk / 2, 1, Qp, bs, St, bs, false);
        softmax_step_pairs(St, cols, rows, bs, D, p.scale, bias ? bias + c0 * s.seq_q : nullptr, s.seq_q,
                           mask ? mask + c0 : nullptr, m, l, alpha, acc, Pp);
        const int cp = (cols + 1) / 2;
        // acc (rows x D) += P (rows x cols) V (cols x D), in key pairs.
        dot_gemm(rows, D, cp, Pp, 1, bs, Vp + (c0 / 2) * D, D, acc, D, true);
      }
    }
    const int64_t ldo = p.out_stride[2];
    uint16_t* O = p.out + b * p.out_stride[0] + h * p.out_stride[1] + r0 * ldo;
    float* lse = p.lse + bh * s.seq_q + r0;
    for (int i = 0; i < rows; ++i) {
      if (m[i] != neg_inf<float>()) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[i]);
        for (int d = 0; d < D; d += VL)
          _mm256_storeu_si256((__m256i*)(O + i * ldo + d),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + i * D + d), inv)));
        lse[i] = m[i] * 0.693147180559945309f + std::log(l[i]);  // m in base 2
      } else {  // no visible key: zeros out, lse = +inf (every recomputed probability 0)
        std::fill(O + i * ldo, O + i * ldo + D, uint16_t(0));
        lse[i] = std::numeric_limits<float>::infinity();
      }
    }
  }
}

// ---- backward ----

// dst[t] = (src[2t], src[2t + 1]) in bf16 for t < n / 2: n floats (a multiple of 16) rounded to n / 2 query pairs.
static inline void bf16_row_pairs(const float* src, int n, uint32_t* dst) {
  int i = 0;
  for (; i + 32 <= n; i += 32)
    _mm512_storeu_si512(dst + i / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16),
                                                                  _mm512_loadu_ps(src + i)));
  if (i < n) _mm256_storeu_si256((__m256i*)(dst + i / 2), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
}

// dst[t * D + d] = (x[2t, d], x[2t + 1, d]) for t < bs / 2, a missing row (2t + 1 >= rows) zero: a row block in
// pairs of rows, for products that reduce over the rows.
static inline void stage_row_pairs(const uint16_t* x, int64_t ld, int rows, int D, int bs, uint32_t* dst) {
  for (int t = 0; t < bs / 2; ++t) {
    const int i0 = 2 * t, i1 = 2 * t + 1;
    for (int d = 0; d < D; d += 16) {
      const __m512i lo = i0 < rows ? widen_u16(_mm256_loadu_si256((const __m256i*)(x + i0 * ld + d)))
                                   : _mm512_setzero_si512();
      const __m512i hi = i1 < rows ? widen_u16(_mm256_loadu_si256((const __m256i*)(x + i1 * ld + d)))
                                   : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + t * D + d, pair_halves(lo, hi));
    }
  }
}

// rows of n floats, each scaled (a zero stays zero whatever the scale, as scaled_grad_row) and rounded to bf16.
static inline void store_bf16_row(const float* src, int D, float scale, uint16_t* dst) {
  const __m512 mul = _mm512_set1_ps(scale), zero = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 16) {
    const __m512 g = _mm512_loadu_ps(src + d);
    const __mmask16 nonzero = _mm512_cmp_ps_mask(g, zero, _CMP_NEQ_UQ);
    _mm256_storeu_si256((__m256i*)(dst + d),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mul_ps(nonzero, g, mul)));
  }
}

int64_t backward_bf16_workspace_elems_impl(const BlockSparseShape& s) {
  const int64_t bs = s.block_size, D = s.head_dim;
  // St, dSt, dQ, lse, delta, Qp, dOp (D/2 x bs pairs), Qq, dOq (bs/2 x D pairs), Pq, dSq (bs x bs/2), dSk (bs/2 x
  // bs), the fp32 dK, dV accumulators of every key and, keys outer, the dQ accumulator of every query.
  const int64_t all_q = s.seq_q >= s.seq_k ? 0 : s.seq_q * D;
  return 2 * bs * bs + bs * D + 2 * bs + 2 * (D / 2) * bs + 2 * (bs / 2) * D + 3 * bs * (bs / 2) + 2 * s.seq_k * D +
         all_q;
}

static void backward_bf16_member(const BlockSparseCpuBackwardBf16& p, int64_t b, int64_t h, float* ws,
                                 float* bias_sum_t) {
  constexpr int VL = 16;
  const BlockSparseShape& s = p.s;
  const int bs = s.block_size, hb = bs / 2;
  const int D = int(s.head_dim), DP = D / 2;
  const int64_t nqb = s.num_q_blocks, nkb = s.num_k_blocks, pairs_k = (s.seq_k + 1) / 2;
  float* St = ws;
  float* dSt = St + bs * bs;
  float* dQ = dSt + bs * bs;
  float* lse = dQ + bs * D;
  float* delta = lse + bs;
  uint32_t* Qp = reinterpret_cast<uint32_t*>(delta + bs);
  uint32_t* dOp = Qp + DP * bs;
  uint32_t* Qq = dOp + DP * bs;
  uint32_t* dOq = Qq + hb * D;
  uint32_t* Pq = dOq + hb * D;
  uint32_t* dSq = Pq + bs * hb;
  uint32_t* dSk = dSq + bs * hb;
  float* gk = reinterpret_cast<float*>(dSk + hb * bs);
  float* gv = gk + s.seq_k * D;
  float* gq_all = gv + s.seq_k * D;  // keys outer: dQ of every query
  const int64_t bh = b * s.heads + h;
  const int64_t hl = s.layout_heads == 1 ? 0 : h;
  const uint16_t* Kn = p.k + b * p.k_stride[0] + h * p.k_stride[1];
  const uint16_t* Vn = p.v + b * p.v_stride[0] + h * p.v_stride[1];
  const uint16_t* Qn = p.q + b * p.q_stride[0] + h * p.q_stride[1];
  const uint16_t* dOn = p.grad_out + b * p.grad_out_stride[0] + h * p.grad_out_stride[1];
  const int64_t ldk = p.k_stride[2], ldv = p.v_stride[2], ldq = p.q_stride[2], ldo = p.grad_out_stride[2];
  const uint32_t* Kk = p.k_pairs + bh * pairs_k * D;
  const float* mask = p.mask_add ? p.mask_add + b * s.seq_k : nullptr;
  const float* bias = bias_block(s, p.bias_t, b, h);
  float* grad_bias = p.grad_bias != nullptr && bias_sum_t == nullptr ? p.grad_bias + bh * s.seq_q * s.seq_k : nullptr;
  std::fill(gk, gk + s.seq_k * D, 0.0f);
  std::fill(gv, gv + s.seq_k * D, 0.0f);
  // The query block qb's operands: Q and grad_out in D-pairs (for Pᵀ, dPᵀ) and in row pairs (for dK, dV), lse, delta.
  auto stage_query_block = [&](int64_t qb, int rows) {
    const int64_t r0 = qb * bs;
    stage_d_pairs(Qn + r0 * ldq, ldq, rows, DP, bs, Qp);
    stage_d_pairs(dOn + r0 * ldo, ldo, rows, DP, bs, dOp);
    stage_row_pairs(Qn + r0 * ldq, ldq, rows, D, bs, Qq);
    stage_row_pairs(dOn + r0 * ldo, ldo, rows, D, bs, dOq);
    for (int i = 0; i < bs; ++i) {
      lse[i] = i < rows ? p.lse[bh * s.seq_q + r0 + i] : std::numeric_limits<float>::infinity();
      delta[i] = i < rows ? p.delta[bh * s.seq_q + r0 + i] : 0.0f;
    }
  };
  // One (query block, key block) pair of the layout with the query block staged: dK, dV into gk, gv, dQ into dq
  // (the block's rows, D apart).
  auto pair = [&](int64_t qb, int64_t c0, int rows, int cols, float* dq) {
    const int64_t r0 = qb * bs;
    const int rp = (rows + 1) / 2;
    const float* mask_c = mask ? mask + c0 : nullptr;
    // Pᵀ and dPᵀ = V dOᵀ recomputed (keys x queries), then dSᵀ = Pᵀ (dPᵀ - delta); a masked logit gets P = dS = 0
    // by a select, as in the fp32 kernel's recompute_block.
    dot_gemm(cols, bs, DP, reinterpret_cast<const uint32_t*>(Kn + c0 * ldk), ldk / 2, 1, Qp, bs, St, bs, false);
    if (fold_scale(p.scale))
      for (int j = 0; j < cols; ++j) scale_row<float, VL>(St + j * bs, bs, p.scale);
    finish_logits<float, VL>(St, cols, rows, bs, p.scale, bias ? bias + c0 * s.seq_q + r0 : nullptr, s.seq_q,
                             mask_c);
    dot_gemm(cols, bs, DP, reinterpret_cast<const uint32_t*>(Vn + c0 * ldv), ldv / 2, 1, dOp, bs, dSt, bs, false);
    probabilities_and_ds<float, VL>(St, dSt, cols, bs, lse, delta);
    if (grad_bias != nullptr)
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < cols; ++j) grad_bias[(r0 + i) * s.seq_k + c0 + j] = dSt[j * bs + i];
    if (bias_sum_t != nullptr)
      for (int j = 0; j < cols; ++j) {
        float* dst = bias_sum_t + (c0 + j) * s.seq_q + r0;
        const float* src = dSt + j * bs;
        for (int i = 0; i < rows; ++i) dst[i] += src[i];
      }
    // The three gradient products on bf16 pairs: P and dS by query pairs (rows of St, dSt) for dV and dK, dS by
    // key pairs for dQ.
    for (int j = 0; j < cols; ++j) {
      bf16_row_pairs(St + j * bs, bs, Pq + j * hb);
      bf16_row_pairs(dSt + j * bs, bs, dSq + j * hb);
    }
    const int cp = (cols + 1) / 2;
    for (int u = 0; u < cp; ++u)
      for (int i = 0; i < bs; i += VL)
        _mm512_storeu_si512(dSk + u * bs + i,
                            pair_bf16(_mm512_loadu_ps(dSt + 2 * u * bs + i),
                                      2 * u + 1 < cols ? _mm512_loadu_ps(dSt + (2 * u + 1) * bs + i)
                                                       : _mm512_setzero_ps()));
    dot_gemm(cols, D, rp, Pq, hb, 1, dOq, D, gv + c0 * D, D, true);   // dV += Pᵀ dO
    dot_gemm(cols, D, rp, dSq, hb, 1, Qq, D, gk + c0 * D, D, true);   // dK += dSᵀ Q
    dot_gemm(rows, D, cp, dSk, 1, bs, Kk + (c0 / 2) * D, D, dq, D, true);  // dQ += dS K
  };
  auto write_grad_q = [&](int64_t r0, int rows, const float* dq) {
    uint16_t* gq = p.grad_q + b * p.grad_q_stride[0] + h * p.grad_q_stride[1] + r0 * p.grad_q_stride[2];
    for (int i = 0; i < rows; ++i) store_bf16_row(dq + i * D, D, p.scale, gq + i * p.grad_q_stride[2]);
  };
  if (s.seq_q >= s.seq_k) {  // queries outer: each query block staged once, its dQ in the workspace
    for (int64_t qb = 0; qb < nqb; ++qb) {
      const int rows = int(std::min<int64_t>(bs, s.seq_q - qb * bs));
      std::fill(dQ, dQ + bs * D, 0.0f);
      stage_query_block(qb, rows);
      const int32_t count = p.row_count[hl * nqb + qb];
      const int32_t* idx = p.row_index + (hl * nqb + qb) * nkb;
      for (int32_t e = 0; e < count; ++e) {
        const int64_t c0 = int64_t(idx[e]) * bs;
        pair(qb, c0, rows, int(std::min<int64_t>(bs, s.seq_k - c0)), dQ);
      }
      write_grad_q(qb * bs, rows, dQ);
    }
  } else {  // keys outer: each key block once, the query blocks it meets staged again, dQ of every query kept
    std::fill(gq_all, gq_all + s.seq_q * D, 0.0f);
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t c0 = kb * bs;
      const int32_t count = p.col_count[hl * nkb + kb];
      const int32_t* idx = p.col_index + (hl * nkb + kb) * nqb;
      for (int32_t e = 0; e < count; ++e) {
        const int64_t qb = idx[e];
        const int rows = int(std::min<int64_t>(bs, s.seq_q - qb * bs));
        stage_query_block(qb, rows);
        pair(qb, c0, rows, int(std::min<int64_t>(bs, s.seq_k - c0)), gq_all + qb * bs * D);
      }
    }
    write_grad_q(0, int(s.seq_q), gq_all);
  }
  // A padded key's gradients are zero (its P and dS are, but 0 times a NaN q or grad_out row would not be).
  uint16_t* gk_out = p.grad_k + b * p.grad_k_stride[0] + h * p.grad_k_stride[1];
  uint16_t* gv_out = p.grad_v + b * p.grad_v_stride[0] + h * p.grad_v_stride[1];
  for (int64_t j = 0; j < s.seq_k; ++j) {
    const bool padded = mask != nullptr && mask[j] != 0.0f;
    uint16_t* dk = gk_out + j * p.grad_k_stride[2];
    uint16_t* dv = gv_out + j * p.grad_v_stride[2];
    if (padded) {
      std::fill(dk, dk + D, uint16_t(0));
      std::fill(dv, dv + D, uint16_t(0));
    } else {
      store_bf16_row(gk + j * D, D, p.scale, dk);
      store_bf16_row(gv + j * D, D, 1.0f, dv);
    }
  }
}

// The tasks of backward_fused_impl (fused_tasks): (batch, head), or (bias block, range of its members) with
// partial sums.
void backward_fused_bf16_impl(const BlockSparseCpuBackwardBf16& p, int64_t begin, int64_t end, float* ws) {
  fused_tasks(p.s, p.bias_partials, p.bias_splits, begin, end,
              [&](int64_t b, int64_t h, float* partial) { backward_bf16_member(p, b, h, ws, partial); });
}
