// Key/value compression of memory-compressed attention on CUDA: forward and backward kernels and their launchers
// (shapes and formula in compressed_attention.h). No torch headers; the torch binding is
// compressed_attention_cuda.cpp and cuda_tests/test_compressed_attention.cu calls the launchers directly.
//
// Per head h the compression is a GEMM over the M = B * Nc compressed rows m = (b, j) of every batch row, with
// W_t[d][e] = weight[h*D + e, d, t]:
//   forward       kc[m, :] = bias_h + sum_t k[b, j*ratio + t, :] · W_t
//   grad input    grad_k[b, j*ratio + t, :] = grad_kc[m, :] · W_tᵀ            (each input row is one (m, t))
//   grad weight   grad_W_t = sum_m k[b, j*ratio + t, :]ᵀ grad_kc[m, :] + (the same for v)
//   grad bias     grad_bias_h = sum_m grad_kc[m, :] + grad_vc[m, :]
// The first two share one shape: a CTA owns 64 rows m of one head for k and v together (so the weight tiles are
// loaded once for both), stages 32-wide slices of the reduction dim (d, or e) of its rows and of W_t in shared
// memory as fp32, and each thread accumulates 4 rows x 4 outputs. Input rows past Nk are read as zero and never
// written. The weight gradient has a small output (D x D per head and tap) and a long reduction (all M rows): a
// CTA owns a 16 x 16 tile (32 x 32 at D = 128) of one (head, tap) and walks the rows in chunks of 64, fetching the
// next chunk into registers while it multiplies the current one; its threads form slices that take every
// kSlices-th row of a chunk, and the slices' partial sums are added in slice order at the end. When those
// (tile, tap, head) CTAs are too few to fill a GPU, the chunks are also split into S contiguous ranges (grid.z;
// S = kv_compress_weight_splits, from the shape alone: ~512 CTAs in all, >= 4 chunks per split, S <= 64): each
// split's CTAs write their sums to a partial copy of grad_weight and grad_bias in the caller's workspace, and a
// second kernel adds the S partials of each element in split order s = 0..S-1. S = 1 writes the outputs directly.
// The bias is summed by the t = 0, d tile 0 CTAs, in the same order whether or not grad_weight is wanted. Every
// output element is summed by one thread, or one fixed in-CTA reduction, in an order fixed by the shape: no
// atomics, and the results are bitwise deterministic, the same on every GPU. More than 65,535 heads (grid.y) are
// launched in chunks, the kernels taking the chunk's first head h0.
#include <algorithm>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/static_switch.cuh"
#include "compressed_attention/compressed_attention.h"

namespace af2_ext {
namespace kvc {
namespace {

// Where compressed row m = m0 + i of a CTA reads and writes, computed once per CTA (or chunk): one 64-bit
// division per row instead of one per element.
struct RowInfo {
  int64_t n0;     // first input row j * ratio; seq_k past the last row m, so that n0 + t >= seq_k for every tap
  int64_t k_off;  // element offset of input row n0 of k (b, h); v_off likewise
  int64_t v_off;
  int64_t c_row;  // row (b*H + h)*Nc + j of kc, vc, grad_kc and grad_vc; -1 past the last row m
  int64_t g_row;  // row (b*H + h)*Nk + n0 of grad_k and grad_v
};

__device__ __forceinline__ void fill_rows(RowInfo* rows, const KvCompressCudaParams& p, int64_t h, int64_t m0,
                                          int count, int threads) {
  const KvCompressShape& s = p.s;
  const int64_t num_rows = s.batch * s.seq_c;
  for (int i = threadIdx.x; i < count; i += threads) {
    const int64_t m = m0 + i;
    RowInfo r{s.seq_k, 0, 0, -1, 0};
    if (m < num_rows) {
      const int64_t b = m / s.seq_c, j = m - b * s.seq_c, n0 = j * s.ratio;
      r.n0 = n0;
      r.k_off = b * p.k_stride[0] + h * p.k_stride[1] + n0 * p.k_stride[2];
      r.v_off = b * p.v_stride[0] + h * p.v_stride[1] + n0 * p.v_stride[2];
      r.c_row = (b * s.heads + h) * s.seq_c + j;
      r.g_row = (b * s.heads + h) * s.seq_k + n0;
    }
    rows[i] = r;
  }
}

// dst[r][0:kCols] = src[offset(r) + c0 + 0:kCols] in fp32 for r < rows, zero where offset(r) < 0. Consecutive
// threads read consecutive elements of a row (coalesced for any row stride).
template <int kCols, int kLd, int kThreads, typename T, typename Offset>
__device__ __forceinline__ void load_row_tile(float* __restrict__ dst, const T* __restrict__ src, int rows, int c0,
                                              Offset offset) {
  for (int i = threadIdx.x; i < rows * kCols; i += kThreads) {
    const int r = i / kCols, c = i % kCols;
    const int64_t off = offset(r);
    dst[r * kLd + c] = off >= 0 ? to_float(src[off + c0 + c]) : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward and grad of k, v: 64 rows m x D outputs per CTA
// ---------------------------------------------------------------------------------------------------------------

constexpr int kProjRows = 64;  // rows m per CTA; every thread owns 4 of them and 4 output columns

template <int kD>
struct ProjTraits {
  static constexpr int kStep = kD < 32 ? kD : 32;  // slice of the reduction dim staged per shared-memory round
  static constexpr int kSteps = kD / kStep;
  static constexpr int kColThreads = kD / 4;
  static constexpr int kThreads = (kProjRows / 4) * kColThreads;  // 4 * kD: 64 .. 512
  // Odd: the rows a warp reads together (4 apart) fall in distinct banks.
  static constexpr int kLdX = kStep + 1;
  // 16-byte rows for float4 reads; the +4 spreads the transposed stores of the forward's weight slice.
  static constexpr int kLdW = kD + 4;
};

// dst[kk][col] = W_t[k0 + kk][col] of one head for the forward (W_t[d][e] = weight[h*D + e, d, t]), or
// W_tᵀ[k0 + kk][col] for the grad of k and v (W_tᵀ[e][d] = weight[h*D + e, d, t]). Consecutive threads walk the
// dim with the smaller global stride (d in both cases: stride ratio).
template <int kD, int kStep, int kLd, int kThreads, bool kForward>
__device__ __forceinline__ void load_weight_slice(float* __restrict__ dst, const float* __restrict__ w_h,
                                                  int64_t ratio, int64_t t, int k0) {
  for (int i = threadIdx.x; i < kStep * kD; i += kThreads) {
    int kk, col;
    int64_t idx;
    if (kForward) {  // kk indexes d, col indexes e
      col = i / kStep;
      kk = i % kStep;
      idx = (int64_t(col) * kD + k0 + kk) * ratio + t;
    } else {  // kk indexes e, col indexes d
      kk = i / kD;
      col = i % kD;
      idx = (int64_t(k0 + kk) * kD + col) * ratio + t;
    }
    dst[kk * kLd + col] = __ldg(w_h + idx);
  }
}

// acc[jj][c] += sum_kk x[jj][kk] * w[kk][c]: 4 rows of x (row stride kLdX) times 4 columns of w (row stride kLdW).
template <int kStep, int kLdX, int kLdW>
__device__ __forceinline__ void fma_4x4(float (&acc)[4][4], const float* __restrict__ x,
                                        const float* __restrict__ w) {
#pragma unroll 8
  for (int kk = 0; kk < kStep; ++kk) {
    const float4 w4 = *reinterpret_cast<const float4*>(w + kk * kLdW);
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const float xv = x[jj * kLdX + kk];
      acc[jj][0] = fmaf(xv, w4.x, acc[jj][0]);
      acc[jj][1] = fmaf(xv, w4.y, acc[jj][1]);
      acc[jj][2] = fmaf(xv, w4.z, acc[jj][2]);
      acc[jj][3] = fmaf(xv, w4.w, acc[jj][3]);
    }
  }
}

// grid (ceil(M / 64), heads of this launch), head h = h0 + blockIdx.y. Thread (tr, tc) owns rows m0 + 4 tr + 0..3
// and output columns 4 tc + 0..3 of kc and vc; the reduction runs over taps t, then d in kStep slices, in that order.
template <typename T, int kD>
__global__ void __launch_bounds__(ProjTraits<kD>::kThreads)
    forward_kernel(const __grid_constant__ KvCompressCudaParams p, int64_t h0) {
  using Tr = ProjTraits<kD>;
  __shared__ __align__(16) float sX[2][kProjRows * Tr::kLdX];  // k, v rows at tap t: rows x d slice
  __shared__ __align__(16) float sW[Tr::kStep * Tr::kLdW];    // W_t: d slice x e
  __shared__ RowInfo rows[kProjRows];
  const KvCompressShape& s = p.s;
  const int64_t h = h0 + blockIdx.y;
  const int tr = threadIdx.x / Tr::kColThreads, tc = threadIdx.x % Tr::kColThreads;
  fill_rows(rows, p, h, int64_t(blockIdx.x) * kProjRows, kProjRows, Tr::kThreads);
  const T* in[2] = {static_cast<const T*>(p.k), static_cast<const T*>(p.v)};
  T* out[2] = {static_cast<T*>(p.kc), static_cast<T*>(p.vc)};
  const int64_t row_stride[2] = {p.k_stride[2], p.v_stride[2]};
  const float* w_h = p.weight + h * kD * kD * s.ratio;

  float acc[2][4][4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const float bias = p.bias != nullptr ? p.bias[h * kD + tc * 4 + c] : 0.f;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) acc[0][jj][c] = acc[1][jj][c] = bias;
  }
  for (int64_t t = 0; t < s.ratio; ++t) {
    for (int k0 = 0; k0 < kD; k0 += Tr::kStep) {
      __syncthreads();  // rows are filled; the previous round's reads of sX and sW are done
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        if (out[x] == nullptr) continue;
        const int64_t tap = t * row_stride[x];
        load_row_tile<Tr::kStep, Tr::kLdX, Tr::kThreads>(sX[x], in[x], kProjRows, k0, [&](int r) {
          const RowInfo& ri = rows[r];
          return ri.n0 + t < s.seq_k ? (x == 0 ? ri.k_off : ri.v_off) + tap : int64_t(-1);
        });
      }
      load_weight_slice<kD, Tr::kStep, Tr::kLdW, Tr::kThreads, true>(sW, w_h, s.ratio, t, k0);
      __syncthreads();
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        if (out[x] == nullptr) continue;
        fma_4x4<Tr::kStep, Tr::kLdX, Tr::kLdW>(acc[x], sX[x] + tr * 4 * Tr::kLdX, sW + tc * 4);
      }
    }
  }
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    if (out[x] == nullptr) continue;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int64_t c_row = rows[tr * 4 + jj].c_row;
      if (c_row < 0) continue;
      T* o = out[x] + c_row * kD + tc * 4;
#pragma unroll
      for (int c = 0; c < 4; ++c) o[c] = from_float<T>(acc[x][jj][c]);
    }
  }
}

// grid (ceil(M / 64), heads of this launch), head h = h0 + blockIdx.y. For each tap t, thread (tr, tc) computes
// input rows j*ratio + t of its 4 rows m (those before Nk) at columns d = 4 tc + 0..3 of grad_k and grad_v, reducing
// over e in kStep slices.
template <typename T, int kD>
__global__ void __launch_bounds__(ProjTraits<kD>::kThreads)
    backward_input_kernel(const __grid_constant__ KvCompressCudaParams p, int64_t h0) {
  using Tr = ProjTraits<kD>;
  __shared__ __align__(16) float sX[2][kProjRows * Tr::kLdX];  // grad_kc, grad_vc rows: rows x e slice
  __shared__ __align__(16) float sW[Tr::kStep * Tr::kLdW];    // W_tᵀ: e slice x d
  __shared__ RowInfo rows[kProjRows];
  const KvCompressShape& s = p.s;
  const int64_t h = h0 + blockIdx.y;
  const int tr = threadIdx.x / Tr::kColThreads, tc = threadIdx.x % Tr::kColThreads;
  fill_rows(rows, p, h, int64_t(blockIdx.x) * kProjRows, kProjRows, Tr::kThreads);
  const T* grad_c[2] = {static_cast<const T*>(p.grad_kc), static_cast<const T*>(p.grad_vc)};
  T* grad_in[2] = {static_cast<T*>(p.grad_k), static_cast<T*>(p.grad_v)};
  const float* w_h = p.weight + h * kD * kD * s.ratio;

  for (int64_t t = 0; t < s.ratio; ++t) {
    float acc[2][4][4];
#pragma unroll
    for (int jj = 0; jj < 4; ++jj)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[0][jj][c] = acc[1][jj][c] = 0.f;
    for (int k0 = 0; k0 < kD; k0 += Tr::kStep) {
      __syncthreads();  // rows are filled; the previous round's reads of sX and sW are done
      // The rows m do not depend on t: with one slice (D <= 32) they stay in shared memory across taps.
      if (Tr::kSteps > 1 || t == 0) {
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          if (grad_in[x] == nullptr) continue;
          load_row_tile<Tr::kStep, Tr::kLdX, Tr::kThreads>(sX[x], grad_c[x], kProjRows, k0, [&](int r) {
            const int64_t c_row = rows[r].c_row;
            return c_row >= 0 ? c_row * kD : int64_t(-1);
          });
        }
      }
      load_weight_slice<kD, Tr::kStep, Tr::kLdW, Tr::kThreads, false>(sW, w_h, s.ratio, t, k0);
      __syncthreads();
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        if (grad_in[x] == nullptr) continue;
        fma_4x4<Tr::kStep, Tr::kLdX, Tr::kLdW>(acc[x], sX[x] + tr * 4 * Tr::kLdX, sW + tc * 4);
      }
    }
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      if (grad_in[x] == nullptr) continue;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const RowInfo& ri = rows[tr * 4 + jj];
        if (ri.n0 + t >= s.seq_k) continue;  // zero padding (or past the last row m): no such input row
        T* o = grad_in[x] + (ri.g_row + t) * kD + tc * 4;
#pragma unroll
        for (int c = 0; c < 4; ++c) o[c] = from_float<T>(acc[x][jj][c]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Grad of weight and bias: one CTA per (tile of W_t, tap t, head, row split), then the splits' fixed-order sum
// ---------------------------------------------------------------------------------------------------------------

// e and d extent of a weight-gradient CTA's output tile. 16 up to D = 64 so that even small heads give
// H * ratio * (D / 16)^2 CTAs; 32 at D = 128, which already has 16 tiles per (head, tap) and halves the re-reads of
// the rows.
constexpr int weight_tile(int64_t head_dim) { return head_dim < 128 ? 16 : 32; }
constexpr int kWeightRows = 64;  // rows m per chunk of the weight gradient

template <int kD>
struct WeightTraits {
  static constexpr int kTile = weight_tile(kD);
  static constexpr int kTiles = kD / kTile;  // tiles per dim
  static constexpr int kThreads = 256;
  static constexpr int kTileThreads = (kTile / 4) * (kTile / 4);  // each owns a 4 x 4 block of the tile
  static constexpr int kSlices = kThreads / kTileThreads;         // 16 (4 at D = 128)
  static constexpr int kRows = kWeightRows;
  static constexpr int kTileFloats = kRows * kTile;      // one staged tile: rows x kTile
  static constexpr int kLoads = kTileFloats / kThreads;  // elements of each tile a thread stages
  // The four staged tiles (grad_kc, grad_vc: rows x e; k, v at tap t: rows x d), and after the walk the same
  // memory holds the slices' partial sums of the output tile.
  static constexpr int kStageFloats = 4 * kTileFloats;
  static constexpr int kPartFloats = kSlices * kTile * kTile;
  static constexpr int kSmemFloats = kStageFloats > kPartFloats ? kStageFloats : kPartFloats;
  static_assert(kRows % kSlices == 0 && kTileFloats % kThreads == 0, "chunks split evenly over slices and threads");
};

// Reads the chunk described by `rows` into registers: element threadIdx.x + l * kThreads (row r, column c) of the
// grad_kc, grad_vc, k and v tiles. Issued before the previous chunk's products so that the loads are in flight
// while they run; rows past M and input rows past Nk read as zero.
template <typename T, int kD>
__device__ __forceinline__ void fetch_chunk(float (&staged)[4][WeightTraits<kD>::kLoads],
                                            const KvCompressCudaParams& p, const RowInfo* rows, int64_t t, int e0,
                                            int d0, bool with_weight) {
  using Tr = WeightTraits<kD>;
  const T* grad_kc = static_cast<const T*>(p.grad_kc);
  const T* grad_vc = static_cast<const T*>(p.grad_vc);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
#pragma unroll
  for (int l = 0; l < Tr::kLoads; ++l) {
    const int i = threadIdx.x + l * Tr::kThreads, r = i / Tr::kTile, c = i % Tr::kTile;
    const RowInfo& ri = rows[r];
    const bool row_ok = ri.c_row >= 0, input_ok = with_weight && ri.n0 + t < p.s.seq_k;
    staged[0][l] = row_ok ? to_float(grad_kc[ri.c_row * kD + e0 + c]) : 0.f;
    staged[1][l] = row_ok ? to_float(grad_vc[ri.c_row * kD + e0 + c]) : 0.f;
    staged[2][l] = input_ok ? to_float(k[ri.k_off + t * p.k_stride[2] + d0 + c]) : 0.f;
    staged[3][l] = input_ok ? to_float(v[ri.v_off + t * p.v_stride[2] + d0 + c]) : 0.f;
  }
}

// Where one launch of backward_weight_kernel starts and writes.
struct WeightLaunch {
  int64_t h0;                // head of blockIdx.y = 0
  int64_t chunks_per_split;  // split z = blockIdx.z walks chunks [z, z + 1) * chunks_per_split, those that exist
  // Without a split, grad_weight and grad_bias themselves (split stride 0); with S splits, the workspace's S partial
  // copies of each, split z's at out + z * split_stride. nullptr: not wanted.
  float* weight_out;
  int64_t weight_split_stride;
  float* bias_out;
  int64_t bias_split_stride;
};

// grid (kTiles * kTiles * ratio, heads of this launch, S), blockIdx.x = (t * kTiles + d tile) * kTiles + e tile, head
// h = h0 + blockIdx.y, split blockIdx.z; without grad_weight, grid (kTiles, heads, S): only the bias work of the
// t = 0, d tile 0 CTAs, each of which also owns grad_bias of its e tile (every row m, whatever the tap). A CTA walks
// the chunks of its split; thread (slice, te, td) sums rows m = m0 + slice + kSlices * i of each chunk into its 4 x 4
// block (e = e0 + 4 te + 0..3, d = d0 + 4 td + 0..3), and the slices are added in order. Whether a CTA walks and
// how many chunks depend on blockIdx and p alone: every barrier is reached by every thread of the CTA.
template <typename T, int kD>
__global__ void __launch_bounds__(WeightTraits<kD>::kThreads)
    backward_weight_kernel(const __grid_constant__ KvCompressCudaParams p, const WeightLaunch w) {
  using Tr = WeightTraits<kD>;
  constexpr int kTile = Tr::kTile, kRows = Tr::kRows, kSlices = Tr::kSlices, kThreads = Tr::kThreads;
  __shared__ __align__(16) float smem[Tr::kSmemFloats];  // staged tiles, then sPart
  __shared__ float sPartBias[kSlices * kTile];
  __shared__ RowInfo rows[kRows];
  float* sPart = smem;  // (kSlices, kTile, kTile)
  const KvCompressShape& s = p.s;
  const int e0 = int(blockIdx.x % Tr::kTiles) * kTile;
  const int d0 = int(blockIdx.x / Tr::kTiles % Tr::kTiles) * kTile;
  const int64_t t = blockIdx.x / (Tr::kTiles * Tr::kTiles);
  const int64_t h = w.h0 + blockIdx.y;
  const int64_t split = blockIdx.z;
  const bool with_weight = w.weight_out != nullptr;
  const bool with_bias = w.bias_out != nullptr && t == 0 && d0 == 0;
  const int slice = threadIdx.x / Tr::kTileThreads, te = threadIdx.x % Tr::kTileThreads / (kTile / 4),
            td = threadIdx.x % (kTile / 4);

  float acc[4][4], bias_acc[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    bias_acc[i] = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }
  // With t >= Nk every input row of the tap is zero padding, still walked: 0 * grad_kc is 0, or NaN where grad_kc is
  // not finite (the zero-padded convolution's gradient; the reference's conv1d agrees). A split past the last chunk
  // (none with the launcher's S) walks nothing and writes a zero partial.
  const bool walk = with_bias || with_weight;
  const int64_t chunk_begin = split * w.chunks_per_split;
  const int64_t chunk_end =
      walk ? min(ceil_div<int64_t>(s.batch * s.seq_c, kRows), chunk_begin + w.chunks_per_split) : chunk_begin;
  float staged[4][Tr::kLoads];
  if (chunk_begin < chunk_end) {
    fill_rows(rows, p, h, chunk_begin * kRows, kRows, kThreads);
    __syncthreads();
    fetch_chunk<T, kD>(staged, p, rows, t, e0, d0, with_weight);
  }
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    // The previous chunk's products are done with the tiles, and every thread has read rows for its fetch.
    __syncthreads();
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
      for (int l = 0; l < Tr::kLoads; ++l) smem[x * Tr::kTileFloats + threadIdx.x + l * kThreads] = staged[x][l];
    // Rows of the next chunk of this split only; rows past M (the last chunk of all) read as zero.
    const bool more = chunk + 1 < chunk_end;
    if (more) fill_rows(rows, p, h, (chunk + 1) * kRows, kRows, kThreads);
    __syncthreads();
    if (more) fetch_chunk<T, kD>(staged, p, rows, t, e0, d0, with_weight);
    if (with_weight) {
      for (int mm = slice; mm < kRows; mm += kSlices) {
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          const float4 g4 = *reinterpret_cast<const float4*>(smem + x * Tr::kTileFloats + mm * kTile + te * 4);
          const float4 x4 = *reinterpret_cast<const float4*>(smem + (2 + x) * Tr::kTileFloats + mm * kTile + td * 4);
          const float g[4] = {g4.x, g4.y, g4.z, g4.w}, xv[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(g[i], xv[j], acc[i][j]);
        }
      }
    }
    if (with_bias && td == 0) {
      for (int mm = slice; mm < kRows; mm += kSlices) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          bias_acc[i] += smem[mm * kTile + te * 4 + i] + smem[Tr::kTileFloats + mm * kTile + te * 4 + i];
      }
    }
  }

  __syncthreads();  // the last chunk's products are done with the tiles that sPart overlays
  if (with_weight) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sPart[(slice * kTile + te * 4 + i) * kTile + td * 4 + j] = acc[i][j];
  }
  if (with_bias && td == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) sPartBias[slice * kTile + te * 4 + i] = bias_acc[i];
  }
  __syncthreads();
  if (with_weight) {
    float* gw = w.weight_out + split * w.weight_split_stride + h * kD * kD * s.ratio;
    for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
      float sum = 0.f;
#pragma unroll
      for (int sl = 0; sl < kSlices; ++sl) sum += sPart[sl * kTile * kTile + i];
      const int ee = i / kTile, dd = i % kTile;
      gw[(int64_t(e0 + ee) * kD + d0 + dd) * s.ratio + t] = sum;
    }
  }
  if (with_bias) {
    float* gb = w.bias_out + split * w.bias_split_stride + h * kD + e0;
    for (int i = threadIdx.x; i < kTile; i += kThreads) {
      float sum = 0.f;
#pragma unroll
      for (int sl = 0; sl < kSlices; ++sl) sum += sPartBias[sl * kTile + i];
      gb[i] = sum;
    }
  }
}

constexpr int kSumThreads = 256;

// The fixed-order second pass of a split: out[i] = parts[i] + parts[n + i] + ... + parts[(splits - 1) n + i], added
// in split order by one thread per element (any grid: the order does not depend on it).
__global__ void __launch_bounds__(kSumThreads)
    sum_splits_kernel(float* __restrict__ out, const float* __restrict__ parts, int64_t n, int64_t splits) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float sum = parts[i];
    for (int64_t sp = 1; sp < splits; ++sp) sum += parts[sp * n + i];
    out[i] = sum;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------------------

constexpr int64_t kMaxGridY = 65535;  // heads per launch
// Row splits of the weight gradient (kv_compress_weight_splits): enough CTAs to fill a large GPU, on any device.
constexpr int64_t kTargetCtas = 512;
constexpr int64_t kMinChunksPerSplit = 4;  // so that a split's fixed costs (row setup, partial writes) stay small
constexpr int64_t kMaxSplits = 64;

// Shapes the kernels index with (the head dim is checked by the dispatch); the binding checks the same with
// messages naming the argument.
bool valid_shape(const KvCompressCudaParams& p) {
  const KvCompressShape& s = p.s;
  if (s.batch <= 0 || s.heads <= 0 || s.seq_k <= 0 || s.ratio <= 0) return false;
  if (s.ratio > cuda::kKvCompressMaxRatio) return false;
  if (s.seq_c != s.seq_k / s.ratio + (s.seq_k % s.ratio != 0)) return false;
  return s.seq_c <= cuda::kKvCompressMaxRows / s.batch;
}

// Calls launch(h0, heads) for consecutive chunks of at most kMaxGridY heads; stops at the first launch error.
template <typename Launch>
cudaError_t for_head_chunks(int64_t heads, Launch&& launch) {
  for (int64_t h0 = 0; h0 < heads; h0 += kMaxGridY) {
    launch(h0, unsigned(std::min(kMaxGridY, heads - h0)));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

unsigned proj_grid_x(const KvCompressShape& s) { return unsigned(ceil_div<int64_t>(s.batch * s.seq_c, kProjRows)); }

template <typename T, int kD>
cudaError_t run_forward(const KvCompressCudaParams& p, cudaStream_t stream) {
  if ((p.kc != nullptr && p.k == nullptr) || (p.vc != nullptr && p.v == nullptr)) return cudaErrorInvalidValue;
  if (p.kc == nullptr && p.vc == nullptr) return cudaSuccess;
  return for_head_chunks(p.s.heads, [&](int64_t h0, unsigned heads) {
    forward_kernel<T, kD><<<dim3(proj_grid_x(p.s), heads), ProjTraits<kD>::kThreads, 0, stream>>>(p, h0);
  });
}

// out[0, n) = the sum of the `splits` partials parts[s * n, (s + 1) * n) in split order.
cudaError_t sum_splits(float* out, const float* parts, int64_t n, int64_t splits, cudaStream_t stream) {
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div<int64_t>(n, kSumThreads), 4096));
  sum_splits_kernel<<<blocks, kSumThreads, 0, stream>>>(out, parts, n, splits);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t run_backward(const KvCompressCudaParams& p, cudaStream_t stream) {
  const KvCompressShape& s = p.s;
  const bool want_input = p.grad_k != nullptr || p.grad_v != nullptr;
  const bool want_weight = p.grad_weight != nullptr || p.grad_bias != nullptr;
  // Every pointer is checked before anything is launched.
  if ((p.grad_k != nullptr && p.grad_kc == nullptr) || (p.grad_v != nullptr && p.grad_vc == nullptr))
    return cudaErrorInvalidValue;
  if (want_weight && (p.grad_kc == nullptr || p.grad_vc == nullptr)) return cudaErrorInvalidValue;
  if (p.grad_weight != nullptr && (p.k == nullptr || p.v == nullptr)) return cudaErrorInvalidValue;
  if (want_input && p.weight == nullptr) return cudaErrorInvalidValue;  // only grad k, v read the weight
  const int64_t splits = cuda::kv_compress_weight_splits(s);
  if (p.workspace == nullptr &&
      cuda::kv_compress_backward_workspace_floats(s, p.grad_weight != nullptr, p.grad_bias != nullptr) > 0)
    return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  if (want_input) {
    err = for_head_chunks(s.heads, [&](int64_t h0, unsigned heads) {
      backward_input_kernel<T, kD><<<dim3(proj_grid_x(s), heads), ProjTraits<kD>::kThreads, 0, stream>>>(p, h0);
    });
    if (err != cudaSuccess) return err;
  }
  if (want_weight) {
    using Tr = WeightTraits<kD>;
    // Partials in the workspace: all of grad_weight's splits, then all of grad_bias's.
    const int64_t weight_floats = s.heads * kD * kD * s.ratio, bias_floats = s.heads * kD;
    float* weight_parts = splits > 1 && p.grad_weight != nullptr ? p.workspace : nullptr;
    float* bias_parts =
        splits > 1 && p.grad_bias != nullptr ? p.workspace + (weight_parts != nullptr ? splits * weight_floats : 0)
                                             : nullptr;
    WeightLaunch w{};
    w.chunks_per_split = ceil_div<int64_t>(ceil_div<int64_t>(s.batch * s.seq_c, Tr::kRows), splits);
    w.weight_out = splits > 1 ? weight_parts : p.grad_weight;
    w.weight_split_stride = splits > 1 ? weight_floats : 0;
    w.bias_out = splits > 1 ? bias_parts : p.grad_bias;
    w.bias_split_stride = splits > 1 ? bias_floats : 0;
    // Without grad_weight only the bias CTAs (t = 0, d tile 0) are launched.
    const unsigned tiles = p.grad_weight != nullptr ? unsigned(Tr::kTiles * Tr::kTiles * s.ratio) : Tr::kTiles;
    err = for_head_chunks(s.heads, [&](int64_t h0, unsigned heads) {
      w.h0 = h0;
      backward_weight_kernel<T, kD><<<dim3(tiles, heads, unsigned(splits)), Tr::kThreads, 0, stream>>>(p, w);
    });
    if (err != cudaSuccess) return err;
    if (weight_parts != nullptr) {
      err = sum_splits(p.grad_weight, weight_parts, weight_floats, splits, stream);
      if (err != cudaSuccess) return err;
    }
    if (bias_parts != nullptr) {
      err = sum_splits(p.grad_bias, bias_parts, bias_floats, splits, stream);
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace kvc

namespace cuda {

int64_t kv_compress_weight_splits(const KvCompressShape& s) {
  if (s.batch <= 0 || s.heads <= 0 || s.seq_k <= 0 || s.ratio <= 0 || s.seq_c <= 0) return 1;
  if (s.head_dim <= 0 || s.head_dim > 128) return 1;  // unsupported: the launchers refuse it
  // CTAs with rows to walk, without a split: (D / tile)^2 weight tiles per (head, tap before Nk). Saturated at the
  // target, so that nothing overflows.
  const int64_t tiles = std::max<int64_t>(1, s.head_dim / kvc::weight_tile(s.head_dim));
  const int64_t taps = std::min(s.ratio, s.seq_k);
  const int64_t per_head = tiles * tiles * std::min(taps, kvc::kTargetCtas);
  if (per_head >= kvc::kTargetCtas || s.heads >= kvc::kTargetCtas) return 1;
  const int64_t ctas = per_head * s.heads;
  const int64_t chunks = ceil_div<int64_t>(s.batch * s.seq_c, kvc::kWeightRows);
  const int64_t splits = std::max<int64_t>(
      1, std::min({ceil_div(kvc::kTargetCtas, ctas), chunks / kvc::kMinChunksPerSplit, kvc::kMaxSplits}));
  // With ceil(chunks / splits) chunks each, drop the splits that would start past the last chunk: none is empty.
  return ceil_div(chunks, ceil_div(chunks, splits));
}

int64_t kv_compress_backward_workspace_floats(const KvCompressShape& s, bool want_weight, bool want_bias) {
  const int64_t splits = kv_compress_weight_splits(s);
  if (splits == 1) return 0;
  const int64_t per_split =
      (want_weight ? s.heads * s.head_dim * s.head_dim * s.ratio : 0) + (want_bias ? s.heads * s.head_dim : 0);
  return splits * per_split;
}

int kv_compress_forward(const KvCompressCudaParams& p, CUstream_st* stream) {
  if (!kvc::valid_shape(p) || p.weight == nullptr || p.k == nullptr || p.v == nullptr) return cudaErrorInvalidValue;
  return AF2_DTYPE_SWITCH(p.dtype, T, [&] {
    return AF2_SIZE_SWITCH(p.s.head_dim, kD, [&] { return kvc::run_forward<T, kD>(p, stream); });
  });
}

int kv_compress_backward(const KvCompressCudaParams& p, CUstream_st* stream) {
  if (!kvc::valid_shape(p)) return cudaErrorInvalidValue;
  return AF2_DTYPE_SWITCH(p.dtype, T, [&] {
    return AF2_SIZE_SWITCH(p.s.head_dim, kD, [&] { return kvc::run_backward<T, kD>(p, stream); });
  });
}

}  // namespace cuda
}  // namespace af2_ext
