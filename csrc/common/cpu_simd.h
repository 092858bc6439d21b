// Portable SIMD building blocks for the CPU kernels, written with GCC/Clang vector extensions so that one
// source compiles to AVX-512, AVX2 or SSE/NEON code depending on the target the including translation unit
// selects (see cpu_isa.h). No torch headers, no intrinsics.
//
// This header must be included *inside* an ISA region (it defines everything in the enclosing namespace), so
// it has no include guard and includes nothing itself; the including file includes <cstdint>, <cstring> and
// <cmath> first.

template <typename T, int VL>
struct Vec {
  typedef T type __attribute__((vector_size(VL * sizeof(T))));
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type int_elem;
  typedef int_elem itype __attribute__((vector_size(VL * sizeof(T))));

  static inline type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(type));
    return v;
  }
  static inline void store(T* p, type v) { std::memcpy(p, &v, sizeof(type)); }
  // x - (+0) is exactly x for every x (x + 0 is not, for -0), so this folds to a bare broadcast.
  static inline type broadcast(T x) { return x - type{}; }
  // The vector ?: of GCC/Clang C++: compiles to vmaxps / blends, not to bit masking.
  static inline type max(type a, type b) { return a > b ? a : b; }
  // Lane-wise `mask ? a : b` with an all-ones / all-zeros integer mask, as produced by vector comparisons.
  static inline type select(itype mask, type a, type b) { return mask ? a : b; }
  static inline T reduce_max(type v) {
    T r = v[0];
    for (int i = 1; i < VL; ++i) r = v[i] > r ? v[i] : r;
    return r;
  }
  static inline T reduce_sum(type v) {
    T r = v[0];
    for (int i = 1; i < VL; ++i) r += v[i];
    return r;
  }
};

// exp(x) lane-wise: Cody-Waite range reduction and the Cephes degree-6 polynomial (about 1 ulp in fp32).
// The rounding of x * log2(e) to an integer uses the 1.5 * 2^23 "magic number": adding it leaves the
// rounded integer in the low mantissa bits, which also become the exponent of 2^n, with no conversions.
// Inputs below the underflow threshold (including -inf) give exactly 0, which the attention kernels rely on
// for masked logits; NaN gives NaN. Precondition: x <= 88.37 or NaN (no overflow clamp; the kernels only take
// exp of a logit minus a running maximum or the log-sum-exp).
template <int VL>
static inline typename Vec<float, VL>::type vexp(typename Vec<float, VL>::type x) {
  typedef Vec<float, VL> V;
  typedef typename V::type vf;
  typedef typename V::itype vi;
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const vi keep = ~(x < -87.3365478515625f);  // exp of that is the smallest normal float; true for NaN
  const vf y = x * 1.44269504088896341f + magic;
  const vf fx = y - magic;
  const vf r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  vf p = V::broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi yi;
  std::memcpy(&yi, &y, sizeof(vf));
  vi magic_bits;
  {
    const vf mv = V::broadcast(magic);
    std::memcpy(&magic_bits, &mv, sizeof(vf));
  }
  const vi e = (yi - magic_bits + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(vf));
  const vf res = p * scale;
  return V::select(keep, res, V::broadcast(0.0f));  // also discards what -inf made of the arithmetic above
}

// C[M x N] = (accumulate ? C : 0) + A[M x K] * B[K x N]. B and C are row-major (leading dimensions ldb, ldc;
// N a multiple of VL); A is read one broadcast element at a time, A(r, k) = A[r * a_row + k * a_k], so a
// transposed A costs nothing. The micro-tile keeps MR x NV vectors of C in registers and streams rows of B.
template <typename T, int VL, int MR, int NV>
static inline void gemm_tile(int K, const T* __restrict A, int64_t a_row, int64_t a_k, const T* __restrict B,
                             int64_t ldb, T* __restrict C, int64_t ldc, bool accumulate) {
  typedef Vec<T, VL> V;
  typename V::type acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) acc[r][c] = accumulate ? V::load(C + r * ldc + c * VL) : V::broadcast(T(0));
  for (int k = 0; k < K; ++k) {
    typename V::type b[NV];
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) b[c] = V::load(B + k * ldb + c * VL);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      typename V::type a = V::broadcast(A[r * a_row + k * a_k]);
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) V::store(C + r * ldc + c * VL, acc[r][c]);
}

template <typename T, int VL, int MR, int NV>
static inline void gemm_tile_rows(int rows, int K, const T* A, int64_t a_row, int64_t a_k, const T* B,
                                  int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if constexpr (MR > 0) {
    if (rows == MR) {
      gemm_tile<T, VL, MR, NV>(K, A, a_row, a_k, B, ldb, C, ldc, accumulate);
    } else {
      gemm_tile_rows<T, VL, MR - 1, NV>(rows, K, A, a_row, a_k, B, ldb, C, ldc, accumulate);
    }
  }
}

template <typename T, int VL, int MR, int NV>
static inline void gemm_column_panel(int M, int K, const T* A, int64_t a_row, int64_t a_k, const T* B, int64_t ldb,
                                     T* C, int64_t ldc, bool accumulate) {
  int i = 0;
  for (; i + MR <= M; i += MR)
    gemm_tile<T, VL, MR, NV>(K, A + i * a_row, a_row, a_k, B, ldb, C + i * ldc, ldc, accumulate);
  if (i < M)
    gemm_tile_rows<T, VL, MR - 1, NV>(M - i, K, A + i * a_row, a_row, a_k, B, ldb, C + i * ldc, ldc, accumulate);
}

// Register budget: MR * NV accumulators + NV rows of B + one broadcast must fit the vector register file
// (32 registers with AVX-512, 16 with AVX2/SSE). Row counts that divide the 16- to 128-row tiles evenly
// measured fastest: 4 rows for 4 vectors of C per row, 8 rows for 2 or 1 (AVX-512).
template <typename T, int VL>
struct GemmShape {
  static constexpr bool kWide = VL * int(sizeof(T)) >= 64;
  static constexpr int NV = kWide ? 4 : 2;
  static constexpr int rows(int nv) { return kWide && nv <= 2 ? 8 : 4; }
};

template <typename T, int VL>
static inline void gemm(int M, int N, int K, const T* A, int64_t a_row, int64_t a_k, const T* B, int64_t ldb, T* C,
                        int64_t ldc, bool accumulate) {
  typedef GemmShape<T, VL> G;
  constexpr int NV = G::NV;
  if (M <= 0) return;
  const int nvec = N / VL;
  int c = 0;
  for (; c + NV <= nvec; c += NV)
    gemm_column_panel<T, VL, G::rows(NV), NV>(M, K, A, a_row, a_k, B + c * VL, ldb, C + c * VL, ldc, accumulate);
  const int rest = nvec - c;
  B += c * VL;
  C += c * VL;
  if constexpr (NV > 1) {
    if (rest == 1) gemm_column_panel<T, VL, G::rows(1), 1>(M, K, A, a_row, a_k, B, ldb, C, ldc, accumulate);
  }
  if constexpr (NV > 3) {
    if (rest == 2) gemm_column_panel<T, VL, G::rows(2), 2>(M, K, A, a_row, a_k, B, ldb, C, ldc, accumulate);
    if (rest == 3) gemm_column_panel<T, VL, G::rows(3), 3>(M, K, A, a_row, a_k, B, ldb, C, ldc, accumulate);
  }
}
