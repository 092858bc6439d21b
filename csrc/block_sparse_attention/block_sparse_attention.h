#pragma once
// Block-sparse attention: parameters shared by the CPU and CUDA kernels. Plain C++, no torch headers.
//
// Shapes (all tensors contiguous unless a stride is given):
//   q, out: (B, H, Nq, D)      k, v: (B, H, Nk, D)      lse: (B, H, Nq)
//   layout index, "ELL" form with Hl = 1 or H layout heads:
//     row_count (Hl, nqb)        row_index (Hl, nqb, nkb): the first row_count entries of each row are the
//     col_count (Hl, nkb)        col_index (Hl, nkb, nqb): key (query) blocks to visit, ascending
//   bias: (Bb, Hb, Nq, Nk), Hb = 1 or H; batch row b reads bias row b / (B / Bb)
#include <cstdint>

namespace af2_ext {

struct BlockSparseShape {
  int64_t batch = 0, heads = 0, seq_q = 0, seq_k = 0, head_dim = 0;
  int block_size = 0;
  int64_t num_q_blocks = 0, num_k_blocks = 0;
  int64_t layout_heads = 1;   // 1 (shared) or heads
  int64_t bias_batch = 0;     // 0 when there is no bias
  int64_t bias_heads = 0;
};

// CPU kernels work in T = float (fp32/fp16/bf16 inputs, upcast by the binding) or double.
// mask_add is (B, Nk): 0 for a visible key, -inf for a padded one; nullptr without a key padding mask.
// q, k, v (and grad_out) are read at any {batch, head, row} strides in elements with a contiguous head dim (the
// (B, N, H, D) storage attention modules produce needs no copy); outputs and workspaces are contiguous.
template <typename T>
struct BlockSparseCpuForward {
  BlockSparseShape s;
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  const T* bias = nullptr;
  const T* mask_add = nullptr;
  const int32_t* row_count = nullptr;
  const int32_t* row_index = nullptr;
  T scale = 1;
  T* out = nullptr;
  T* lse = nullptr;  // +inf for a row with no visible key
};

template <typename T>
struct BlockSparseCpuBackward {
  BlockSparseShape s;
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  const T* grad_out = nullptr;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t grad_out_stride[3] = {0, 0, 0};
  const T* lse = nullptr;    // (B, H, Nq)
  const T* delta = nullptr;  // (B, H, Nq): rowsum(grad_out * out)
  const T* bias = nullptr;
  const T* mask_add = nullptr;
  const int32_t* row_count = nullptr;
  const int32_t* row_index = nullptr;
  const int32_t* col_count = nullptr;
  const int32_t* col_index = nullptr;
  T scale = 1;
  T* grad_q = nullptr;     // nullptr: not wanted
  T* grad_k = nullptr;     // grad_k and grad_v are wanted together or not at all
  T* grad_v = nullptr;
  T* grad_bias = nullptr;  // (Bb, Hb, Nq, Nk), zero-initialised by the caller; nullptr: not wanted
  // (B, H, num_q_blocks, D, block_size) workspaces filled by backward_prepare: scale * Q and grad_out, one
  // transposed, zero-padded block each, so both passes read every query block contiguously.
  T* q_t_blocks = nullptr;
  T* grad_out_t_blocks = nullptr;
};

namespace cpu {

// Work is split into independent tasks; each function runs tasks [begin, end) with `workspace` of at least
// *_workspace_elems(shape) elements of T, private to the calling thread.
int64_t forward_num_tasks(const BlockSparseShape& s);
int64_t forward_workspace_elems(const BlockSparseShape& s);
// Fills q_t_blocks and grad_out_t_blocks; one task per (batch, head, query block). Runs before both passes.
int64_t backward_prepare_num_tasks(const BlockSparseShape& s);
// Row pass: grad_q and grad_bias. A task owns whole bias rows, so the bias gradient is summed over the
// batch rows and heads that share it in a fixed order: deterministic without atomics.
int64_t backward_rows_num_tasks(const BlockSparseShape& s, bool with_grad_bias);
// Column pass: grad_k and grad_v, one task per (batch, head, key block).
int64_t backward_cols_num_tasks(const BlockSparseShape& s);
int64_t backward_workspace_elems(const BlockSparseShape& s);

template <typename T>
void forward(const BlockSparseCpuForward<T>& p, int64_t begin, int64_t end, T* workspace);
template <typename T>
void backward_prepare(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end);
template <typename T>
void backward_rows(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* workspace);
template <typename T>
void backward_cols(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* workspace);

// Name of the instruction set the CPU kernels dispatch to on this machine ("avx512", "avx2" or "generic").
const char* isa_name();

}  // namespace cpu

// ---- CUDA (block_sparse_attention_kernel.cu; bound to torch in block_sparse_attention_cuda.cpp) ----

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Tensors keep their dtype (`dtype`, fp32 accumulation inside). q, k, v, out and grad_out may be strided on
// (batch, head, row): `*_stride` = {batch, head, row} in elements; the head dim is contiguous. Everything
// else is contiguous. Index values are trusted to be in range by the kernels only after the binding has
// validated them; kernels still skip out-of-range blocks rather than read out of bounds.
struct BlockSparseCudaParams {
  BlockSparseShape s;
  ScalarKind dtype = ScalarKind::kFloat32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t out_stride[3] = {0, 0, 0};
  float* lse = nullptr;  // (B, H, Nq) fp32; +inf for a row with no visible key
  const int32_t* row_count = nullptr;
  const int32_t* row_index = nullptr;
  const int32_t* col_count = nullptr;
  const int32_t* col_index = nullptr;
  const bool* key_padding_mask = nullptr;  // (B, Nk), true = keep; nullptr = all kept
  const void* bias = nullptr;              // (Bb, Hb, Nq, Nk) contiguous, in bias_dtype; nullptr = none
  ScalarKind bias_dtype = ScalarKind::kFloat32;
  float scale = 1.f;
  // Backward only.
  const void* grad_out = nullptr;
  int64_t grad_out_stride[3] = {0, 0, 0};
  float* delta = nullptr;    // (B, H, Nq) fp32 workspace: rowsum(grad_out * out)
  void* grad_q = nullptr;    // (B, H, Nq, D) contiguous, dtype; nullptr: not wanted
  void* grad_k = nullptr;    // (B, H, Nk, D) contiguous, dtype; grad_k and grad_v are wanted together
  void* grad_v = nullptr;
  float* grad_bias = nullptr;  // (Bb, Hb, Nq, Nk) fp32, zeroed by the caller; nullptr: not wanted
};

}  // namespace af2_ext

struct CUstream_st;  // cudaStream_t is CUstream_st*; declared here so this header needs no CUDA headers

namespace af2_ext {
namespace cuda {

// Host-side launchers; they return the launch error (a cudaError_t as int, 0 = success) without syncing.
int forward(const BlockSparseCudaParams& p, CUstream_st* stream);
int backward(const BlockSparseCudaParams& p, CUstream_st* stream);

}  // namespace cuda
}  // namespace af2_ext
