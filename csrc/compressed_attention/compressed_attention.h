#pragma once
// Memory-compressed attention (Liu et al. 2018): keys and values are compressed along the sequence by the
// grouped strided 1-D convolution Conv1d(H*D, H*D, kernel=ratio, stride=ratio, groups=H), then attended by the
// block-sparse flash kernels. This header holds the parameters of the compression kernels, shared by the CPU
// and CUDA implementations. Plain C++, no torch headers.
//
// Shapes:
//   k, v:          (B, H, Nk, D), strided on (batch, head, row), the head dim contiguous
//   weight:        the convolution's (H*D, D, ratio): output channel h*D + e reads input channels h*D + d
//   bias:          (H*D,)
//   kc, vc:        (B, H, Nc, D), Nc = ceil(Nk / ratio), contiguous
//   kc[b, h, j, e] = bias[h*D + e] + sum_{t < ratio, d < D} weight[h*D + e, d, t] * k[b, h, j*ratio + t, d],
//   with k read as zero past Nk (the context is zero-padded at the end to a multiple of ratio, never copied).
#include <cstdint>

#include "block_sparse_attention/block_sparse_attention.h"  // ScalarKind, CUstream_st

namespace af2_ext {

struct KvCompressShape {
  int64_t batch = 0, heads = 0, seq_k = 0, head_dim = 0;
  int64_t ratio = 1;
  int64_t seq_c = 0;  // ceil(seq_k / ratio)
};

// ---- CPU (compressed_attention_cpu_kernel.{h,cpp}; bound in compressed_attention_cpu.cpp) ----

// T = float (fp32/fp16/bf16 inputs, upcast by the binding) or double. The binding packs the weight twice so
// that every product streams contiguous rows: weight_in_out[h][t][d][e] = weight[h*D + e, d, t] (forward)
// and weight_out_in[h][t][e][d] = weight[h*D + e, d, t] (grad of k and v).
template <typename T>
struct KvCompressCpuParams {
  KvCompressShape s;
  const T* k = nullptr;
  const T* v = nullptr;
  int64_t k_stride[3] = {0, 0, 0};  // batch, head, row; the head dim is contiguous
  int64_t v_stride[3] = {0, 0, 0};
  const T* weight_in_out = nullptr;  // (H, ratio, D, D)
  const T* weight_out_in = nullptr;  // (H, ratio, D, D)
  const T* bias = nullptr;           // (H*D) or nullptr
  T* kc = nullptr;                   // (B, H, Nc, D)
  T* vc = nullptr;
  // Backward.
  const T* grad_kc = nullptr;  // (B, H, Nc, D) contiguous
  const T* grad_vc = nullptr;
  T* grad_k = nullptr;           // (B, H, Nk, D) contiguous; nullptr: not wanted
  T* grad_v = nullptr;           // likewise
  T* grad_weight_out_in = nullptr;  // (H, ratio, D, D) laid out like weight_out_in, fully written; nullptr: not wanted
  T* grad_bias = nullptr;        // (H*D), fully written; nullptr: not wanted
};

// bf16 forward on bf16 dot products (AVX512-BF16): kc = bias + sum_t K_t W_t with K_t read in place as bf16 pairs
// along D (rows an even number of elements apart) and W_t packed in D-pairs, accumulated in fp32, written in bf16.
struct KvCompressBf16Params {
  KvCompressShape s;
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  const uint32_t* weight_pairs = nullptr;  // (H, ratio, D / 2, D): (W_t[2dp][e], W_t[2dp + 1][e]) in bf16
  const float* weight_in_out = nullptr;    // (H, ratio, D, D) in fp32: its non-finite entries reach the padding
  const float* bias = nullptr;             // (H*D) or nullptr
  uint16_t* kc = nullptr;                  // (B, H, Nc, D) bf16, contiguous
  uint16_t* vc = nullptr;
};

// out (Nc x D) += 0 * W_t for the rows j >= rows whose tap t is padding: 0 unless W_t's column e holds a NaN or
// inf, and then NaN, as the zero-padded convolution of the reference (conv1d) gives. w is W_t as [d][e]. Static: the
// ISA regions instantiate it, and no copy compiled for one instruction set may be shared with another file.
template <typename T>
static inline void add_padding_products(T* out, const T* w, int64_t rows, int64_t Nc, int64_t D) {
  for (int64_t e = 0; e < D; ++e) {
    T zero_times_w = 0;
    for (int64_t d = 0; d < D; ++d) zero_times_w += T(0) * w[d * D + e];
    if (zero_times_w != zero_times_w)
      for (int64_t j = rows; j < Nc; ++j) out[j * D + e] += zero_times_w;
  }
}

namespace cpu {

// Work is split into independent tasks, run as [begin, end) ranges by the binding's parallel loop.
// Forward: one task per (tensor k or v, batch, head).
// The bf16 forward (where cpu::bf16_kernels_available()): kv_compress_forward_num_tasks tasks, each with a
// workspace of kv_compress_bf16_workspace_floats floats.
int64_t kv_compress_bf16_workspace_floats(const KvCompressShape& s);
void kv_compress_forward_bf16(const KvCompressBf16Params& p, int64_t begin, int64_t end, float* workspace);
int64_t kv_compress_forward_num_tasks(const KvCompressShape& s);
// Grad of k and v: one task per (tensor, batch, head); every input row is written exactly once.
int64_t kv_compress_backward_input_num_tasks(const KvCompressShape& s);
// Grad of weight and bias: one task per (head, tap t), summing over batch and rows in a fixed order (the
// t = 0 task of a head also owns its bias entries): deterministic without atomics.
int64_t kv_compress_backward_weight_num_tasks(const KvCompressShape& s);

template <typename T>
void kv_compress_forward(const KvCompressCpuParams<T>& p, int64_t begin, int64_t end);
template <typename T>
void kv_compress_backward_input(const KvCompressCpuParams<T>& p, int64_t begin, int64_t end);
template <typename T>
void kv_compress_backward_weight(const KvCompressCpuParams<T>& p, int64_t begin, int64_t end);

}  // namespace cpu

// ---- CUDA (compressed_attention_kernel.cu; bound in compressed_attention_cuda.cpp) ----

// k, v, kc, vc, grad_kc, grad_vc, grad_k and grad_v are in `dtype`; weight, bias and their gradients are
// fp32 (the binding converts). Accumulation is fp32 throughout.
struct KvCompressCudaParams {
  KvCompressShape s;
  ScalarKind dtype = ScalarKind::kFloat32;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_stride[3] = {0, 0, 0};  // batch, head, row in elements; the head dim is contiguous
  int64_t v_stride[3] = {0, 0, 0};
  const float* weight = nullptr;  // (H*D, D, ratio) contiguous, the convolution's own layout
  const float* bias = nullptr;    // (H*D) or nullptr
  void* kc = nullptr;             // (B, H, Nc, D) contiguous
  void* vc = nullptr;
  // Backward. k and v are read with their strides above.
  const void* grad_kc = nullptr;  // (B, H, Nc, D) contiguous
  const void* grad_vc = nullptr;
  void* grad_k = nullptr;         // (B, H, Nk, D) contiguous; nullptr: not wanted
  void* grad_v = nullptr;         // likewise
  float* grad_weight = nullptr;   // (H*D, D, ratio) contiguous, fully written (no zeroing needed); nullptr: not wanted
  float* grad_bias = nullptr;     // (H*D), fully written; nullptr: not wanted
  // Scratch of the weight and bias gradients: cuda::kv_compress_backward_workspace_floats(s, grad_weight != nullptr,
  // grad_bias != nullptr) floats, any contents, on the kernels' device, used in order on the launch's stream; may
  // be nullptr only where that size is 0.
  float* workspace = nullptr;
};

namespace cuda {

// Hard limits of the CUDA kernels (grid.x sizes), checked again by the launchers; the binding names them first.
// Any number of heads is supported (launched in chunks of 65,535).
constexpr int64_t kKvCompressMaxRows = int64_t{64} * 2147483647;  // B * Nc: 64-row CTAs on grid.x
constexpr int64_t kKvCompressMaxRatio = 2147483647 / 16;           // <= 16 weight tiles per tap on grid.x

// The weight and bias gradients sum all B * Nc rows of a head. When the (head, tap, weight tile) CTAs are too
// few to fill a GPU, the rows are split into this many contiguous ranges, each summed by its own CTAs into a
// partial in the workspace, and the partials are added in split order by a second kernel. A function of the shape
// alone (never of the device), so the results are bitwise reproducible across GPUs; 1: no split, no workspace.
int64_t kv_compress_weight_splits(const KvCompressShape& s);
// Floats of KvCompressCudaParams::workspace that kv_compress_backward needs: the splits' partial copies of
// grad_weight and/or grad_bias; 0 without a split.
int64_t kv_compress_backward_workspace_floats(const KvCompressShape& s, bool want_weight, bool want_bias);

// Host-side launchers; they return the launch error (a cudaError_t as int, 0 = success) without syncing, and
// cudaErrorInvalidValue for a shape past the limits above or a needed pointer that is null (the workspace
// included). Deterministic: every output element is summed by one thread (or one block reduction) in an order
// fixed by the shape.
int kv_compress_forward(const KvCompressCudaParams& p, CUstream_st* stream);
int kv_compress_backward(const KvCompressCudaParams& p, CUstream_st* stream);

}  // namespace cuda
}  // namespace af2_ext
