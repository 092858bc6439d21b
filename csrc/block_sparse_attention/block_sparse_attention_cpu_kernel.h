// Block-sparse flash attention on the CPU: the ISA-generic kernel bodies. Included once per instruction set
// by block_sparse_attention_cpu_kernel.cpp, inside a namespace that defines kFloatLanes and after
// common/cpu_simd.h; it has no include guard and includes nothing itself.
//
// Every product is a row-major gemm_nn on (block_size x block_size) or (block_size x D) tiles; operands needed
// transposed are transposed one block at a time into the thread's workspace.

template <typename T>
struct Lanes {
  static constexpr int value = kFloatLanes * 4 / int(sizeof(T));
};

template <typename T>
static inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
static inline const T* bias_block(const BlockSparseShape& s, const T* bias, int64_t b, int64_t h) {
  if (bias == nullptr) return nullptr;
  int64_t bb = b / (s.batch / s.bias_batch);
  int64_t hb = s.bias_heads == 1 ? 0 : h;
  return bias + (bb * s.bias_heads + hb) * s.seq_q * s.seq_k;
}

// s[0:n] = s * scale + bias[0:nb] + mask_add[0:n]; n is a multiple of VL, nb <= n (nb < n in a tail block,
// whose extra columns mask_add already sets to -inf).
template <typename T, int VL>
static inline void scale_bias_mask(T* s, int n, T scale, const T* bias, int nb, const T* mask_add) {
  typedef Vec<T, VL> V;
  if (bias != nullptr && nb == n) {
    for (int j = 0; j < n; j += VL) V::store(s + j, V::load(s + j) * scale + V::load(bias + j) + V::load(mask_add + j));
    return;
  }
  for (int j = 0; j < n; j += VL) V::store(s + j, V::load(s + j) * scale + V::load(mask_add + j));
  if (bias != nullptr)
    for (int j = 0; j < nb; ++j) s[j] += bias[j];
}

template <typename T, int VL>
static inline T row_max(const T* s, int n) {
  typedef Vec<T, VL> V;
  typename V::type m = V::load(s);
  for (int j = VL; j < n; j += VL) m = V::max(m, V::load(s + j));
  return V::reduce_max(m);
}

// s = exp(s - sub), returning the sum of the new s.
template <typename T, int VL>
static inline T exp_sub_sum(T* s, int n, T sub) {
  if constexpr (sizeof(T) == 4) {
    typedef Vec<float, VL> V;
    typename V::type acc = V::broadcast(0.f), sv = V::broadcast(sub);
    for (int j = 0; j < n; j += VL) {
      typename V::type e = vexp<VL>(V::load(s + j) - sv);
      V::store(s + j, e);
      acc += e;
    }
    return V::reduce_sum(acc);
  } else {
    T sum = 0;
    for (int j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - sub);
      sum += s[j];
    }
    return sum;
  }
}

// s[j] = exp(s[j] - sub[j]).
template <typename T, int VL>
static inline void exp_sub_vec(T* s, int n, const T* sub) {
  if constexpr (sizeof(T) == 4) {
    typedef Vec<float, VL> V;
    for (int j = 0; j < n; j += VL) V::store(s + j, vexp<VL>(V::load(s + j) - V::load(sub + j)));
  } else {
    for (int j = 0; j < n; ++j) s[j] = std::exp(s[j] - sub[j]);
  }
}

template <typename T, int VL>
static inline void scale_row(T* x, int n, T a) {
  typedef Vec<T, VL> V;
  for (int j = 0; j < n; j += VL) V::store(x + j, V::load(x + j) * a);
}

// dst[d * bs + j] = src[j * D + d] for j < n, zero for n <= j < bs: a (n x D) row-major block as (D x bs).
// Transposing per visited block keeps the B operand contiguous (a whole transposed copy of K would put its
// rows Nk apart: cache-set conflicts for power-of-two lengths).
template <typename T>
static inline void transpose_block(const T* __restrict src, int n, int D, T* __restrict dst, int bs) {
  for (int j = 0; j < n; ++j)
    for (int d = 0; d < D; ++d) dst[d * bs + j] = src[j * D + d];
  if (n < bs)
    for (int d = 0; d < D; ++d) std::fill(dst + d * bs + n, dst + (d + 1) * bs, T(0));
}

template <typename T>
void forward_impl(const BlockSparseCpuForward<T>& p, int64_t begin, int64_t end, T* ws) {
  constexpr int VL = Lanes<T>::value;
  const BlockSparseShape& s = p.s;
  const int bs = s.block_size;
  const int D = int(s.head_dim);
  const int64_t nqb = s.num_q_blocks, nkb = s.num_k_blocks, Nkp = s.seq_k_padded;
  T* S = ws;
  T* acc = S + bs * bs;
  T* m_row = acc + bs * D;
  T* l_row = m_row + bs;
  T* Kt = l_row + bs;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t qb = t % nqb, bh = t / nqb, b = bh / s.heads, h = bh % s.heads;
    const int64_t hl = s.layout_heads == 1 ? 0 : h;
    const int64_t r0 = qb * bs;
    const int rows = int(std::min<int64_t>(bs, s.seq_q - r0));
    const T* Q = p.q + (bh * s.seq_q + r0) * D;
    const T* Kn = p.k + bh * s.seq_k * D;
    const T* Vb = p.v + bh * s.seq_k * D;
    const T* mask = p.mask_add + (p.mask_batch == 1 ? 0 : b) * Nkp;
    const T* bias = bias_block(s, p.bias, b, h);
    if (bias != nullptr) bias += r0 * s.seq_k;
    for (int i = 0; i < rows; ++i) {
      m_row[i] = neg_inf<T>();
      l_row[i] = 0;
    }
    std::fill(acc, acc + rows * D, T(0));
    const int32_t count = p.row_count[hl * nqb + qb];
    const int32_t* idx = p.row_index + (hl * nqb + qb) * nkb;
    for (int32_t e = 0; e < count; ++e) {
      const int64_t c0 = int64_t(idx[e]) * bs;
      const int ncols = int(std::min<int64_t>(bs, s.seq_k - c0));
      transpose_block(Kn + c0 * D, ncols, D, Kt, bs);
      gemm_nn<T, VL>(rows, bs, D, Q, D, Kt, bs, S, bs, false);
      for (int i = 0; i < rows; ++i) {
        T* si = S + i * bs;
        scale_bias_mask<T, VL>(si, bs, p.scale, bias ? bias + i * s.seq_k + c0 : nullptr, ncols, mask + c0);
        const T m_new = std::max(m_row[i], row_max<T, VL>(si, bs));
        if (m_new == neg_inf<T>()) {  // nothing visible in this row yet: contributes nothing
          std::fill(si, si + bs, T(0));
          continue;
        }
        const T alpha = std::exp(m_row[i] - m_new);
        l_row[i] = l_row[i] * alpha + exp_sub_sum<T, VL>(si, bs, m_new);
        if (alpha != T(1)) scale_row<T, VL>(acc + i * D, D, alpha);
        m_row[i] = m_new;
      }
      gemm_nn<T, VL>(rows, D, ncols, S, bs, Vb + c0 * D, D, acc, D, true);
    }
    T* O = p.out + (bh * s.seq_q + r0) * D;
    T* lse = p.lse + bh * s.seq_q + r0;
    for (int i = 0; i < rows; ++i) {
      if (l_row[i] > T(0)) {
        const T inv = T(1) / l_row[i];
        for (int d = 0; d < D; ++d) O[i * D + d] = acc[i * D + d] * inv;
        lse[i] = m_row[i] + std::log(l_row[i]);
      } else {  // no visible key: zeros out, and +inf makes every recomputed probability 0 in the backward
        std::fill(O + i * D, O + (i + 1) * D, T(0));
        lse[i] = std::numeric_limits<T>::infinity();
      }
    }
  }
}

template <typename T>
void backward_rows_impl(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* ws) {
  constexpr int VL = Lanes<T>::value;
  typedef Vec<T, VL> V;
  const BlockSparseShape& s = p.s;
  const int bs = s.block_size;
  const int D = int(s.head_dim);
  const int64_t nqb = s.num_q_blocks, nkb = s.num_k_blocks, Nkp = s.seq_k_padded;
  const bool with_grad_bias = p.grad_bias != nullptr;
  const int64_t batch_groups = with_grad_bias ? s.bias_batch : s.batch;
  const int64_t head_groups = with_grad_bias ? s.bias_heads : s.heads;
  const int64_t batch_per_group = s.batch / batch_groups, heads_per_group = s.heads / head_groups;
  T* S = ws;
  T* dP = S + bs * bs;
  T* dQ = dP + bs * bs;
  T* Kt = dQ + bs * D;
  T* Vt = Kt + D * bs;
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
        const T* Q = p.q + (bh * s.seq_q + r0) * D;
        const T* dO = p.grad_out + (bh * s.seq_q + r0) * D;
        const T* Kn = p.k + bh * s.seq_k * D;
        const T* Vn = p.v + bh * s.seq_k * D;
        const T* lse = p.lse + bh * s.seq_q + r0;
        const T* delta = p.delta + bh * s.seq_q + r0;
        const T* mask = p.mask_add + (p.mask_batch == 1 ? 0 : b) * Nkp;
        const T* bias = bias_block(s, p.bias, b, h);
        if (bias != nullptr) bias += r0 * s.seq_k;
        if (p.grad_q != nullptr) std::fill(dQ, dQ + rows * D, T(0));
        const int32_t count = p.row_count[hl * nqb + qb];
        const int32_t* idx = p.row_index + (hl * nqb + qb) * nkb;
        for (int32_t e = 0; e < count; ++e) {
          const int64_t c0 = int64_t(idx[e]) * bs;
          const int ncols = int(std::min<int64_t>(bs, s.seq_k - c0));
          transpose_block(Kn + c0 * D, ncols, D, Kt, bs);
          transpose_block(Vn + c0 * D, ncols, D, Vt, bs);
          gemm_nn<T, VL>(rows, bs, D, Q, D, Kt, bs, S, bs, false);
          gemm_nn<T, VL>(rows, bs, D, dO, D, Vt, bs, dP, bs, false);
          for (int i = 0; i < rows; ++i) {
            T* si = S + i * bs;
            const T* dpi = dP + i * bs;
            scale_bias_mask<T, VL>(si, bs, p.scale, bias ? bias + i * s.seq_k + c0 : nullptr, ncols, mask + c0);
            exp_sub_sum<T, VL>(si, bs, lse[i]);
            const typename V::type dv = V::broadcast(delta[i]);
            for (int j = 0; j < bs; j += VL) V::store(si + j, V::load(si + j) * (V::load(dpi + j) - dv));
          }
          if (grad_bias != nullptr)
            for (int i = 0; i < rows; ++i)
              for (int j = 0; j < ncols; ++j) grad_bias[i * s.seq_k + c0 + j] += S[i * bs + j];
          if (p.grad_q != nullptr) gemm_nn<T, VL>(rows, D, ncols, S, bs, Kn + c0 * D, D, dQ, D, true);
        }
        if (p.grad_q != nullptr) {
          T* gq = p.grad_q + (bh * s.seq_q + r0) * D;
          for (int i = 0; i < rows * D; ++i) gq[i] = dQ[i] * p.scale;
        }
      }
    }
  }
}

template <typename T>
void backward_cols_impl(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* ws) {
  constexpr int VL = Lanes<T>::value;
  typedef Vec<T, VL> V;
  const BlockSparseShape& s = p.s;
  const int bs = s.block_size;
  const int D = int(s.head_dim);
  const int64_t nqb = s.num_q_blocks, nkb = s.num_k_blocks, Nkp = s.seq_k_padded;
  T* St = ws;  // probabilities, transposed: (keys of this block) x (queries of the visited block)
  T* dPt = St + bs * bs;
  T* dK = dPt + bs * bs;
  T* dV = dK + bs * D;
  T* Qt = dV + bs * D;
  T* dOt = Qt + D * bs;
  T* lse = dOt + D * bs;  // this query block's log-sum-exp and delta, padded with +inf and 0
  T* delta = lse + bs;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t kb = t % nkb, bh = t / nkb, b = bh / s.heads, h = bh % s.heads;
    const int64_t hl = s.layout_heads == 1 ? 0 : h;
    const int64_t c0 = kb * bs;
    const int cols = int(std::min<int64_t>(bs, s.seq_k - c0));
    const T* Kb = p.k + (bh * s.seq_k + c0) * D;
    const T* Vb = p.v + (bh * s.seq_k + c0) * D;
    const T* Qn = p.q + bh * s.seq_q * D;
    const T* dOn = p.grad_out + bh * s.seq_q * D;
    const T* mask = p.mask_add + (p.mask_batch == 1 ? 0 : b) * Nkp + c0;
    const T* bias = bias_block(s, p.bias, b, h);
    std::fill(dK, dK + cols * D, T(0));
    std::fill(dV, dV + cols * D, T(0));
    const int32_t count = p.col_count[hl * nkb + kb];
    const int32_t* idx = p.col_index + (hl * nkb + kb) * nqb;
    for (int32_t e = 0; e < count; ++e) {
      const int64_t r0 = int64_t(idx[e]) * bs;
      const int rows = int(std::min<int64_t>(bs, s.seq_q - r0));
      transpose_block(Qn + r0 * D, rows, D, Qt, bs);
      transpose_block(dOn + r0 * D, rows, D, dOt, bs);
      for (int i = 0; i < bs; ++i) {
        lse[i] = i < rows ? p.lse[bh * s.seq_q + r0 + i] : std::numeric_limits<T>::infinity();
        delta[i] = i < rows ? p.delta[bh * s.seq_q + r0 + i] : T(0);
      }
      gemm_nn<T, VL>(cols, bs, D, Kb, D, Qt, bs, St, bs, false);
      gemm_nn<T, VL>(cols, bs, D, Vb, D, dOt, bs, dPt, bs, false);
      for (int j = 0; j < cols; ++j) {
        const typename V::type mv = V::broadcast(mask[j]);
        T* sj = St + j * bs;
        for (int i = 0; i < bs; i += VL) V::store(sj + i, V::load(sj + i) * p.scale + mv);
      }
      if (bias != nullptr)
        for (int i = 0; i < rows; ++i) {
          const T* bias_row = bias + (r0 + i) * s.seq_k + c0;
          for (int j = 0; j < cols; ++j) St[j * bs + i] += bias_row[j];
        }
      for (int j = 0; j < cols; ++j) {
        T* sj = St + j * bs;
        T* dpj = dPt + j * bs;
        exp_sub_vec<T, VL>(sj, bs, lse);
        for (int i = 0; i < bs; i += VL) V::store(dpj + i, V::load(sj + i) * (V::load(dpj + i) - V::load(delta + i)));
      }
      gemm_nn<T, VL>(cols, D, rows, St, bs, dOn + r0 * D, D, dV, D, true);
      gemm_nn<T, VL>(cols, D, rows, dPt, bs, Qn + r0 * D, D, dK, D, true);
    }
    T* gk = p.grad_k + (bh * s.seq_k + c0) * D;
    T* gv = p.grad_v + (bh * s.seq_k + c0) * D;
    for (int i = 0; i < cols * D; ++i) {
      gk[i] = dK[i] * p.scale;
      gv[i] = dV[i];
    }
  }
}
