// Key/value compression on the CPU: the ISA-generic kernel bodies. Included once per instruction set by
// compressed_attention_cpu_kernel.cpp (common/cpu_isa_regions.h), after common/cpu_simd.h; no include guard,
// includes nothing itself.
//
// With tap t of the convolution, the input rows j*ratio + t (j < rows(t)) form a strided matrix K_t, and
//   kc        = bias + sum_t K_t * W_t            (W_t = weight_in_out[h][t], D x D)
//   grad K_t  = grad_kc[:rows(t)] * W_tᵀ           (each input row belongs to exactly one tap)
//   grad W_tᵀ = sum_b grad_kc[:rows(t)]ᵀ * K_t     (+ the same for v)
// all three are the register-tiled `gemm` of cpu_simd.h, which reads its broadcast operand at any stride.
//
// The zero padding past Nk is never read, but its products are not dropped: 0 * W_t (forward) and grad_kc * 0 (grad of
// W_t) are 0 unless the other factor is NaN or inf, and then NaN, as the zero-padded convolution of the reference
// (conv1d) and the CUDA kernels give.

template <typename T>
struct CompressLanes {
  static constexpr int value = kFloatLanes * 4 / int(sizeof(T));
};

// Number of compressed rows that tap t reads from a real (not padded) input row.
static inline int64_t tap_rows(const KvCompressShape& s, int64_t t) {
  return t < s.seq_k ? (s.seq_k - t + s.ratio - 1) / s.ratio : 0;
}

template <typename T>
static inline const T* kv_input(const KvCompressCpuParams<T>& p, int which, int64_t b, int64_t h) {
  const int64_t* st = which == 0 ? p.k_stride : p.v_stride;
  return (which == 0 ? p.k : p.v) + b * st[0] + h * st[1];
}

template <typename T>
static inline int64_t kv_row_stride(const KvCompressCpuParams<T>& p, int which) {
  return which == 0 ? p.k_stride[2] : p.v_stride[2];
}

template <typename T>
void kv_compress_forward_impl(const KvCompressCpuParams<T>& p, int64_t begin, int64_t end) {
  constexpr int VL = CompressLanes<T>::value;
  const KvCompressShape& s = p.s;
  const int64_t BH = s.batch * s.heads, D = s.head_dim, r = s.ratio, Nc = s.seq_c;
  for (int64_t task = begin; task < end; ++task) {
    const int which = int(task / BH);
    const int64_t bh = task % BH, b = bh / s.heads, h = bh % s.heads;
    const T* x = kv_input(p, which, b, h);
    const int64_t row = kv_row_stride(p, which);
    T* out = (which == 0 ? p.kc : p.vc) + bh * Nc * D;
    for (int64_t j = 0; j < Nc; ++j)
      for (int64_t e = 0; e < D; ++e) out[j * D + e] = p.bias != nullptr ? p.bias[h * D + e] : T(0);
    for (int64_t t = 0; t < r; ++t) {
      const int64_t rows = tap_rows(s, t);
      const T* w = p.weight_in_out + (h * r + t) * D * D;  // [d][e]
      gemm<T, VL>(int(rows), int(D), int(D), x + t * row, r * row, 1, w, D, out, D, /*accumulate=*/true);
      if (rows < Nc) add_padding_products(out, w, rows, Nc, D);
    }
  }
}

template <typename T>
void kv_compress_backward_input_impl(const KvCompressCpuParams<T>& p, int64_t begin, int64_t end) {
  constexpr int VL = CompressLanes<T>::value;
  const KvCompressShape& s = p.s;
  const int64_t BH = s.batch * s.heads, D = s.head_dim, r = s.ratio, Nc = s.seq_c;
  for (int64_t task = begin; task < end; ++task) {
    const int which = int(task / BH);
    const int64_t bh = task % BH, h = bh % s.heads;
    T* grad_x = which == 0 ? p.grad_k : p.grad_v;
    if (grad_x == nullptr) continue;
    grad_x += bh * s.seq_k * D;
    const T* grad_c = (which == 0 ? p.grad_kc : p.grad_vc) + bh * Nc * D;
    for (int64_t t = 0; t < r; ++t)
      gemm<T, VL>(int(tap_rows(s, t)), int(D), int(D), grad_c, D, 1, p.weight_out_in + (h * r + t) * D * D, D,
                  grad_x + t * D, r * D, /*accumulate=*/false);
  }
}

template <typename T>
void kv_compress_backward_weight_impl(const KvCompressCpuParams<T>& p, int64_t begin, int64_t end) {
  constexpr int VL = CompressLanes<T>::value;
  const KvCompressShape& s = p.s;
  const int64_t D = s.head_dim, r = s.ratio, Nc = s.seq_c;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = task / r, t = task % r;
    if (p.grad_weight_out_in != nullptr) {
      T* gw = p.grad_weight_out_in + (h * r + t) * D * D;  // [e][d]
      std::fill(gw, gw + D * D, T(0));
      const int64_t rows = tap_rows(s, t);
      for (int which = 0; which < 2; ++which)
        for (int64_t b = 0; b < s.batch; ++b) {
          const T* grad_c = (which == 0 ? p.grad_kc : p.grad_vc) + (b * s.heads + h) * Nc * D;
          const int64_t row = kv_row_stride(p, which);
          // gw[e][d] += sum_j grad_c[j][e] * x[j*r + t][d]: A = grad_cᵀ read transposed, B = the tap's rows.
          gemm<T, VL>(int(D), int(D), int(rows), grad_c, 1, D, kv_input(p, which, b, h) + t * row, r * row, gw, D,
                      /*accumulate=*/true);
          for (int64_t j = rows; j < Nc; ++j)  // the rows whose tap t is padding: + grad_c * 0
            for (int64_t e = 0; e < D; ++e) {
              const T zero_times_g = grad_c[j * D + e] * T(0);
              if (zero_times_g != zero_times_g)
                for (int64_t d = 0; d < D; ++d) gw[e * D + d] += zero_times_g;
            }
        }
    }
    if (t == 0 && p.grad_bias != nullptr) {
      T* gb = p.grad_bias + h * D;
      std::fill(gb, gb + D, T(0));
      for (int which = 0; which < 2; ++which)
        for (int64_t b = 0; b < s.batch; ++b) {
          const T* grad_c = (which == 0 ? p.grad_kc : p.grad_vc) + (b * s.heads + h) * Nc * D;
          for (int64_t j = 0; j < Nc; ++j)
            for (int64_t e = 0; e < D; ++e) gb[e] += grad_c[j * D + e];
        }
    }
  }
}
