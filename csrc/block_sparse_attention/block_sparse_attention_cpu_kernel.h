// Block-sparse flash attention on the CPU: the ISA-generic kernel bodies. Included once per instruction set
// by block_sparse_attention_cpu_kernel.cpp, inside a namespace that defines kFloatLanes and after
// common/cpu_simd.h; it has no include guard and includes nothing itself.
//
// Scores are kept transposed, St = K_blk * Q_blkᵀ (keys x queries), so that the softmax over keys is a
// lane-wise reduction down the rows of St, vectorised across queries. The only transposes are of the query
// block (and grad_out block), into the thread's workspace; every product is the `gemm` of cpu_simd.h, whose
// broadcast operand may be read transposed for free.
//
// Non-finite values (the contract of block_sparse_attention_ref): a masked pair (layout, key padding, past the
// sequence ends) is absent. Padded keys get the logit -inf by a select (an added -inf would keep a NaN), and where a
// block holds one, the products that would multiply its k or v rows by a zero probability read a copy with those
// rows zeroed; their own gradients are written as zero. A NaN logit poisons its row: the running max propagates
// NaN, exp keeps it, and a row counts as empty only when its max is still -inf (never from `sum > 0`).

template <typename T>
struct Lanes {
  static constexpr int value = kFloatLanes * 4 / int(sizeof(T));
};

template <typename T>
static inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Row 0 of (batch b, head h) of a tensor read at {batch, head, row} strides.
template <typename T>
static inline const T* head_rows(const T* base, const int64_t (&stride)[3], int64_t b, int64_t h) {
  return base + b * stride[0] + h * stride[1];
}

// Row 0 of (batch b, head h) of a gradient written at {batch, head, row} strides.
template <typename T>
static inline T* grad_rows(T* base, const int64_t (&stride)[3], int64_t b, int64_t h) {
  return base + b * stride[0] + h * stride[1];
}

template <typename T>
static inline const T* bias_block(const BlockSparseShape& s, const T* bias, int64_t b, int64_t h) {
  if (bias == nullptr) return nullptr;
  int64_t bb = b / (s.batch / s.bias_batch);
  int64_t hb = s.bias_heads == 1 ? 0 : h;
  return bias + (bb * s.bias_heads + hb) * s.seq_q * s.seq_k;
}

// dst[d * bs + i] = src[i * ld + d] * mul for i < n, zero for n <= i < bs: an (n x D) block as (D x bs).
template <typename T>
static inline void transpose_block(const T* __restrict src, int64_t ld, int n, int D, T mul, T* __restrict dst,
                                   int bs) {
  for (int d = 0; d < D; ++d)  // this order: strided reads, contiguous writes (measured 1.4x the other)
    for (int i = 0; i < n; ++i) dst[d * bs + i] = src[i * ld + d] * mul;
  if (n < bs)
    for (int d = 0; d < D; ++d) std::fill(dst + d * bs + n, dst + (d + 1) * bs, T(0));
}

// Lane-wise max that propagates a NaN from either operand (V::max returns b when a is NaN): a NaN logit must
// poison its row's softmax, not vanish from the running max.
template <typename T, int VL>
static inline typename Vec<T, VL>::type max_nan(typename Vec<T, VL>::type a, typename Vec<T, VL>::type b) {
  return Vec<T, VL>::select((a > b) | (a != a), a, b);
}

// exp lane-wise; exp(-inf) = 0, exp(NaN) = NaN.
template <typename T, int VL>
static inline typename Vec<T, VL>::type exp_lanes(typename Vec<T, VL>::type x) {
  if constexpr (sizeof(T) == 4) {
    return vexp<VL>(x);
  } else {
    for (int l = 0; l < VL; ++l) x[l] = std::exp(x[l]);
    return x;
  }
}

// dst[0:D] = src[0:D] * scale, the gradient of a scaled product, lane-wise (D is a multiple of the lanes; dst may
// be src). A zero stays zero whatever the scale: an infinite scale must not turn the zero gradient of a row with no
// visible key into NaN.
template <typename T, int VL>
static inline void scaled_grad_row(T* dst, const T* src, int D, T scale) {
  typedef Vec<T, VL> V;
  const typename V::type zero = V::broadcast(T(0)), mul = V::broadcast(scale);
  for (int d = 0; d < D; d += VL) {
    const typename V::type g = V::load(src + d);
    V::store(dst + d, V::select(g == zero, zero, g * mul));
  }
}

// The logit scale is folded into the query block when finite; an infinite one is applied to the scores after the
// product, as (q·k) * scale (folded, inf * q_d terms of both signs would add up to NaN).
template <typename T>
static inline bool fold_scale(T scale) {
  return std::isfinite(scale);
}

// Whether key block kb of (b, h) must be read through a copy with its padded rows zeroed.
template <typename P>
static inline bool may_stage(const P& p, int64_t b, int64_t h, int64_t kb) {
  return p.mask_add != nullptr &&
         (p.padded_nonfinite == nullptr || p.padded_nonfinite[(b * p.s.heads + h) * p.s.num_k_blocks + kb] != 0);
}

// dst (n x D, contiguous) = the n rows of src (row stride ld), rows whose key is padded (mask_add != 0) zeroed.
// Returns false, copying nothing, when none of the n keys is padded.
template <typename T>
static inline bool stage_unpadded_rows(const T* src, int64_t ld, int n, int D, const T* mask_add, T* dst) {
  if (mask_add == nullptr) return false;
  bool any = false;
  for (int j = 0; j < n; ++j) any |= mask_add[j] != T(0);
  if (!any) return false;
  for (int j = 0; j < n; ++j) {
    if (mask_add[j] != T(0))
      std::fill(dst + j * D, dst + (j + 1) * D, T(0));
    else
      std::copy(src + j * ld, src + j * ld + D, dst + j * D);
  }
  return true;
}

// x[0:n] = exp(x[0:n]) (n a multiple of VL); exp(-inf) = 0, exp(NaN) = NaN.
template <typename T, int VL>
static inline void exp_inplace(T* x, int n) {
  if constexpr (sizeof(T) == 4) {
    typedef Vec<float, VL> V;
    for (int j = 0; j < n; j += VL) V::store(x + j, vexp<VL>(V::load(x + j)));
  } else {
    for (int j = 0; j < n; ++j) x[j] = std::exp(x[j]);
  }
}

template <typename T, int VL>
static inline void scale_row(T* x, int n, T a) {
  typedef Vec<T, VL> V;
  for (int j = 0; j < n; j += VL) V::store(x + j, V::load(x + j) * a);
}

// St (cols x bs, keys x queries) *= scale where it was not folded into Q, += bias, and = -inf (a select: whatever
// the score) for padded keys; rows of the query block past its end get no bias (their probabilities are
// discarded or forced to 0 by lse = +inf).
template <typename T, int VL>
static inline void finish_logits(T* St, int cols, int rows, int bs, T scale, const T* bias_t, int64_t ld_bias_t,
                                 const T* mask_add) {
  if (!fold_scale(scale))
    for (int j = 0; j < cols; ++j) scale_row<T, VL>(St + j * bs, bs, scale);
  if (bias_t != nullptr)  // the bias is read transposed too: contiguous along the queries, as St
    for (int j = 0; j < cols; ++j) {
      T* dst = St + j * bs;
      const T* src = bias_t + j * ld_bias_t;
      for (int i = 0; i < rows; ++i) dst[i] += src[i];
    }
  if (mask_add != nullptr)
    for (int j = 0; j < cols; ++j)
      if (mask_add[j] != T(0)) std::fill(St + j * bs, St + (j + 1) * bs, neg_inf<T>());
}

// One step of the online softmax over a chunk of scores St (cols x bs, keys x queries): the running max m and
// sum l of each query updated, St replaced by the probabilities exp(St - m_new), and the unnormalised output
// acc (rows x D) rescaled by exp(m_old - m_new). alpha and block_sum are bs-long scratch.
template <typename T, int VL>
static inline void online_softmax_step(T* St, int cols, int rows, int bs, int D, T* m, T* l, T* alpha, T* block_sum,
                                       T* acc) {
  typedef Vec<T, VL> V;
  typedef typename V::type vec;
  const vec ninf = V::broadcast(neg_inf<T>()), zero = V::broadcast(T(0));
  for (int i = 0; i < bs; i += VL) {
    // Four independent chains down the column strip hide the latency of max and add.
    vec mx0 = V::load(St + i), mx1 = mx0, mx2 = mx0, mx3 = mx0;
    int j = 1;
    for (; j + 4 <= cols; j += 4) {
      mx0 = max_nan<T, VL>(mx0, V::load(St + j * bs + i));
      mx1 = max_nan<T, VL>(mx1, V::load(St + (j + 1) * bs + i));
      mx2 = max_nan<T, VL>(mx2, V::load(St + (j + 2) * bs + i));
      mx3 = max_nan<T, VL>(mx3, V::load(St + (j + 3) * bs + i));
    }
    for (; j < cols; ++j) mx0 = max_nan<T, VL>(mx0, V::load(St + j * bs + i));
    const vec mx = max_nan<T, VL>(max_nan<T, VL>(mx0, mx1), max_nan<T, VL>(mx2, mx3));
    const vec m_old = V::load(m + i);
    vec m_new = max_nan<T, VL>(m_old, mx);
    V::store(m + i, m_new);
    // A query with nothing visible yet subtracts 0 instead of -inf: its probabilities stay exactly 0. A NaN
    // max stays NaN: alpha and every probability of the row become NaN.
    m_new = V::select(m_new == ninf, zero, m_new);
    V::store(alpha + i, m_old - m_new);
    if constexpr (sizeof(T) == 4) {  // exp, store and sum in one pass over the column strip
      vec sum0 = zero, sum1 = zero;
      j = 0;
      for (; j + 2 <= cols; j += 2) {
        const vec e0 = vexp<VL>(V::load(St + j * bs + i) - m_new);
        const vec e1 = vexp<VL>(V::load(St + (j + 1) * bs + i) - m_new);
        V::store(St + j * bs + i, e0);
        V::store(St + (j + 1) * bs + i, e1);
        sum0 += e0;
        sum1 += e1;
      }
      if (j < cols) {
        const vec e0 = vexp<VL>(V::load(St + j * bs + i) - m_new);
        V::store(St + j * bs + i, e0);
        sum0 += e0;
      }
      V::store(block_sum + i, sum0 + sum1);
    } else {
      for (j = 0; j < cols; ++j) V::store(St + j * bs + i, V::load(St + j * bs + i) - m_new);
    }
  }
  if constexpr (sizeof(T) != 4) {
    for (int j = 0; j < cols; ++j) exp_inplace<T, VL>(St + j * bs, bs);
    std::fill(block_sum, block_sum + bs, T(0));
    for (int j = 0; j < cols; ++j)
      for (int i = 0; i < bs; i += VL) V::store(block_sum + i, V::load(block_sum + i) + V::load(St + j * bs + i));
  }
  exp_inplace<T, VL>(alpha, bs);
  for (int i = 0; i < bs; i += VL)
    V::store(l + i, V::load(l + i) * V::load(alpha + i) + V::load(block_sum + i));
  for (int i = 0; i < rows; ++i)
    if (alpha[i] != T(1)) scale_row<T, VL>(acc + i * D, D, alpha[i]);
}

// Keys per step of the forward's online softmax: block_size 128 takes two steps per block, keeping its scores
// in L1 (measured: faster for 128, slower when 64 is split too).
constexpr int kKeyChunk = 64;

template <typename T>
void forward_impl(const BlockSparseCpuForward<T>& p, int64_t begin, int64_t end, T* ws) {
  constexpr int VL = Lanes<T>::value;
  typedef Vec<T, VL> V;
  const BlockSparseShape& s = p.s;
  const int bs = s.block_size;
  const int D = int(s.head_dim);
  const int64_t nqb = s.num_q_blocks, nkb = s.num_k_blocks;
  T* St = ws;             // bs x bs
  T* acc = St + bs * bs;  // bs x D: the unnormalised output block
  T* Qt = acc + bs * D;   // D x bs: scale * query block, transposed
  T* m = Qt + D * bs;      // running max per query
  T* l = m + bs;           // running sum per query
  T* alpha = l + bs;       // rescale of the running state per query
  T* block_sum = alpha + bs;
  T* Vs = block_sum + bs;  // kKeyChunk x D: a chunk of V with the rows of padded keys zeroed, when it has some
  const T fold = fold_scale(p.scale) ? p.scale : T(1);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t qb = t % nqb, bh = t / nqb, b = bh / s.heads, h = bh % s.heads;
    const int64_t hl = s.layout_heads == 1 ? 0 : h;
    const int64_t r0 = qb * bs;
    const int rows = int(std::min<int64_t>(bs, s.seq_q - r0));
    const T* Kn = head_rows(p.k, p.k_stride, b, h);
    const T* Vn = head_rows(p.v, p.v_stride, b, h);
    const int64_t ldk = p.k_stride[2], ldv = p.v_stride[2];
    const T* mask = p.mask_add ? p.mask_add + b * s.seq_k : nullptr;
    const T* bias = bias_block(s, p.bias_t, b, h);
    if (bias != nullptr) bias += r0;
    transpose_block(head_rows(p.q, p.q_stride, b, h) + r0 * p.q_stride[2], p.q_stride[2], rows, D, fold, Qt, bs);
    std::fill(m, m + bs, neg_inf<T>());
    std::fill(l, l + bs, T(0));
    std::fill(acc, acc + bs * D, T(0));
    const int32_t count = p.row_count[hl * nqb + qb];
    const int32_t* idx = p.row_index + (hl * nqb + qb) * nkb;
    for (int32_t e = 0; e < count; ++e) {
      const int64_t block_start = int64_t(idx[e]) * bs;
      const int block_cols = int(std::min<int64_t>(bs, s.seq_k - block_start));
      // Keys in chunks of at most kKeyChunk: the scores (chunk x bs) stay in L1 next to Q, K, V and acc.
      for (int chunk = 0; chunk < block_cols; chunk += kKeyChunk) {
        const int64_t c0 = block_start + chunk;
        const int cols = std::min(kKeyChunk, block_cols - chunk);
        gemm<T, VL>(cols, bs, D, Kn + c0 * ldk, ldk, 1, Qt, bs, St, bs, false);
        finish_logits<T, VL>(St, cols, rows, bs, p.scale, bias ? bias + c0 * s.seq_q : nullptr, s.seq_q,
                             mask ? mask + c0 : nullptr);
        online_softmax_step<T, VL>(St, cols, rows, bs, D, m, l, alpha, block_sum, acc);
        // acc (rows x D) += P (rows x cols) * V (cols x D); P is read out of St transposed. A padded key's
        // probability is 0, but 0 * (a NaN or inf in its v) would not be: such chunks read V with those rows zeroed.
        const T* Vc = Vn + c0 * ldv;
        int64_t ldvc = ldv;
        if (may_stage(p, b, h, idx[e]) && stage_unpadded_rows(Vc, ldv, cols, D, mask ? mask + c0 : nullptr, Vs)) {
          Vc = Vs;
          ldvc = D;
        }
        gemm<T, VL>(rows, D, cols, St, 1, bs, Vc, ldvc, acc, D, true);
      }
    }
    const int64_t ldo = p.out_stride[2];
    T* O = p.out + b * p.out_stride[0] + h * p.out_stride[1] + r0 * ldo;
    T* lse = p.lse + bh * s.seq_q + r0;
    for (int i = 0; i < rows; ++i) {
      // A row is empty when its max is still -inf (not when l > 0 fails: a NaN row has l = NaN).
      if (m[i] != neg_inf<T>()) {
        const T inv = T(1) / l[i];
        for (int d = 0; d < D; d += VL) V::store(O + i * ldo + d, V::load(acc + i * D + d) * inv);
        lse[i] = m[i] + std::log(l[i]);  // NaN for a NaN row (a vectorised log measured no faster: once per row)
      } else {  // no visible key: zeros out, and +inf makes every recomputed probability 0 in the backward
        std::fill(O + i * ldo, O + i * ldo + D, T(0));
        lse[i] = std::numeric_limits<T>::infinity();
      }
    }
  }
}

template <typename T>
void backward_prepare_impl(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end) {
  const BlockSparseShape& s = p.s;
  const int bs = s.block_size, D = int(s.head_dim);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t qb = t % s.num_q_blocks, bh = t / s.num_q_blocks, r0 = qb * bs;
    const int64_t b = bh / s.heads, h = bh % s.heads;
    const int rows = int(std::min<int64_t>(bs, s.seq_q - r0));
    transpose_block(head_rows(p.q, p.q_stride, b, h) + r0 * p.q_stride[2], p.q_stride[2], rows, D,
                    fold_scale(p.scale) ? p.scale : T(1), p.q_t_blocks + t * D * bs, bs);
    transpose_block(head_rows(p.grad_out, p.grad_out_stride, b, h) + r0 * p.grad_out_stride[2],
                    p.grad_out_stride[2], rows, D, T(1), p.grad_out_t_blocks + t * D * bs, bs);
  }
}

// The query-block state both backward passes start from: scale * Qᵀ and grad_outᵀ (prepared blocks), lse
// and delta (copied, padded with +inf and 0 past the end of the block).
template <typename T>
static inline void load_query_block(const BlockSparseCpuBackward<T>& p, int64_t bh, int64_t qb, int rows,
                                    const T*& Qt, const T*& dOt, T* lse, T* delta) {
  const BlockSparseShape& s = p.s;
  const int bs = s.block_size, D = int(s.head_dim);
  const int64_t r0 = qb * bs;
  Qt = p.q_t_blocks + (bh * s.num_q_blocks + qb) * D * bs;
  dOt = p.grad_out_t_blocks + (bh * s.num_q_blocks + qb) * D * bs;
  for (int i = 0; i < bs; ++i) {
    lse[i] = i < rows ? p.lse[bh * s.seq_q + r0 + i] : std::numeric_limits<T>::infinity();
    delta[i] = i < rows ? p.delta[bh * s.seq_q + r0 + i] : T(0);
  }
}

// Logits St (cols x bs, keys x queries) to Pᵀ = exp(St - lse), and dPᵀ in dPt to dSᵀ = Pᵀ (dPᵀ - delta); a masked
// logit (-inf) gets P = dS = 0 by a select.
template <typename T, int VL>
static inline void probabilities_and_ds(T* St, T* dPt, int cols, int bs, const T* lse, const T* delta) {
  typedef Vec<T, VL> V;
  typedef typename V::type vec;
  const vec ninf = V::broadcast(neg_inf<T>()), zero = V::broadcast(T(0));
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < bs; i += VL) {
      const vec x = V::load(St + j * bs + i);
      const vec e = exp_lanes<T, VL>(x - V::load(lse + i));
      const auto masked = x == ninf;
      V::store(St + j * bs + i, V::select(masked, zero, e));
      V::store(dPt + j * bs + i, V::select(masked, zero, e * (V::load(dPt + j * bs + i) - V::load(delta + i))));
    }
}

// Recomputes Pᵀ into St and turns dPt into dSᵀ = Pᵀ * (dPᵀ - delta) for one (key block, query block) pair. A
// masked logit (-inf) gets P = dS = 0 by a select: exp(-inf - lse) is NaN for a NaN row's lse, and dPᵀ is NaN at a
// padded key holding a NaN v.
template <typename T>
static inline void recompute_block(const BlockSparseCpuBackward<T>& p, const T* Kb, int64_t ldk, const T* Vb,
                                   int64_t ldv, int cols, int rows, const T* bias, const T* mask, const T* Qt,
                                   const T* dOt, const T* lse, const T* delta, T* St, T* dPt) {
  constexpr int VL = Lanes<T>::value;
  const int bs = p.s.block_size, D = int(p.s.head_dim);
  gemm<T, VL>(cols, bs, D, Kb, ldk, 1, Qt, bs, St, bs, false);
  finish_logits<T, VL>(St, cols, rows, bs, p.scale, bias, p.s.seq_q, mask);
  gemm<T, VL>(cols, bs, D, Vb, ldv, 1, dOt, bs, dPt, bs, false);
  probabilities_and_ds<T, VL>(St, dPt, cols, bs, lse, delta);
}

template <typename T>
void backward_rows_impl(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* ws) {
  constexpr int VL = Lanes<T>::value;
  const BlockSparseShape& s = p.s;
  const int bs = s.block_size;
  const int D = int(s.head_dim);
  const int64_t nqb = s.num_q_blocks, nkb = s.num_k_blocks;
  const bool with_grad_bias = p.grad_bias != nullptr;
  const int64_t batch_groups = with_grad_bias ? s.bias_batch : s.batch;
  const int64_t head_groups = with_grad_bias ? s.bias_heads : s.heads;
  const int64_t batch_per_group = s.batch / batch_groups, heads_per_group = s.heads / head_groups;
  T* St = ws;
  T* dSt = St + bs * bs;
  T* dQ = dSt + bs * bs;  // bs x D
  T* lse = dQ + bs * D;
  T* delta = lse + bs;
  T* Ks = delta + bs;  // bs x D: a key block with the rows of padded keys zeroed, when it has some
  const T* Qt = nullptr;
  const T* dOt = nullptr;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t qb = t % nqb, g = t / nqb, hg = g % head_groups, bg = g / head_groups;
    const int64_t r0 = qb * bs;
    const int rows = int(std::min<int64_t>(bs, s.seq_q - r0));
    T* grad_bias = with_grad_bias ? p.grad_bias + ((bg * s.bias_heads + hg) * s.seq_q + r0) * s.seq_k : nullptr;
    // Fixed order over the batch rows and heads sharing this bias block: the bias gradient is deterministic.
    for (int64_t bi = 0; bi < batch_per_group; ++bi) {
      for (int64_t hi = 0; hi < heads_per_group; ++hi) {
        const int64_t b = bg * batch_per_group + bi, h = hg * heads_per_group + hi, bh = b * s.heads + h;
        const int64_t hl = s.layout_heads == 1 ? 0 : h;
        const T* Kn = head_rows(p.k, p.k_stride, b, h);
        const T* Vn = head_rows(p.v, p.v_stride, b, h);
        const int64_t ldk = p.k_stride[2], ldv = p.v_stride[2];
        const T* mask = p.mask_add ? p.mask_add + b * s.seq_k : nullptr;
        const T* bias = bias_block(s, p.bias_t, b, h);
        if (bias != nullptr) bias += r0;
        load_query_block(p, bh, qb, rows, Qt, dOt, lse, delta);
        std::fill(dQ, dQ + bs * D, T(0));
        const int32_t count = p.row_count[hl * nqb + qb];
        const int32_t* idx = p.row_index + (hl * nqb + qb) * nkb;
        for (int32_t e = 0; e < count; ++e) {
          const int64_t c0 = int64_t(idx[e]) * bs;
          const int cols = int(std::min<int64_t>(bs, s.seq_k - c0));
          const T* mask_c = mask ? mask + c0 : nullptr;
          recompute_block(p, Kn + c0 * ldk, ldk, Vn + c0 * ldv, ldv, cols, rows, bias ? bias + c0 * s.seq_q : nullptr, mask_c,
                          Qt, dOt, lse, delta, St, dSt);
          if (grad_bias != nullptr)
            for (int i = 0; i < rows; ++i)
              for (int j = 0; j < cols; ++j) grad_bias[i * s.seq_k + c0 + j] += dSt[j * bs + i];
          // dQ (rows x D) += dS (rows x cols) * K (cols x D); dS is read out of dSt transposed. As in the forward's
          // P V, padded keys' rows of K are read as zero.
          if (p.grad_q != nullptr) {
            const bool staged = may_stage(p, b, h, idx[e]) && stage_unpadded_rows(Kn + c0 * ldk, ldk, cols, D, mask_c, Ks);
            gemm<T, VL>(rows, D, cols, dSt, 1, bs, staged ? Ks : Kn + c0 * ldk, staged ? D : ldk, dQ, D, true);
          }
        }
        if (p.grad_q != nullptr) {
          const int64_t ldgq = p.grad_q_stride[2];
          T* gq = grad_rows(p.grad_q, p.grad_q_stride, b, h) + r0 * ldgq;
          for (int i = 0; i < rows; ++i)
            scaled_grad_row<T, VL>(gq + i * ldgq, dQ + i * D, D, p.scale);
        }
      }
    }
  }
}

template <typename T>
void backward_cols_impl(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* ws) {
  constexpr int VL = Lanes<T>::value;
  const BlockSparseShape& s = p.s;
  const int bs = s.block_size;
  const int D = int(s.head_dim);
  const int64_t nqb = s.num_q_blocks, nkb = s.num_k_blocks;
  T* St = ws;
  T* dSt = St + bs * bs;
  T* dK = dSt + bs * bs;
  T* dV = dK + bs * D;
  T* lse = dV + bs * D;
  T* delta = lse + bs;
  const T* Qt = nullptr;
  const T* dOt = nullptr;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t kb = t % nkb, bh = t / nkb, b = bh / s.heads, h = bh % s.heads;
    const int64_t hl = s.layout_heads == 1 ? 0 : h;
    const int64_t c0 = kb * bs;
    const int cols = int(std::min<int64_t>(bs, s.seq_k - c0));
    const T* Kb = head_rows(p.k, p.k_stride, b, h) + c0 * p.k_stride[2];
    const T* Vb = head_rows(p.v, p.v_stride, b, h) + c0 * p.v_stride[2];
    const T* Qn = head_rows(p.q, p.q_stride, b, h);
    const T* dOn = head_rows(p.grad_out, p.grad_out_stride, b, h);
    const int64_t ldq = p.q_stride[2], ldo = p.grad_out_stride[2];
    const T* mask = p.mask_add ? p.mask_add + b * s.seq_k + c0 : nullptr;
    const T* bias = bias_block(s, p.bias_t, b, h);
    std::fill(dK, dK + cols * D, T(0));
    std::fill(dV, dV + cols * D, T(0));
    const int32_t count = p.col_count[hl * nkb + kb];
    const int32_t* idx = p.col_index + (hl * nkb + kb) * nqb;
    for (int32_t e = 0; e < count; ++e) {
      const int64_t qb = idx[e], r0 = qb * bs;
      const int rows = int(std::min<int64_t>(bs, s.seq_q - r0));
      load_query_block(p, bh, qb, rows, Qt, dOt, lse, delta);
      recompute_block(p, Kb, p.k_stride[2], Vb, p.v_stride[2], cols, rows, bias ? bias + c0 * s.seq_q + r0 : nullptr,
                      mask, Qt, dOt, lse, delta, St, dSt);
      gemm<T, VL>(cols, D, rows, St, bs, 1, dOn + r0 * ldo, ldo, dV, D, true);  // dV += Pᵀ dO
      gemm<T, VL>(cols, D, rows, dSt, bs, 1, Qn + r0 * ldq, ldq, dK, D, true);  // dK += dSᵀ Q (scaled below)
    }
    const int64_t ldgk = p.grad_k_stride[2], ldgv = p.grad_v_stride[2];
    T* gk = grad_rows(p.grad_k, p.grad_k_stride, b, h) + c0 * ldgk;
    T* gv = grad_rows(p.grad_v, p.grad_v_stride, b, h) + c0 * ldgv;
    for (int j = 0; j < cols; ++j) {
      scaled_grad_row<T, VL>(gk + j * ldgk, dK + j * D, D, p.scale);
      std::copy(dV + j * D, dV + (j + 1) * D, gv + j * ldgv);
    }
    // A padded key's gradients are zero (its P and dS are, but 0 times a NaN q or grad_out row would not be).
    if (mask != nullptr)
      for (int j = 0; j < cols; ++j)
        if (mask[j] != T(0)) {
          std::fill(gk + j * ldgk, gk + j * ldgk + D, T(0));
          std::fill(gv + j * ldgv, gv + j * ldgv + D, T(0));
        }
  }
}

// One pass for all gradients of one (batch b, head h): each (query block, key block) pair of the layout is
// recomputed once (Pᵀ and dSᵀ, two products) and feeds dQ += dS K, dV += Pᵀ dO and dK += dSᵀ Q: five products
// per pair where the row and column passes take seven. The gradients accumulate straight into (b, h)'s own rows of
// grad_q, grad_k and grad_v. dS goes to (b, h)'s own rows of grad_bias when the bias is per (batch, head)
// (bias_sum_t null), or is added to bias_sum_t, a (Nk x Nq) transposed partial sum of the bias block that
// (b, h) shares with other batch rows and heads. The longer side is the outer loop, so the gradient blocks it
// accumulates stay in cache while the shorter side streams.
template <typename T>
static void backward_fused_member(const BlockSparseCpuBackward<T>& p, int64_t b, int64_t h, T* ws, T* bias_sum_t) {
  constexpr int VL = Lanes<T>::value;
  const BlockSparseShape& s = p.s;
  const int bs = s.block_size;
  const int D = int(s.head_dim);
  const int64_t nqb = s.num_q_blocks, nkb = s.num_k_blocks;
  const bool queries_outer = s.seq_q >= s.seq_k;
  T* St = ws;
  T* dSt = St + bs * bs;
  T* dQ = dSt + bs * bs;  // bs x D, queries outer: the query block's gradient
  T* lse = dQ + bs * D;
  T* delta = lse + bs;
  T* Ks = delta + bs;  // bs x D: a key block with the rows of padded keys zeroed, when it has some
  T* Qs = Ks + bs * D;   // D x bs: queries outer, scale * the query block transposed
  T* dOs = Qs + D * bs;  // D x bs: queries outer, the grad_out block transposed
  const T* Qt = nullptr;
  const T* dOt = nullptr;
  {
    const int64_t bh = b * s.heads + h;
    const int64_t hl = s.layout_heads == 1 ? 0 : h;
    const T* Kn = head_rows(p.k, p.k_stride, b, h);
    const T* Vn = head_rows(p.v, p.v_stride, b, h);
    const T* Qn = head_rows(p.q, p.q_stride, b, h);
    const T* dOn = head_rows(p.grad_out, p.grad_out_stride, b, h);
    const int64_t ldk = p.k_stride[2], ldv = p.v_stride[2], ldq = p.q_stride[2], ldo = p.grad_out_stride[2];
    const T* mask = p.mask_add ? p.mask_add + b * s.seq_k : nullptr;
    const T* bias = bias_block(s, p.bias_t, b, h);
    T* grad_bias = p.grad_bias != nullptr && bias_sum_t == nullptr ? p.grad_bias + bh * s.seq_q * s.seq_k : nullptr;
    const int64_t ldgq = p.grad_q_stride[2], ldgk = p.grad_k_stride[2], ldgv = p.grad_v_stride[2];
    T* gq = grad_rows(p.grad_q, p.grad_q_stride, b, h);
    T* gk = grad_rows(p.grad_k, p.grad_k_stride, b, h);
    T* gv = grad_rows(p.grad_v, p.grad_v_stride, b, h);
    for (int64_t j = 0; j < s.seq_k; ++j) {
      std::fill(gk + j * ldgk, gk + j * ldgk + D, T(0));
      std::fill(gv + j * ldgv, gv + j * ldgv + D, T(0));
    }
    if (!queries_outer)
      for (int64_t i = 0; i < s.seq_q; ++i) std::fill(gq + i * ldgq, gq + i * ldgq + D, T(0));
    // One pair of the layout, the query block's Qt, dOt, lse and delta loaded; dq (row stride lddq) is the query
    // block's gradient accumulator, Kd the key block with padded keys' rows read as zero.
    auto pair = [&](int64_t qb, int64_t c0, int rows, int cols, T* dq, int64_t lddq, const T* Kd, int64_t ldkd) {
      const int64_t r0 = qb * bs;
      const T* mask_c = mask ? mask + c0 : nullptr;
      recompute_block(p, Kn + c0 * ldk, ldk, Vn + c0 * ldv, ldv, cols, rows, bias ? bias + c0 * s.seq_q + r0 : nullptr,
                      mask_c, Qt, dOt, lse, delta, St, dSt);
      if (grad_bias != nullptr)
        for (int i = 0; i < rows; ++i)
          for (int j = 0; j < cols; ++j) grad_bias[(r0 + i) * s.seq_k + c0 + j] = dSt[j * bs + i];
      if (bias_sum_t != nullptr)  // lane-wise adds down the key rows of the transposed partial
        for (int j = 0; j < cols; ++j) {
          T* dst = bias_sum_t + (c0 + j) * s.seq_q + r0;
          const T* src = dSt + j * bs;
          for (int i = 0; i < rows; ++i) dst[i] += src[i];
        }
      gemm<T, VL>(cols, D, rows, St, bs, 1, dOn + r0 * ldo, ldo, gv + c0 * ldgv, ldgv, true);  // dV += Pᵀ dO
      gemm<T, VL>(cols, D, rows, dSt, bs, 1, Qn + r0 * ldq, ldq, gk + c0 * ldgk, ldgk, true);  // dK += dSᵀ Q
      gemm<T, VL>(rows, D, cols, dSt, 1, bs, Kd, ldkd, dq, lddq, true);                        // dQ += dS K
    };
    auto key_block = [&](int64_t c0, int cols, const T*& Kd, int64_t& ldkd) {
      const bool staged = may_stage(p, b, h, c0 / bs) &&
                          stage_unpadded_rows(Kn + c0 * ldk, ldk, cols, D, mask ? mask + c0 : nullptr, Ks);
      Kd = staged ? Ks : Kn + c0 * ldk;
      ldkd = staged ? D : ldk;
    };
    if (queries_outer) {
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t r0 = qb * bs;
        const int rows = int(std::min<int64_t>(bs, s.seq_q - r0));
        std::fill(dQ, dQ + bs * D, T(0));
        // Each query block is visited once here: staged in the workspace (no prepared copies of Q and grad_out).
        transpose_block(Qn + r0 * ldq, ldq, rows, D, fold_scale(p.scale) ? p.scale : T(1), Qs, bs);
        transpose_block(dOn + r0 * ldo, ldo, rows, D, T(1), dOs, bs);
        Qt = Qs;
        dOt = dOs;
        for (int i = 0; i < bs; ++i) {
          lse[i] = i < rows ? p.lse[bh * s.seq_q + r0 + i] : std::numeric_limits<T>::infinity();
          delta[i] = i < rows ? p.delta[bh * s.seq_q + r0 + i] : T(0);
        }
        const int32_t count = p.row_count[hl * nqb + qb];
        const int32_t* idx = p.row_index + (hl * nqb + qb) * nkb;
        for (int32_t e = 0; e < count; ++e) {
          const int64_t c0 = int64_t(idx[e]) * bs;
          const int cols = int(std::min<int64_t>(bs, s.seq_k - c0));
          const T* Kd;
          int64_t ldkd;
          key_block(c0, cols, Kd, ldkd);
          pair(qb, c0, rows, cols, dQ, D, Kd, ldkd);
        }
        for (int i = 0; i < rows; ++i)
          scaled_grad_row<T, VL>(gq + (r0 + i) * ldgq, dQ + i * D, D, p.scale);
      }
    } else {
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int64_t c0 = kb * bs;
        const int cols = int(std::min<int64_t>(bs, s.seq_k - c0));
        const T* Kd;
        int64_t ldkd;
        key_block(c0, cols, Kd, ldkd);
        const int32_t count = p.col_count[hl * nkb + kb];
        const int32_t* idx = p.col_index + (hl * nkb + kb) * nqb;
        for (int32_t e = 0; e < count; ++e) {
          const int64_t qb = idx[e];
          load_query_block(p, bh, qb, int(std::min<int64_t>(bs, s.seq_q - qb * bs)), Qt, dOt, lse, delta);
          pair(qb, c0, int(std::min<int64_t>(bs, s.seq_q - qb * bs)), cols, gq + qb * bs * ldgq, ldgq, Kd, ldkd);
        }
      }
      for (int64_t i = 0; i < s.seq_q; ++i)
        scaled_grad_row<T, VL>(gq + i * ldgq, gq + i * ldgq, D, p.scale);
    }
    for (int64_t j = 0; j < s.seq_k; ++j)
      scaled_grad_row<T, VL>(gk + j * ldgk, gk + j * ldgk, D, p.scale);
    // A padded key's gradients are zero (its P and dS are, but 0 times a NaN q or grad_out row would not be).
    if (mask != nullptr)
      for (int64_t j = 0; j < s.seq_k; ++j)
        if (mask[j] != T(0)) {
          std::fill(gk + j * ldgk, gk + j * ldgk + D, T(0));
          std::fill(gv + j * ldgv, gv + j * ldgv + D, T(0));
        }
  }
}

// The fused pass's tasks. Without a shared bias gradient, task t is (batch, head) t. With one, the (B / Bb) *
// (H / Hb) members (batch row, head) sharing each bias block are split into `splits` contiguous ranges (a number
// from the shape alone), task t = (bias block g, range r): its members run in order and add dS into partial
// (r, g); backward_fused_reduce_bias then sums the partials of each bias block in range order. Fixed ranges
// and fixed orders: the bias gradient's bits depend on neither the threads nor the schedule.
template <typename T, typename Member>
static inline void fused_tasks(const BlockSparseShape& s, T* bias_partials, int64_t splits, int64_t begin, int64_t end,
                               const Member& member) {
  if (bias_partials == nullptr) {
    for (int64_t t = begin; t < end; ++t) member(t / s.heads, t % s.heads, (T*)nullptr);
    return;
  }
  const int64_t groups = s.bias_batch * s.bias_heads;
  const int64_t batch_per_group = s.batch / s.bias_batch, heads_per_group = s.heads / s.bias_heads;
  const int64_t members = batch_per_group * heads_per_group;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t g = t / splits, r = t % splits, bg = g / s.bias_heads, hg = g % s.bias_heads;
    T* partial = bias_partials + (r * groups + g) * s.seq_k * s.seq_q;
    for (int64_t m = r * members / splits; m < (r + 1) * members / splits; ++m)
      member(bg * batch_per_group + m / heads_per_group, hg * heads_per_group + m % heads_per_group, partial);
  }
}

template <typename T>
void backward_fused_impl(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* ws) {
  fused_tasks(p.s, p.bias_partials, p.bias_splits, begin, end,
              [&](int64_t b, int64_t h, T* partial) { backward_fused_member(p, b, h, ws, partial); });
}

// grad_bias[g, i, j] = sum over ranges r, in order, of partial[r, g, j, i]; task t = key j of bias block g.
template <typename T>
void backward_fused_reduce_bias_impl(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end) {
  const BlockSparseShape& s = p.s;
  const int64_t groups = s.bias_batch * s.bias_heads, Nq = s.seq_q, Nk = s.seq_k;
  const int64_t range_stride = groups * Nk * Nq;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t g = t / Nk, j = t % Nk;
    const T* src = p.bias_partials + (g * Nk + j) * Nq;  // range 0; range r is r * range_stride further
    T* dst = p.grad_bias + g * Nq * Nk + j;
    for (int64_t i = 0; i < Nq; ++i) {
      T sum = 0;
      for (int64_t r = 0; r < p.bias_splits; ++r) sum += src[r * range_stride + i];
      dst[i * Nk] = sum;
    }
  }
}
