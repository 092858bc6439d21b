// Device building blocks of the block-sparse attention kernels (block_sparse_attention_kernel.cu): tile
// traits, global -> shared tile loads, and two warp-level GEMMs that every kernel is written in. Plain CUDA, no
// torch headers.
//
// Every product is computed by one warp on a 16-row tile, into an fp32 accumulator held in the register layout
// of the `mma.sync.aligned.m16n8k16` C/D fragment (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
// point type"). With g = lane / 4 and t = lane % 4, a 16 x N tile is `float acc[N / 8][4]` and
//   acc[j][0] = C[g][8j + 2t]      acc[j][1] = C[g][8j + 2t + 1]
//   acc[j][2] = C[g + 8][8j + 2t]  acc[j][3] = C[g + 8][8j + 2t + 1]
// so a thread owns rows g and g + 8, and the four threads of a quad (same g) own a whole row between them.
// fp16/bf16 run on tensor cores; fp32 runs a SIMT path that computes the same accumulator layout with FMAs
// (tests need fp32 accuracy, which TF32 does not give). The kernels above the GEMMs are shared by all dtypes.
#pragma once

// The warp GEMMs below use mma.sync.m16n8k16 with f16/bf16 operands and ldmatrix: sm_80 or newer. A build for an
// older architecture stops here rather than producing kernels that fail at run time.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "af2_ext's block-sparse attention kernels need sm_80 or newer (mma.sync m16n8k16 bf16): set AF2_EXT_CUDA_ARCHS to 80 or above"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "block_sparse_attention/block_sparse_attention.h"
#include "common/cuda_utils.cuh"

namespace af2_ext {
namespace bsa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Compile-time shape of one kernel instantiation, from the host-visible tiling in block_sparse_attention.h
// (bsa_tiles), so that the shared memory the host computes is the shared memory the kernels use.
template <typename T, int kD, int kBlock>
struct Traits {
  static_assert(kD % 16 == 0 && kBlock % 16 == 0, "head dim and block size must be multiples of 16");
  static constexpr int kWarps = kBlock / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr bool kSimt = std::is_same<T, float>::value;
  static constexpr int kChunk = bsa_tiles::chunk(kSimt, kD, kBlock);
  static constexpr int kChunks = kBlock / kChunk;
  // Rows padded by 16 bytes: 16-byte aligned rows (uint4 stores, ldmatrix) whose successive rows start 4 banks
  // apart, so the fragment loads below are free of bank conflicts.
  static constexpr int kLd = bsa_tiles::ld(int(sizeof(T)), kD);
  // fp32 only: per-warp staging of a register tile (16 x kChunk) that is the A operand of gemm_rn.
  static constexpr int kScratchLd = bsa_tiles::scratch_ld(kSimt, kD, kBlock);
  static constexpr int kScratchFloats = bsa_tiles::scratch_floats(kSimt, kD, kBlock);
  static_assert(kBlock % kChunk == 0 && kChunk % 16 == 0, "chunks must tile the block in 16-row steps");
  static_assert(kLd == kD + 16 / int(sizeof(T)) && (kSimt || kScratchFloats == 0), "bsa_tiles and Traits agree");
};

// ---- global -> shared ----

// dst[r][0:kD] = src[r * src_ld + 0:kD] for r < valid whose key is kept (keep == nullptr or keep[r]), zero for
// the others and for valid <= r < total. Zero rows matter: a padded key's (or a row past the end's) probability is
// 0, and 0 * (a NaN or inf it holds, or uninitialised memory) would still be NaN. `vec`: src and src_ld allow
// 16-byte loads; otherwise element loads (a strided view with an odd offset, say).
template <typename T, int kD, int kThreads>
__device__ __forceinline__ void load_rows(T* __restrict__ dst, int ld, const T* __restrict__ src, int64_t src_ld,
                                          int valid, int total, bool vec, const bool* __restrict__ keep = nullptr) {
  constexpr int kVec = 16 / int(sizeof(T));
  constexpr int kPerRow = kD / kVec;
  for (int i = threadIdx.x; i < total * kPerRow; i += kThreads) {
    const int r = i / kPerRow, c = (i % kPerRow) * kVec;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid && (keep == nullptr || keep[r])) {
      const T* sp = src + r * src_ld + c;
      if (vec) {
        v = *reinterpret_cast<const uint4*>(sp);
      } else {
        T* vt = reinterpret_cast<T*>(&v);
#pragma unroll
        for (int e = 0; e < kVec; ++e) vt[e] = sp[e];
      }
    }
    *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
  }
}

__device__ __forceinline__ float load_bias(const void* bias, ScalarKind kind, int64_t i) {
  switch (kind) {
    case ScalarKind::kFloat16: return __half2float(static_cast<const __half*>(bias)[i]);
    case ScalarKind::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[i]);
    default: return static_cast<const float*>(bias)[i];
  }
}

// ---- tensor-core primitives (sm_80+) ----

__device__ __forceinline__ uint32_t lds32(const void* p) { return *static_cast<const uint32_t*>(p); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);  // lo in the low 16 bits (the lower k index)
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// D = A * B + D for one 16x8x16 tile, fp32 accumulate. Fragments (PTX ISA, mma.m16n8k16, .f16/.bf16):
//   A (16x16, row): a0 = A[g][2t..2t+1]   a1 = A[g+8][2t..2t+1]   a2 = A[g][2t+8..2t+9]   a3 = A[g+8][2t+8..2t+9]
//   B (16x8, col):  b0 = B[2t..2t+1][g]   b1 = B[2t+8..2t+9][g]
// each register holding the lower-indexed element in its low half; C/D as in the comment at the top.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices, transposed: lanes 8i..8i+7 give the row addresses of matrix i, and register r[i] of
// lane l receives M_i[2 (l % 4)][l / 4] (low half) and M_i[2 (l % 4) + 1][l / 4] (high half) (PTX ISA, ldmatrix
// with .trans). Row addresses must be 16-byte aligned.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// ---- warp GEMMs ----
//
// gemm_nt: acc (16 x N) += A · Bᵀ, A = 16 rows at `a` (row stride lda), B = N rows at `b` (row stride ldb), both
//          K wide in shared memory. (S = Q Kᵀ, dP = dO Vᵀ, and their transposes.)
// gemm_rn: acc (16 x N) += A · B, A = a 16 x K register tile in the accumulator layout (probabilities or dS),
//          B = K rows at `b`, N wide, in shared memory. (O += P V, dQ += dS K, dV += Pᵀ dO, dK += dSᵀ Q.)
//          `scratch` (fp32 only): this warp's 16 x (K + 4) floats.
template <typename T>
struct WarpGemm {
  template <int N, int K>
  __device__ static __forceinline__ void nt(float (&acc)[N / 8][4], const T* a, int lda, const T* b, int ldb) {
    static_assert(N % 8 == 0 && K % 16 == 0, "gemm_nt tile");
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
      const T* ar = a + g * lda + ks * 16 + 2 * t;
      const uint32_t af[4] = {lds32(ar), lds32(ar + 8 * lda), lds32(ar + 8), lds32(ar + 8 * lda + 8)};
#pragma unroll
      for (int j = 0; j < N / 8; ++j) {
        // B[k][n] = b[n][k]: the k pair (2t, 2t+1) of column n = g is contiguous in row n of `b`.
        const T* br = b + (8 * j + g) * ldb + ks * 16 + 2 * t;
        mma16816<T>(acc[j], af, lds32(br), lds32(br + 8));
      }
    }
  }

  template <int N, int K>
  __device__ static __forceinline__ void rn(float (&acc)[N / 8][4], const float (&a)[K / 8][4], const T* b, int ldb,
                                            float* /*scratch*/) {
    static_assert(N % 16 == 0 && K % 16 == 0, "gemm_rn tile");
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
      // The C fragments of columns 16ks..16ks+7 and 16ks+8..16ks+15 are exactly the A fragment of k-step ks.
      const uint32_t af[4] = {pack2<T>(a[2 * ks][0], a[2 * ks][1]), pack2<T>(a[2 * ks][2], a[2 * ks][3]),
                              pack2<T>(a[2 * ks + 1][0], a[2 * ks + 1][1]),
                              pack2<T>(a[2 * ks + 1][2], a[2 * ks + 1][3])};
#pragma unroll
      for (int j = 0; j < N / 16; ++j) {
        // Matrices 0..3 = rows k0..k0+7 / k0+8..k0+15 of columns n0..n0+7, then the same of n0+8..n0+15: r[0], r[1]
        // are b0, b1 of n-tile 2j and r[2], r[3] those of n-tile 2j + 1.
        uint32_t r[4];
        ldmatrix_x4_trans(r, b + (ks * 16 + (lane & 15)) * ldb + j * 16 + (lane >> 4) * 8);
        mma16816<T>(acc[2 * j], af, r[0], r[1]);
        mma16816<T>(acc[2 * j + 1], af, r[2], r[3]);
      }
    }
  }
};

// fp32: the same two products on CUDA cores. Each thread computes its own accumulator elements from rows g and
// g + 8 of A and the B rows/columns of its columns 2t, 2t + 1; one fmaf chain per element over k in order.
template <>
struct WarpGemm<float> {
  template <int N, int K>
  __device__ static __forceinline__ void nt(float (&acc)[N / 8][4], const float* a, int lda, const float* b,
                                            int ldb) {
    static_assert(N % 8 == 0 && K % 4 == 0, "gemm_nt tile");
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float* a_lo = a + g * lda;
    const float* a_hi = a_lo + 8 * lda;
#pragma unroll 2
    for (int k = 0; k < K; k += 4) {
      const float4 x0 = *reinterpret_cast<const float4*>(a_lo + k);
      const float4 x1 = *reinterpret_cast<const float4*>(a_hi + k);
#pragma unroll
      for (int j = 0; j < N / 8; ++j) {
        const float4 y0 = *reinterpret_cast<const float4*>(b + (8 * j + 2 * t) * ldb + k);
        const float4 y1 = *reinterpret_cast<const float4*>(b + (8 * j + 2 * t + 1) * ldb + k);
        acc[j][0] = dot4(x0, y0, acc[j][0]);
        acc[j][1] = dot4(x0, y1, acc[j][1]);
        acc[j][2] = dot4(x1, y0, acc[j][2]);
        acc[j][3] = dot4(x1, y1, acc[j][3]);
      }
    }
  }

  template <int N, int K>
  __device__ static __forceinline__ void rn(float (&acc)[N / 8][4], const float (&a)[K / 8][4], const float* b,
                                            int ldb, float* scratch) {
    static_assert(N % 8 == 0 && K % 8 == 0, "gemm_rn tile");
    constexpr int kLd = K + 4;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    __syncwarp();  // the previous product's reads of the scratch are done
#pragma unroll
    for (int j = 0; j < K / 8; ++j) {
      *reinterpret_cast<float2*>(scratch + g * kLd + 8 * j + 2 * t) = make_float2(a[j][0], a[j][1]);
      *reinterpret_cast<float2*>(scratch + (g + 8) * kLd + 8 * j + 2 * t) = make_float2(a[j][2], a[j][3]);
    }
    __syncwarp();
    const float* a_lo = scratch + g * kLd;
    const float* a_hi = a_lo + 8 * kLd;
#pragma unroll 2
    for (int k = 0; k < K; k += 4) {
      const float4 x0 = *reinterpret_cast<const float4*>(a_lo + k);
      const float4 x1 = *reinterpret_cast<const float4*>(a_hi + k);
      const float xs0[4] = {x0.x, x0.y, x0.z, x0.w};
      const float xs1[4] = {x1.x, x1.y, x1.z, x1.w};
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
        for (int j = 0; j < N / 8; ++j) {
          const float2 y = *reinterpret_cast<const float2*>(b + (k + kk) * ldb + 8 * j + 2 * t);
          acc[j][0] = fmaf(xs0[kk], y.x, acc[j][0]);
          acc[j][1] = fmaf(xs0[kk], y.y, acc[j][1]);
          acc[j][2] = fmaf(xs1[kk], y.x, acc[j][2]);
          acc[j][3] = fmaf(xs1[kk], y.y, acc[j][3]);
        }
      }
    }
  }

 private:
  __device__ static __forceinline__ float dot4(const float4& x, const float4& y, float acc) {
    acc = fmaf(x.x, y.x, acc);
    acc = fmaf(x.y, y.y, acc);
    acc = fmaf(x.z, y.z, acc);
    return fmaf(x.w, y.w, acc);
  }
};

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

}  // namespace bsa
}  // namespace af2_ext
