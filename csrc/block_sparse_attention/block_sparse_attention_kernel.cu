// Block-sparse flash attention on CUDA: forward and backward kernels and their launchers. No torch headers; the
// torch binding is block_sparse_attention_cuda.cpp and cuda_tests/test_block_sparse_attention.cu calls the
// launchers directly. Same algorithm and semantics as the CPU kernels (block_sparse_attention_cpu_kernel.h):
//
//   forward      one CTA per (query block, head, batch) walks row_index with an online softmax; out and
//                lse = logsumexp (natural log, fp32; +inf and out = 0 for a query with no visible key).
//   backward     delta = rowsum(grad_out * out); then a column pass, one CTA per (key block, head, batch) walking
//                col_index, writes dK and dV once; then a row pass, one CTA per (query block, head, batch) walking
//                row_index, writes dQ. With a bias gradient a row-pass CTA owns a query block of one range of the
//                (batch row, head) members that share a bias block and sums their dS into that range's copy of
//                grad_bias in a fixed order; a last pass adds the copies in range order (one range: no copy).
//                No atomics anywhere: every output element has one owning thread, so the results (grad_bias
//                included) are deterministic, and the ranges depend on the shape only.
//
// Grids: the (block, head, batch) work items are flattened into grid.x (at most 2^31 - 1 per launch, more in
// several launches with an offset), so batch x heads is not bound by the 65,535 of grid.y / grid.z — the model
// folds b * n rows into the batch.
//
// Logits are kept in log2 units (scale * log2(e) folded in) so that every exponential is one exp2f. A logit of a
// masked key (layout, key padding, past the end of the sequence) is -inf; a row whose maximum is still -inf
// subtracts 0 instead, so exp2f never sees (-inf) - (-inf).
//
// Non-finite values (the contract of af2_ext/reference.py's block_sparse_attention_ref): a masked pair is absent.
// Its logit is -inf by a select (whatever q, k or the bias hold), its P and dS are 0 by a select (never exp2f(-inf -
// NaN) or 0 * NaN), padded keys' rows of K and V are zero in shared memory (a product with a zero probability must
// not meet a NaN there) and their own gradients are written as zero. A NaN logit poisons its row: the running max
// propagates NaN (warp_reduce_max_nan), and a row counts as empty only when its max is still -inf (never from
// `sum > 0`: NaN > 0 is false). Gradients of a scaled product keep an exact zero zero (scaled_grad), so that an
// infinite scale does not turn the zero gradient of an empty row into NaN.
//
// Dispatch: dtype x head dim x block size are template parameters (48 combinations per kernel); the bias, its
// dtype and the key padding mask are uniform run-time branches, which keeps the instantiation count (and the
// build) at a third of what compile-time flags would cost.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#include "block_sparse_attention/block_sparse_attention.h"
#include "block_sparse_attention/block_sparse_attention_kernel.cuh"
#include "common/cuda_utils.cuh"
#include "common/static_switch.cuh"

namespace af2_ext {
namespace bsa {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();

// Bits of the kernels' `vec` argument: the tensor allows 16-byte loads of its rows.
enum VecBits : int { kVecQ = 1, kVecK = 2, kVecV = 4, kVecGradOut = 8 };

template <typename T>
__device__ __forceinline__ const T* bh_ptr(const void* base, const int64_t (&stride)[3], int64_t b, int64_t h) {
  return static_cast<const T*>(base) + b * stride[0] + h * stride[1];
}

// g * scale, keeping an exact zero zero whatever the scale (0 * inf is NaN).
__device__ __forceinline__ float scaled_grad(float g, float scale) { return g == 0.f ? 0.f : g * scale; }

// Bias rows of (batch b, head h): element (query i, key j) at [i * Nk + j]; nullptr without a bias.
__device__ __forceinline__ int64_t bias_offset(const BlockSparseShape& s, int64_t b, int64_t h) {
  const int64_t bb = b / (s.batch / s.bias_batch);
  const int64_t hb = s.bias_heads == 1 ? 0 : h;
  return (bb * s.bias_heads + hb) * s.seq_q * s.seq_k;
}

// Score tile of 16 queries (rows q_lo, q_lo + 8 of this thread) x kNT * 8 keys starting at key0, `cols` of which
// exist: scale, bias and masks, in log2 units.
template <int kNT>
__device__ __forceinline__ void query_row_logits(float (&sc)[kNT][4], const BlockSparseCudaParams& p,
                                                 const bool* mask, int64_t bias_off, int64_t q_lo, int64_t key0,
                                                 int cols) {
  const int t = threadIdx.x & 3;
  const float scale2 = p.scale * kLog2e;
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = 8 * j + 2 * t + c;
      const int64_t key = key0 + col;
      const bool visible = col < cols && (mask == nullptr || mask[key]);
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int64_t q = q_lo + 8 * rr;
        float x = sc[j][2 * rr + c] * scale2;
        if (visible && p.bias != nullptr && q < p.s.seq_q)
          x = fmaf(load_bias(p.bias, p.bias_dtype, bias_off + q * p.s.seq_k + key), kLog2e, x);
        sc[j][2 * rr + c] = visible ? x : -kInf;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------

// Dynamic shared memory of each kernel: the host-side formulas of block_sparse_attention.h, which the pointer
// carving at the top of each kernel follows.
template <typename T, int kD, int kBlock>
size_t forward_smem_bytes() {
  return size_t(bsa_tiles::forward_smem(int(sizeof(T)), Traits<T, kD, kBlock>::kSimt, kD, kBlock));
}

template <typename T, int kD, int kBlock>
__global__ void __launch_bounds__(Traits<T, kD, kBlock>::kThreads, 1)
    forward_kernel(const __grid_constant__ BlockSparseCudaParams p, const int vec, const int64_t first_block) {
  using Tr = Traits<T, kD, kBlock>;
  using Gemm = WarpGemm<T>;
  constexpr int kChunk = Tr::kChunk, kLd = Tr::kLd, kNT = kChunk / 8, kDT = kD / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // kBlock x kD: the query block
  T* sK = sQ + kBlock * kLd;           // kChunk x kD
  T* sV = sK + kChunk * kLd;           // kChunk x kD
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float* scratch = reinterpret_cast<float*>(sV + kChunk * kLd) + warp * 16 * Tr::kScratchLd;

  const BlockSparseShape& s = p.s;
  const int64_t work = first_block + blockIdx.x, bh_work = work / s.num_q_blocks;
  const int64_t qb = work % s.num_q_blocks, h = bh_work % s.heads, b = bh_work / s.heads;
  const int64_t r0 = qb * kBlock;
  const int rows = int(min(int64_t(kBlock), s.seq_q - r0));
  const int64_t hl = s.layout_heads == 1 ? 0 : h;
  const int count = min(max(p.row_count[hl * s.num_q_blocks + qb], 0), int(s.num_k_blocks));
  const int32_t* idx = p.row_index + (hl * s.num_q_blocks + qb) * s.num_k_blocks;
  const T* kg = bh_ptr<T>(p.k, p.k_stride, b, h);
  const T* vg = bh_ptr<T>(p.v, p.v_stride, b, h);
  const bool* mask = p.key_padding_mask != nullptr ? p.key_padding_mask + b * s.seq_k : nullptr;
  const int64_t bias_off = p.bias != nullptr ? bias_offset(s, b, h) : 0;

  load_rows<T, kD, Tr::kThreads>(sQ, kLd, bh_ptr<T>(p.q, p.q_stride, b, h) + r0 * p.q_stride[2], p.q_stride[2], rows,
                                 kBlock, vec & kVecQ);
  const T* sQw = sQ + warp * 16 * kLd;
  const int64_t q_lo = r0 + warp * 16 + g;  // this thread's rows: q_lo and q_lo + 8

  float m[2] = {-kInf, -kInf};  // running max (log2 units) of rows q_lo, q_lo + 8
  float l[2] = {0.f, 0.f};      // this thread's part of the running sum
  float o[kDT][4];
  zero(o);
  for (int e = 0; e < count; ++e) {
    const int64_t kb = idx[e];
    if (kb < 0 || kb >= s.num_k_blocks) continue;  // (uniform) a corrupt index is skipped, never read through
    for (int ch = 0; ch < Tr::kChunks; ++ch) {
      const int64_t key0 = kb * kBlock + ch * kChunk;
      if (key0 >= s.seq_k) break;
      const int cols = int(min(int64_t(kChunk), s.seq_k - key0));
      __syncthreads();  // every warp is done with the previous chunk (and sQ is written, on the first one)
      const bool* keep = mask != nullptr ? mask + key0 : nullptr;
      load_rows<T, kD, Tr::kThreads>(sK, kLd, kg + key0 * p.k_stride[2], p.k_stride[2], cols, kChunk, vec & kVecK,
                                     keep);
      load_rows<T, kD, Tr::kThreads>(sV, kLd, vg + key0 * p.v_stride[2], p.v_stride[2], cols, kChunk, vec & kVecV,
                                     keep);
      __syncthreads();

      float sc[kNT][4];
      zero(sc);
      Gemm::template nt<kChunk, kD>(sc, sQw, kLd, sK, kLd);
      query_row_logits<kNT>(sc, p, mask, bias_off, q_lo, key0, cols);
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        float mx = -kInf;
#pragma unroll
        for (int j = 0; j < kNT; ++j) mx = fmax_nan(mx, fmax_nan(sc[j][2 * rr], sc[j][2 * rr + 1]));
        mx = warp_reduce_max_nan<4>(mx);  // the quad holds the whole row
        const float m_new = fmax_nan(m[rr], mx);
        const float m_use = m_new == -kInf ? 0.f : m_new;  // nothing visible yet: probabilities stay exactly 0
        // m[rr] = -inf gives 0 for a finite m_use; a NaN max makes alpha and every probability of the row NaN.
        const float alpha = exp2f(m[rr] - m_use);
        m[rr] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          sc[j][2 * rr] = exp2f(sc[j][2 * rr] - m_use);
          sc[j][2 * rr + 1] = exp2f(sc[j][2 * rr + 1] - m_use);
          sum += sc[j][2 * rr] + sc[j][2 * rr + 1];
        }
        l[rr] = l[rr] * alpha + sum;
#pragma unroll
        for (int d = 0; d < kDT; ++d) {
          o[d][2 * rr] *= alpha;
          o[d][2 * rr + 1] *= alpha;
        }
      }
      Gemm::template rn<kD, kChunk>(o, sc, sV, kLd, scratch);  // o += P V
    }
  }

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float sum = warp_reduce_sum<4>(l[rr]);
    const int64_t q = q_lo + 8 * rr;
    if (q >= s.seq_q) continue;
    // Empty when the max is still -inf (m is the same in the four threads of the quad); a NaN row has sum = NaN.
    const bool seen = m[rr] != -kInf;
    const float inv = seen ? 1.f / sum : 0.f;
    T* orow = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + q * p.out_stride[2];
#pragma unroll
    for (int d = 0; d < kDT; ++d) {
      orow[8 * d + 2 * t] = from_float<T>(seen ? o[d][2 * rr] * inv : 0.f);
      orow[8 * d + 2 * t + 1] = from_float<T>(seen ? o[d][2 * rr + 1] * inv : 0.f);
    }
    if (t == 0) p.lse[(b * s.heads + h) * s.seq_q + q] = seen ? (m[rr] + log2f(sum)) * kLn2 : kInf;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: delta = rowsum(grad_out * out), 8 lanes per query row
// ---------------------------------------------------------------------------------------------------------------

constexpr int kDeltaThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDeltaThreads)
    delta_kernel(const __grid_constant__ BlockSparseCudaParams p, const int64_t first_block) {
  const BlockSparseShape& s = p.s;
  const int64_t num_rows = s.batch * s.heads * s.seq_q;
  const int64_t row = (first_block + blockIdx.x) * (kDeltaThreads / 8) + threadIdx.x / 8;
  const int sub = threadIdx.x & 7;
  float sum = 0.f;
  if (row < num_rows) {
    const int64_t i = row % s.seq_q, bh = row / s.seq_q, h = bh % s.heads, b = bh / s.heads;
    const T* go = bh_ptr<T>(p.grad_out, p.grad_out_stride, b, h) + i * p.grad_out_stride[2];
    const T* o = bh_ptr<T>(p.out, p.out_stride, b, h) + i * p.out_stride[2];
    for (int64_t d = sub; d < s.head_dim; d += 8) sum = fmaf(to_float(go[d]), to_float(o[d]), sum);
  }
  sum = warp_reduce_sum<8>(sum);  // every lane reaches it: no early return above
  if (row < num_rows && sub == 0) p.delta[row] = sum;
}

// ---------------------------------------------------------------------------------------------------------------
// Backward, column pass: dK, dV of one key block
// ---------------------------------------------------------------------------------------------------------------

template <typename T, int kD, int kBlock>
size_t backward_cols_smem_bytes() {
  return size_t(bsa_tiles::backward_cols_smem(int(sizeof(T)), Traits<T, kD, kBlock>::kSimt, kD, kBlock));
}

template <typename T, int kD, int kBlock>
__global__ void __launch_bounds__(Traits<T, kD, kBlock>::kThreads, 1)
    backward_cols_kernel(const __grid_constant__ BlockSparseCudaParams p, const int vec, const int64_t first_block) {
  using Tr = Traits<T, kD, kBlock>;
  using Gemm = WarpGemm<T>;
  constexpr int kChunk = Tr::kChunk, kLd = Tr::kLd, kNT = kChunk / 8, kDT = kD / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);  // kBlock x kD: the key block
  T* sV = sK + kBlock * kLd;           // kBlock x kD
  T* sQ = sV + kBlock * kLd;           // kChunk x kD: a chunk of a query block
  T* sdO = sQ + kChunk * kLd;          // kChunk x kD
  float* sLse = reinterpret_cast<float*>(sdO + kChunk * kLd);  // kChunk, log2 units; +inf past the end
  float* sDelta = sLse + kChunk;                               // kChunk; 0 past the end
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float* scratch = sDelta + kChunk + warp * 16 * Tr::kScratchLd;

  const BlockSparseShape& s = p.s;
  const int64_t work = first_block + blockIdx.x, bh_work = work / s.num_k_blocks;
  const int64_t kb = work % s.num_k_blocks, h = bh_work % s.heads, b = bh_work / s.heads;
  const int64_t c0 = kb * kBlock;
  const int cols = int(min(int64_t(kBlock), s.seq_k - c0));
  const int64_t hl = s.layout_heads == 1 ? 0 : h;
  const int count = min(max(p.col_count[hl * s.num_k_blocks + kb], 0), int(s.num_q_blocks));
  const int32_t* idx = p.col_index + (hl * s.num_k_blocks + kb) * s.num_q_blocks;
  const int64_t bh = b * s.heads + h;
  const T* qg = bh_ptr<T>(p.q, p.q_stride, b, h);
  const T* dog = bh_ptr<T>(p.grad_out, p.grad_out_stride, b, h);
  const int64_t bias_off = p.bias != nullptr ? bias_offset(s, b, h) : 0;
  const float scale2 = p.scale * kLog2e;

  const bool* keep = p.key_padding_mask != nullptr ? p.key_padding_mask + b * s.seq_k + c0 : nullptr;
  load_rows<T, kD, Tr::kThreads>(sK, kLd, bh_ptr<T>(p.k, p.k_stride, b, h) + c0 * p.k_stride[2], p.k_stride[2], cols,
                                 kBlock, vec & kVecK, keep);
  load_rows<T, kD, Tr::kThreads>(sV, kLd, bh_ptr<T>(p.v, p.v_stride, b, h) + c0 * p.v_stride[2], p.v_stride[2], cols,
                                 kBlock, vec & kVecV, keep);
  const T* sKw = sK + warp * 16 * kLd;
  const T* sVw = sV + warp * 16 * kLd;
  // This thread's keys (rows of the transposed score tile): block-local rows warp*16 + g and + 8.
  int64_t key[2];
  bool key_visible[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int local = warp * 16 + g + 8 * rr;
    key[rr] = c0 + local;
    key_visible[rr] = local < cols && (p.key_padding_mask == nullptr || p.key_padding_mask[b * s.seq_k + key[rr]]);
  }

  float dk[kDT][4], dv[kDT][4];
  zero(dk);
  zero(dv);
  for (int e = 0; e < count; ++e) {
    const int64_t qb = idx[e];
    if (qb < 0 || qb >= s.num_q_blocks) continue;
    for (int ch = 0; ch < Tr::kChunks; ++ch) {
      const int64_t q0 = qb * kBlock + ch * kChunk;
      if (q0 >= s.seq_q) break;
      const int nrows = int(min(int64_t(kChunk), s.seq_q - q0));
      __syncthreads();
      load_rows<T, kD, Tr::kThreads>(sQ, kLd, qg + q0 * p.q_stride[2], p.q_stride[2], nrows, kChunk, vec & kVecQ);
      load_rows<T, kD, Tr::kThreads>(sdO, kLd, dog + q0 * p.grad_out_stride[2], p.grad_out_stride[2], nrows, kChunk,
                                     vec & kVecGradOut);
      if (threadIdx.x < kChunk) {  // kThreads = 2 * kBlock >= kChunk
        const int i = threadIdx.x;
        sLse[i] = i < nrows ? p.lse[bh * s.seq_q + q0 + i] * kLog2e : kInf;
        sDelta[i] = i < nrows ? p.delta[bh * s.seq_q + q0 + i] : 0.f;
      }
      __syncthreads();

      float pt[kNT][4];  // Pᵀ: keys x queries
      zero(pt);
      Gemm::template nt<kChunk, kD>(pt, sKw, kLd, sQ, kLd);
      float dst[kNT][4];  // dPᵀ, then dSᵀ
      zero(dst);
      Gemm::template nt<kChunk, kD>(dst, sVw, kLd, sdO, kLd);
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = 8 * j + 2 * t + c;
          const int64_t q = q0 + col;
          const float lse = sLse[col], delta = sDelta[col];
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            const int r = 2 * rr + c;
            const bool visible = key_visible[rr] && col < nrows;
            float x = pt[j][r] * scale2;
            if (visible && p.bias != nullptr)
              x = fmaf(load_bias(p.bias, p.bias_dtype, bias_off + q * s.seq_k + key[rr]), kLog2e, x);
            // Selects, not products: x = -inf (a -inf bias) with lse = NaN (a NaN row) gives exp2f(NaN), and
            // dst (dP) is NaN where a masked pair's v is. lse = +inf (a query with no visible key) gives 0.
            const bool live = visible && x != -kInf;
            const float prob = live ? exp2f(x - lse) : 0.f;
            pt[j][r] = prob;
            dst[j][r] = live ? prob * (dst[j][r] - delta) : 0.f;
          }
        }
      }
      Gemm::template rn<kD, kChunk>(dv, pt, sdO, kLd, scratch);  // dV += Pᵀ dO
      Gemm::template rn<kD, kChunk>(dk, dst, sQ, kLd, scratch);  // dK += dSᵀ Q
    }
  }

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    if (key[rr] >= s.seq_k) continue;
    T* gk = static_cast<T*>(p.grad_k) + (bh * s.seq_k + key[rr]) * s.head_dim;
    T* gv = static_cast<T*>(p.grad_v) + (bh * s.seq_k + key[rr]) * s.head_dim;
    // A padded key's gradients are zero (its P and dS are, but 0 times a NaN q or grad_out row would not be).
    const bool kept = key_visible[rr];
#pragma unroll
    for (int d = 0; d < kDT; ++d) {
      gk[8 * d + 2 * t] = from_float<T>(kept ? scaled_grad(dk[d][2 * rr], p.scale) : 0.f);
      gk[8 * d + 2 * t + 1] = from_float<T>(kept ? scaled_grad(dk[d][2 * rr + 1], p.scale) : 0.f);
      gv[8 * d + 2 * t] = from_float<T>(kept ? dv[d][2 * rr] : 0.f);
      gv[8 * d + 2 * t + 1] = from_float<T>(kept ? dv[d][2 * rr + 1] : 0.f);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward, row pass: dQ and the bias gradient of one query block
// ---------------------------------------------------------------------------------------------------------------

template <typename T, int kD, int kBlock>
size_t backward_rows_smem_bytes() {
  return size_t(bsa_tiles::backward_rows_smem(int(sizeof(T)), Traits<T, kD, kBlock>::kSimt, kD, kBlock));
}

// Work item (query block, split, head group, batch group), flattened in that order (query block fastest). With
// grad_bias a group is a bias block (bb, hb) whose members are the (b, h) with b in [bb * B / Bb, (bb + 1) * B /
// Bb) and h over all heads (Hb = 1) or h = hb, numbered b-major; split `sp` of `splits` owns members
// [sp * n / splits, (sp + 1) * n / splits) and adds each one's dS, in member order, into its copy of grad_bias
// (grad_bias itself when splits = 1, else workspace + sp * |bias|). Each element of the CTA's rows is owned by one
// thread (the one holding that score position), so the sum is a plain read-modify-write in a fixed order.
// Without grad_bias a group is one (b, h) and splits = 1.
template <typename T, int kD, int kBlock>
__global__ void __launch_bounds__(Traits<T, kD, kBlock>::kThreads, 1)
    backward_rows_kernel(const __grid_constant__ BlockSparseCudaParams p, const int vec, const int64_t first_block,
                         const int64_t splits) {
  using Tr = Traits<T, kD, kBlock>;
  using Gemm = WarpGemm<T>;
  constexpr int kChunk = Tr::kChunk, kLd = Tr::kLd, kNT = kChunk / 8, kDT = kD / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // kBlock x kD: the query block
  T* sdO = sQ + kBlock * kLd;          // kBlock x kD: its grad_out
  T* sK = sdO + kBlock * kLd;          // kChunk x kD
  T* sV = sK + kChunk * kLd;           // kChunk x kD
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float* scratch = reinterpret_cast<float*>(sV + kChunk * kLd) + warp * 16 * Tr::kScratchLd;

  const BlockSparseShape& s = p.s;
  const bool with_grad_bias = p.grad_bias != nullptr;
  const int64_t head_groups = with_grad_bias ? s.bias_heads : s.heads;
  const int64_t batch_groups = with_grad_bias ? s.bias_batch : s.batch;
  const int64_t heads_per_group = s.heads / head_groups, batch_per_group = s.batch / batch_groups;
  const int64_t members = heads_per_group * batch_per_group;
  const int64_t work = first_block + blockIdx.x, group_work = work / s.num_q_blocks / splits;
  const int64_t qb = work % s.num_q_blocks, split = work / s.num_q_blocks % splits;
  const int64_t hg = group_work % head_groups, bg = group_work / head_groups;
  const int64_t r0 = qb * kBlock;
  const int rows = int(min(int64_t(kBlock), s.seq_q - r0));
  const int64_t q_lo = r0 + warp * 16 + g;  // this thread's rows: q_lo and q_lo + 8
  const int64_t bias_elems = s.bias_batch * s.bias_heads * s.seq_q * s.seq_k;
  float* grad_bias = !with_grad_bias ? nullptr
                     : (splits == 1 ? p.grad_bias : p.workspace + split * bias_elems) +
                           (bg * s.bias_heads + hg) * s.seq_q * s.seq_k;
  const T* sQw = sQ + warp * 16 * kLd;
  const T* sdOw = sdO + warp * 16 * kLd;

  const int64_t member_end = (split + 1) * members / splits;
  for (int64_t member = split * members / splits; member < member_end; ++member) {
    const int64_t bi = member / heads_per_group, hi = member % heads_per_group;
    const int64_t b = bg * batch_per_group + bi, h = hg * heads_per_group + hi, bh = b * s.heads + h;
    const int64_t hl = s.layout_heads == 1 ? 0 : h;
    const int count = min(max(p.row_count[hl * s.num_q_blocks + qb], 0), int(s.num_k_blocks));
    const int32_t* idx = p.row_index + (hl * s.num_q_blocks + qb) * s.num_k_blocks;
    const T* kg = bh_ptr<T>(p.k, p.k_stride, b, h);
    const T* vg = bh_ptr<T>(p.v, p.v_stride, b, h);
    const bool* mask = p.key_padding_mask != nullptr ? p.key_padding_mask + b * s.seq_k : nullptr;
    const int64_t bias_off = p.bias != nullptr ? bias_offset(s, b, h) : 0;

    __syncthreads();  // the previous (b, h) is done with sQ, sdO, sK, sV
    load_rows<T, kD, Tr::kThreads>(sQ, kLd, bh_ptr<T>(p.q, p.q_stride, b, h) + r0 * p.q_stride[2], p.q_stride[2],
                                   rows, kBlock, vec & kVecQ);
    load_rows<T, kD, Tr::kThreads>(sdO, kLd,
                                   bh_ptr<T>(p.grad_out, p.grad_out_stride, b, h) + r0 * p.grad_out_stride[2],
                                   p.grad_out_stride[2], rows, kBlock, vec & kVecGradOut);
    float lse[2], delta[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t q = q_lo + 8 * rr;
      lse[rr] = q < s.seq_q ? p.lse[bh * s.seq_q + q] * kLog2e : kInf;
      delta[rr] = q < s.seq_q ? p.delta[bh * s.seq_q + q] : 0.f;
    }

    float dq[kDT][4];
    zero(dq);
    for (int e = 0; e < count; ++e) {
      const int64_t kb = idx[e];
      if (kb < 0 || kb >= s.num_k_blocks) continue;
      for (int ch = 0; ch < Tr::kChunks; ++ch) {
        const int64_t key0 = kb * kBlock + ch * kChunk;
        if (key0 >= s.seq_k) break;
        const int cols = int(min(int64_t(kChunk), s.seq_k - key0));
        __syncthreads();
        const bool* keep = mask != nullptr ? mask + key0 : nullptr;
        load_rows<T, kD, Tr::kThreads>(sK, kLd, kg + key0 * p.k_stride[2], p.k_stride[2], cols, kChunk,
                                       vec & kVecK, keep);
        load_rows<T, kD, Tr::kThreads>(sV, kLd, vg + key0 * p.v_stride[2], p.v_stride[2], cols, kChunk,
                                       vec & kVecV, keep);
        __syncthreads();

        float ds[kNT][4];  // logits, then P, then dS
        zero(ds);
        Gemm::template nt<kChunk, kD>(ds, sQw, kLd, sK, kLd);
        query_row_logits<kNT>(ds, p, mask, bias_off, q_lo, key0, cols);
        float dp[kNT][4];
        zero(dp);
        Gemm::template nt<kChunk, kD>(dp, sdOw, kLd, sV, kLd);
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int rr = r >> 1;
            // x = -inf (masked) gives 0 by a select: exp2f(-inf - lse) is NaN for a NaN row's lse. lse = +inf (no
            // visible key in the row) gives 0.
            const float x = ds[j][r];
            ds[j][r] = x == -kInf ? 0.f : exp2f(x - lse[rr]) * (dp[j][r] - delta[rr]);
          }
        }
        if (grad_bias != nullptr) {
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const int col = 8 * j + 2 * t + (r & 1);
              const int64_t q = q_lo + 8 * (r >> 1);
              if (col < cols && q < s.seq_q) grad_bias[q * s.seq_k + key0 + col] += ds[j][r];
            }
          }
        }
        if (p.grad_q != nullptr) Gemm::template rn<kD, kChunk>(dq, ds, sK, kLd, scratch);  // dQ += dS K
      }
    }

    if (p.grad_q != nullptr) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int64_t q = q_lo + 8 * rr;
        if (q >= s.seq_q) continue;
        T* gq = static_cast<T*>(p.grad_q) + (bh * s.seq_q + q) * s.head_dim;
#pragma unroll
        for (int d = 0; d < kDT; ++d) {
          gq[8 * d + 2 * t] = from_float<T>(scaled_grad(dq[d][2 * rr], p.scale));
          gq[8 * d + 2 * t + 1] = from_float<T>(scaled_grad(dq[d][2 * rr + 1], p.scale));
        }
      }
    }
  }
}

// grad_bias[i] = sum over splits sp = 0, 1, ... of workspace[sp][i], in that order (the row pass's copies).
constexpr int kSumThreads = 256;

__global__ void __launch_bounds__(kSumThreads)
    sum_bias_copies_kernel(float* __restrict__ grad_bias, const float* __restrict__ copies, int64_t n,
                           int64_t splits) {
  for (int64_t i = int64_t(blockIdx.x) * kSumThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kSumThreads) {
    float sum = 0.f;
    for (int64_t sp = 0; sp < splits; ++sp) sum += copies[sp * n + i];
    grad_bias[i] = sum;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------------------

constexpr int kMaxDevices = 64;

int64_t optin_limit_of(int dev) {
  static std::atomic<int64_t> cache[kMaxDevices] = {};  // 0: not asked yet
  if (dev >= 0 && dev < kMaxDevices) {
    const int64_t known = cache[dev].load(std::memory_order_relaxed);
    if (known != 0) return known;
  }
  int bytes = 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return -1;
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(bytes, std::memory_order_relaxed);
  return bytes;
}

// One per kernel instantiation: bit d is set once the kernel has been opted in on device d.
struct SmemOptIn {
  std::atomic<uint64_t> done{0};
};

// Opts the kernel into `bytes` of dynamic shared memory, once per device (cudaFuncSetAttribute is not repeated
// on every launch); cudaErrorInvalidValue when the device allows less.
cudaError_t set_smem(const void* kernel, size_t bytes, SmemOptIn& state) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev >= 0 && dev < kMaxDevices ? uint64_t(1) << dev : 0;
  if (bit != 0 && (state.done.load(std::memory_order_acquire) & bit) != 0) return cudaSuccess;
  const int64_t limit = optin_limit_of(dev);
  if (limit < 0 || int64_t(bytes) > limit) return cudaErrorInvalidValue;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err == cudaSuccess && bit != 0) state.done.fetch_or(bit, std::memory_order_release);
  return err;
}

// Launches `launch(blocks, first_block)` over `total` flattened work items, at most 2^31 - 1 per launch (or the
// params' max_blocks_per_launch, which tests lower to exercise the offsets).
template <typename Launch>
cudaError_t launch_flat(const BlockSparseCudaParams& p, int64_t total, Launch&& launch) {
  const int64_t limit = p.max_blocks_per_launch > 0 ? std::min(p.max_blocks_per_launch, kMaxGridX) : kMaxGridX;
  for (int64_t first = 0; first < total; first += limit) {
    launch(unsigned(std::min(limit, total - first)), first);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Rows of a (B, H, N, D) view can be read 16 bytes at a time: aligned base and strides (a stride of a size-1
// dimension never moves the pointer and is ignored).
bool rows_aligned16(const void* ptr, const int64_t (&stride)[3], int64_t b, int64_t h, int64_t n, size_t elem) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  const int64_t sizes[3] = {b, h, n};
  for (int i = 0; i < 3; ++i)
    if (sizes[i] > 1 && (stride[i] * int64_t(elem)) % 16 != 0) return false;
  return true;
}

int vec_bits(const BlockSparseCudaParams& p, size_t elem, bool with_grad_out) {
  const BlockSparseShape& s = p.s;
  int bits = 0;
  if (rows_aligned16(p.q, p.q_stride, s.batch, s.heads, s.seq_q, elem)) bits |= kVecQ;
  if (rows_aligned16(p.k, p.k_stride, s.batch, s.heads, s.seq_k, elem)) bits |= kVecK;
  if (rows_aligned16(p.v, p.v_stride, s.batch, s.heads, s.seq_k, elem)) bits |= kVecV;
  if (with_grad_out && rows_aligned16(p.grad_out, p.grad_out_stride, s.batch, s.heads, s.seq_q, elem))
    bits |= kVecGradOut;
  return bits;
}

// Shapes the kernels index with; the binding checks the same with messages naming the argument.
bool valid_shape(const BlockSparseCudaParams& p) {
  const BlockSparseShape& s = p.s;
  const int64_t bs = s.block_size;
  if (s.batch <= 0 || s.heads <= 0 || s.seq_q <= 0 || s.seq_k <= 0 || bs <= 0) return false;
  if (s.num_q_blocks != (s.seq_q + bs - 1) / bs || s.num_k_blocks != (s.seq_k + bs - 1) / bs) return false;
  if (s.num_q_blocks > std::numeric_limits<int>::max() || s.num_k_blocks > std::numeric_limits<int>::max())
    return false;
  if (s.layout_heads != 1 && s.layout_heads != s.heads) return false;
  if (p.bias != nullptr || p.grad_bias != nullptr) {
    if (s.bias_batch <= 0 || s.batch % s.bias_batch != 0) return false;
    if (s.bias_heads != 1 && s.bias_heads != s.heads) return false;
  }
  return p.q != nullptr && p.k != nullptr && p.v != nullptr && p.out != nullptr && p.lse != nullptr;
}

template <typename T, int kD, int kBlock>
cudaError_t run_forward(const BlockSparseCudaParams& p, cudaStream_t stream) {
  static SmemOptIn opt_in;
  if (p.row_count == nullptr || p.row_index == nullptr) return cudaErrorInvalidValue;
  const auto kernel = forward_kernel<T, kD, kBlock>;
  const size_t smem = forward_smem_bytes<T, kD, kBlock>();
  const cudaError_t err = set_smem(reinterpret_cast<const void*>(kernel), smem, opt_in);
  if (err != cudaSuccess) return err;
  const int vec = vec_bits(p, sizeof(T), false);
  return launch_flat(p, p.s.num_q_blocks * p.s.heads * p.s.batch, [&](unsigned blocks, int64_t first) {
    kernel<<<blocks, Traits<T, kD, kBlock>::kThreads, smem, stream>>>(p, vec, first);
  });
}

template <typename T, int kD, int kBlock>
cudaError_t run_backward(const BlockSparseCudaParams& p, cudaStream_t stream) {
  static SmemOptIn cols_opt_in, rows_opt_in;
  const BlockSparseShape& s = p.s;
  const bool want_kv = p.grad_k != nullptr, want_rows = p.grad_q != nullptr || p.grad_bias != nullptr;
  const bool with_grad_bias = p.grad_bias != nullptr;
  if (p.grad_out == nullptr || p.delta == nullptr || (p.grad_k == nullptr) != (p.grad_v == nullptr))
    return cudaErrorInvalidValue;
  if (want_kv && (p.col_count == nullptr || p.col_index == nullptr)) return cudaErrorInvalidValue;
  if (want_rows && (p.row_count == nullptr || p.row_index == nullptr)) return cudaErrorInvalidValue;
  const int64_t splits = with_grad_bias ? block_sparse_bias_grad_splits(s) : 1;
  const int64_t workspace_floats = block_sparse_backward_workspace_floats(s, with_grad_bias);
  if (workspace_floats > 0 && p.workspace == nullptr) return cudaErrorInvalidValue;
  if (!want_kv && !want_rows) return cudaSuccess;
  // Both passes' shared memory is checked before anything is launched, so an unsupported size launches nothing.
  const auto cols_kernel = backward_cols_kernel<T, kD, kBlock>;
  const auto rows_kernel = backward_rows_kernel<T, kD, kBlock>;
  const size_t cols_smem = backward_cols_smem_bytes<T, kD, kBlock>();
  const size_t rows_smem = backward_rows_smem_bytes<T, kD, kBlock>();
  cudaError_t err = cudaSuccess;
  if (want_kv && (err = set_smem(reinterpret_cast<const void*>(cols_kernel), cols_smem, cols_opt_in)) != cudaSuccess)
    return err;
  if (want_rows && (err = set_smem(reinterpret_cast<const void*>(rows_kernel), rows_smem, rows_opt_in)) != cudaSuccess)
    return err;
  const int vec = vec_bits(p, sizeof(T), true);
  constexpr int kThreads = Traits<T, kD, kBlock>::kThreads;

  constexpr int64_t kDeltaRows = kDeltaThreads / 8;
  err = launch_flat(p, (s.batch * s.heads * s.seq_q + kDeltaRows - 1) / kDeltaRows, [&](unsigned blocks, int64_t first) {
    delta_kernel<T><<<blocks, kDeltaThreads, 0, stream>>>(p, first);
  });
  if (err != cudaSuccess) return err;
  if (want_kv) {
    err = launch_flat(p, s.num_k_blocks * s.heads * s.batch, [&](unsigned blocks, int64_t first) {
      cols_kernel<<<blocks, kThreads, cols_smem, stream>>>(p, vec, first);
    });
    if (err != cudaSuccess) return err;
  }
  if (want_rows) {
    if (workspace_floats > 0 &&
        (err = cudaMemsetAsync(p.workspace, 0, size_t(workspace_floats) * sizeof(float), stream)) != cudaSuccess)
      return err;
    const int64_t groups = with_grad_bias ? s.bias_batch * s.bias_heads : s.batch * s.heads;
    err = launch_flat(p, s.num_q_blocks * splits * groups, [&](unsigned blocks, int64_t first) {
      rows_kernel<<<blocks, kThreads, rows_smem, stream>>>(p, vec, first, splits);
    });
    if (err != cudaSuccess) return err;
    if (splits > 1) {
      const int64_t n = s.bias_batch * s.bias_heads * s.seq_q * s.seq_k;
      const int64_t blocks = std::min<int64_t>((n + kSumThreads - 1) / kSumThreads, 65535);
      sum_bias_copies_kernel<<<unsigned(blocks), kSumThreads, 0, stream>>>(p.grad_bias, p.workspace, n, splits);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace bsa

namespace cuda {

int forward(const BlockSparseCudaParams& p, CUstream_st* stream) {
  if (!bsa::valid_shape(p)) return cudaErrorInvalidValue;
  return AF2_DTYPE_SWITCH(p.dtype, T, [&] {
    return AF2_SIZE_SWITCH(p.s.head_dim, kD, [&] {
      return AF2_SIZE_SWITCH(p.s.block_size, kBlock, [&] { return bsa::run_forward<T, kD, kBlock>(p, stream); });
    });
  });
}

int backward(const BlockSparseCudaParams& p, CUstream_st* stream) {
  if (!bsa::valid_shape(p)) return cudaErrorInvalidValue;
  return AF2_DTYPE_SWITCH(p.dtype, T, [&] {
    return AF2_SIZE_SWITCH(p.s.head_dim, kD, [&] {
      return AF2_SIZE_SWITCH(p.s.block_size, kBlock, [&] { return bsa::run_backward<T, kD, kBlock>(p, stream); });
    });
  });
}

int64_t smem_optin_limit() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return -1;
  return bsa::optin_limit_of(dev);
}

}  // namespace cuda
}  // namespace af2_ext
