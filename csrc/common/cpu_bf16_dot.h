// bf16 dot-product GEMM on AVX512-BF16 (vdpbf16ps), for the bf16 CPU kernels. Included inside an avx512_bf16
// region (a namespace compiled with target avx512bf16), after <immintrin.h>, <cstring> and <cstdint>; no include
// guard, includes nothing itself.
//
// vdpbf16ps multiplies pairs: lane n of the result accumulates a.lo * b.lo + a.hi * b.hi in fp32, where a and b
// hold two bf16 per 32-bit lane, so every operand is laid out in pairs along the product's reduction dimension.

static inline uint32_t load_u32(const void* p) {
  uint32_t x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

// C[M x N] = (accumulate ? C : 0) + sum over KP pairs of A(r, kp) . B[kp][n], A(r, kp) = A[r * a_row + kp * a_k]
// (32-bit pairs, broadcast), B rows of N pairs (ldb apart), C fp32 (ldc apart), N a multiple of 16.
template <int MR, int NV>
static inline void dot_tile(int KP, const uint32_t* __restrict A, int64_t a_row, int64_t a_k,
                            const uint32_t* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc,
                            bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) acc[r][c] = accumulate ? _mm512_loadu_ps(C + r * ldc + c * 16) : _mm512_setzero_ps();
  for (int kp = 0; kp < KP; ++kp) {
    __m512bh b[NV];
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) b[c] = (__m512bh)_mm512_loadu_si512(B + kp * ldb + c * 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int(load_u32(A + r * a_row + kp * a_k)));
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(C + r * ldc + c * 16, acc[r][c]);
}

template <int MR, int NV>
static inline void dot_tile_rows(int rows, int KP, const uint32_t* A, int64_t a_row, int64_t a_k, const uint32_t* B,
                                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if constexpr (MR > 0) {
    if (rows == MR) {
      dot_tile<MR, NV>(KP, A, a_row, a_k, B, ldb, C, ldc, accumulate);
    } else {
      dot_tile_rows<MR - 1, NV>(rows, KP, A, a_row, a_k, B, ldb, C, ldc, accumulate);
    }
  }
}

template <int MR, int NV>
static inline void dot_column_panel(int M, int KP, const uint32_t* A, int64_t a_row, int64_t a_k, const uint32_t* B,
                                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int i = 0;
  for (; i + MR <= M; i += MR)
    dot_tile<MR, NV>(KP, A + i * a_row, a_row, a_k, B, ldb, C + i * ldc, ldc, accumulate);
  if (i < M) dot_tile_rows<MR - 1, NV>(M - i, KP, A + i * a_row, a_row, a_k, B, ldb, C + i * ldc, ldc, accumulate);
}

// The bf16 counterpart of cpu_simd.h's gemm: panels of 4 vectors of C per row, 4 rows per tile (the fp32 kernel's
// measured best shape); 1 to 3 vectors for the remainder, 8 rows for 1 or 2.
static inline void dot_gemm(int M, int N, int KP, const uint32_t* A, int64_t a_row, int64_t a_k, const uint32_t* B,
                            int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0) return;
  const int nvec = N / 16;
  int c = 0;
  for (; c + 4 <= nvec; c += 4)
    dot_column_panel<4, 4>(M, KP, A, a_row, a_k, B + c * 16, ldb, C + c * 16, ldc, accumulate);
  B += c * 16;
  C += c * 16;
  switch (nvec - c) {
    case 1: dot_column_panel<8, 1>(M, KP, A, a_row, a_k, B, ldb, C, ldc, accumulate); break;
    case 2: dot_column_panel<8, 2>(M, KP, A, a_row, a_k, B, ldb, C, ldc, accumulate); break;
    case 3: dot_column_panel<4, 3>(M, KP, A, a_row, a_k, B, ldb, C, ldc, accumulate); break;
    default: break;
  }
}

// The zero-masked form: GCC 12's unmasked one starts from _mm512_undefined_epi32, which -Wall flags.
static inline __m512i widen_u16(__m256i x) { return _mm512_maskz_cvtepu16_epi32(__mmask16(0xFFFF), x); }

// 32-bit lanes: lo's low halves | hi's low halves shifted into the high halves.
static inline __m512i pair_halves(__m512i lo, __m512i hi) {
  return _mm512_or_si512(lo, _mm512_maskz_slli_epi32(__mmask16(0xFFFF), hi, 16));
}

// dst[dp * bs + i] = (x[i, 2 dp], x[i, 2 dp + 1]) for i < rows, zero up to bs: a row block, transposed in D-pairs.
static inline void stage_d_pairs(const uint16_t* x, int64_t ld, int rows, int DP, int bs, uint32_t* dst) {
  for (int dp = 0; dp < DP; ++dp) {
    for (int i = 0; i < rows; ++i) dst[dp * bs + i] = load_u32(x + i * ld + 2 * dp);
    std::fill(dst + dp * bs + rows, dst + (dp + 1) * bs, 0u);
  }
}
