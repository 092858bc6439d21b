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
// mask_add is (B, Nk): 0 for a visible key, -inf for a padded one (read as a flag: the kernels set a padded key's
// logit to -inf by a select, never by adding it to a score that may be NaN); nullptr without a key padding mask.
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
  const T* bias_t = nullptr;  // (Bb, Hb, Nk, Nq): the bias transposed, read contiguously along the queries
  const T* mask_add = nullptr;
  // (B, H, num_k_blocks): 1 where a padded key of the block holds a non-finite k or v, the only blocks whose k / v
  // rows the kernels must read through a copy with the padded rows zeroed (0 * NaN is not 0); nullptr: every
  // block with a padded key is copied.
  const uint8_t* padded_nonfinite = nullptr;
  const int32_t* row_count = nullptr;
  const int32_t* row_index = nullptr;
  T scale = 1;
  T* out = nullptr;
  int64_t out_stride[3] = {0, 0, 0};  // {batch, head, row}; a row's D values are contiguous
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
  const T* bias_t = nullptr;  // (Bb, Hb, Nk, Nq): the bias transposed, read contiguously along the queries
  const T* mask_add = nullptr;
  // (B, H, num_k_blocks): 1 where a padded key of the block holds a non-finite k or v, the only blocks whose k / v
  // rows the kernels must read through a copy with the padded rows zeroed (0 * NaN is not 0); nullptr: every
  // block with a padded key is copied.
  const uint8_t* padded_nonfinite = nullptr;
  const int32_t* row_count = nullptr;
  const int32_t* row_index = nullptr;
  const int32_t* col_count = nullptr;
  const int32_t* col_index = nullptr;
  T scale = 1;
  T* grad_q = nullptr;     // nullptr: not wanted
  T* grad_k = nullptr;     // grad_k and grad_v are wanted together or not at all
  T* grad_v = nullptr;
  int64_t grad_q_stride[3] = {0, 0, 0};  // {batch, head, row}; a row's D elements are contiguous
  int64_t grad_k_stride[3] = {0, 0, 0};
  int64_t grad_v_stride[3] = {0, 0, 0};
  T* grad_bias = nullptr;  // (Bb, Hb, Nq, Nk), zero-initialised by the caller; nullptr: not wanted
  // (B, H, num_q_blocks, D, block_size) workspaces filled by backward_prepare: scale * Q and grad_out, one
  // transposed, zero-padded block each, so both passes read every query block contiguously.
  T* q_t_blocks = nullptr;
  T* grad_out_t_blocks = nullptr;
  // Fused pass with a bias gradient shared by several (batch row, head) members: (bias_splits, Bb, Hb, Nk, Nq)
  // zero-initialised partial sums (see backward_fused_bias_splits); nullptr otherwise.
  T* bias_partials = nullptr;
  int64_t bias_splits = 0;
};

// bf16 forward on bf16 dot-product instructions (AVX512-BF16 vdpbf16ps): q, k and the output stay bf16 (raw
// bits), v comes packed in key pairs, scores, softmax and accumulation are fp32, and the probabilities are rounded
// to bf16 for the product with v, as flash kernels do. mask_add and bias_t as in BlockSparseCpuForward<float>.
struct BlockSparseCpuForwardBf16 {
  BlockSparseShape s;
  const uint16_t* q = nullptr;
  const uint16_t* k = nullptr;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  // (B, H, ceil(Nk / 2), D), contiguous: element (u, d) holds v[2u, d] (low half) and v[2u + 1, d] (high half),
  // a padded key's (or the odd tail's missing key's) half zero; see pack_v_pairs_bf16.
  const uint32_t* v_pairs = nullptr;
  const float* bias_t = nullptr;
  const float* mask_add = nullptr;
  const int32_t* row_count = nullptr;
  const int32_t* row_index = nullptr;
  float scale = 1;
  uint16_t* out = nullptr;
  int64_t out_stride[3] = {0, 0, 0};
  float* lse = nullptr;
};

// Input of pack_v_pairs_bf16: v (bf16 bits) at {batch, head, row} strides, the key padding mask (or nullptr).
struct PackVPairsBf16 {
  BlockSparseShape s;
  const uint16_t* v = nullptr;
  int64_t v_stride[3] = {0, 0, 0};
  const float* mask_add = nullptr;
  uint32_t* v_pairs = nullptr;
};

// bf16 backward on bf16 dot products, the fused pass (see backward_fused_*; keys outer where seq_q < seq_k, each
// query block staged again for every key block it meets):
// q, k, v, grad_out read in place as bf16 (k's and v's rows an even number of elements apart), k packed in key
// pairs like v in the forward; P and dS are recomputed and kept in fp32 and rounded to bf16 for the three gradient
// products; every gradient accumulates in fp32 and is rounded to bf16 once. lse, delta, bias_t, mask_add, the bias
// gradient and its partial sums are fp32, as in BlockSparseCpuBackward<float>.
struct BlockSparseCpuBackwardBf16 {
  BlockSparseShape s;
  const uint16_t* q = nullptr;
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  const uint16_t* grad_out = nullptr;
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t grad_out_stride[3] = {0, 0, 0};
  const uint32_t* k_pairs = nullptr;  // (B, H, ceil(Nk / 2), D), as PackVPairsBf16 makes of v
  const float* lse = nullptr;          // (B, H, Nq)
  const float* delta = nullptr;        // (B, H, Nq)
  const float* bias_t = nullptr;
  const float* mask_add = nullptr;
  const int32_t* row_count = nullptr;
  const int32_t* row_index = nullptr;
  const int32_t* col_count = nullptr;
  const int32_t* col_index = nullptr;
  float scale = 1;
  uint16_t* grad_q = nullptr;  // bf16 gradients at {batch, head, row} strides, rows of D contiguous
  uint16_t* grad_k = nullptr;
  uint16_t* grad_v = nullptr;
  int64_t grad_q_stride[3] = {0, 0, 0};
  int64_t grad_k_stride[3] = {0, 0, 0};
  int64_t grad_v_stride[3] = {0, 0, 0};
  float* grad_bias = nullptr;      // as BlockSparseCpuBackward<float>
  float* bias_partials = nullptr;  // as BlockSparseCpuBackward<float>
  int64_t bias_splits = 0;
};

namespace cpu {

// The bf16 kernels run where cpu::bf16_kernels_available() (common/cpu_isa.h).
int64_t forward_bf16_workspace_floats(const BlockSparseShape& s);
// One task per (batch, head) of pack_v_pairs_bf16, per (batch, head, query block) of forward_bf16.
void pack_v_pairs_bf16(const PackVPairsBf16& p, int64_t begin, int64_t end);
void forward_bf16(const BlockSparseCpuForwardBf16& p, int64_t begin, int64_t end, float* workspace);
// The fused backward in bf16: valid where backward_fused_applies holds; its tasks are backward_fused_num_tasks's,
// followed (with bias partials) by backward_fused_reduce_bias<float>.
int64_t backward_bf16_workspace_floats(const BlockSparseShape& s);
void backward_fused_bf16(const BlockSparseCpuBackwardBf16& p, int64_t begin, int64_t end, float* workspace);

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
// Fused pass: every gradient in one pass, five products per block pair against the two passes' seven. One task
// per (batch, head), or, with a bias gradient shared by several batch rows or heads, per (bias block, range of
// its members) with partial sums reduced afterwards in a fixed order (backward_fused_reduce_bias, one task per
// key of each bias block). Valid when grad_q, grad_k and grad_v are wanted; chosen when its tasks also keep
// num_threads busy (always for num_threads = 1).
int64_t backward_fused_bias_splits(const BlockSparseShape& s, bool with_grad_bias);  // 0: no partials
int64_t backward_fused_num_tasks(const BlockSparseShape& s, bool with_grad_bias);
int64_t backward_fused_reduce_num_tasks(const BlockSparseShape& s);
bool backward_fused_applies(const BlockSparseShape& s, bool want_q, bool want_kv, bool want_bias, int num_threads);
// The fused pass with queries outer transposes each query block in its workspace and reads neither q_t_blocks
// nor grad_out_t_blocks (backward_prepare is skipped); with keys outer it reads them.
bool backward_fused_stages_queries(const BlockSparseShape& s);
int64_t backward_workspace_elems(const BlockSparseShape& s);

template <typename T>
void forward(const BlockSparseCpuForward<T>& p, int64_t begin, int64_t end, T* workspace);
template <typename T>
void backward_prepare(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end);
template <typename T>
void backward_rows(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* workspace);
template <typename T>
void backward_cols(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* workspace);
template <typename T>
void backward_fused(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* workspace);
template <typename T>
void backward_fused_reduce_bias(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end);

// Name of the instruction set the CPU kernels dispatch to on this machine ("avx512_bf16", "avx512", "avx2" or
// "generic").
const char* isa_name();

}  // namespace cpu

// ---- CUDA (block_sparse_attention_kernel.cu; bound to torch in block_sparse_attention_cuda.cpp) ----

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Tiling of the CUDA kernels, in plain C++ so that the host (bindings, the Python fallback decision, cuda_tests)
// computes the shared memory a configuration needs from the same numbers the kernels are compiled with
// (block_sparse_attention_kernel.cuh's Traits). A CTA owns one layout block of `block` rows, one warp per 16 rows;
// the other side is visited in chunks of bsa_chunk rows; shared tiles are rows x D with rows padded by 16 bytes.
// `simt`: fp32 (CUDA cores, with a per-warp fp32 staging tile); otherwise fp16/bf16 on tensor cores.
namespace bsa_tiles {
// Chunks of 64 rows, 32 at D = 128 (registers), 16 for fp32 at D = 128 with 128-row blocks: the backward's two
// fp32 (128 x 128) block tiles leave room for no more within an A100's 163 KB of shared memory.
constexpr int max_chunk(bool simt, int d, int block) { return d < 128 ? 64 : (simt && block >= 128 ? 16 : 32); }
constexpr int chunk(bool simt, int d, int block) {
  return block < max_chunk(simt, d, block) ? block : max_chunk(simt, d, block);
}
constexpr int ld(int elem_bytes, int d) { return d + 16 / elem_bytes; }
constexpr int scratch_ld(bool simt, int d, int block) { return chunk(simt, d, block) + 4; }
constexpr int scratch_floats(bool simt, int d, int block) {
  return simt ? (block / 16) * 16 * scratch_ld(simt, d, block) : 0;
}
// Dynamic shared memory of each kernel, in bytes.
constexpr int64_t forward_smem(int elem_bytes, bool simt, int d, int block) {
  return int64_t(block + 2 * chunk(simt, d, block)) * ld(elem_bytes, d) * elem_bytes +
         int64_t(scratch_floats(simt, d, block)) * 4;
}
constexpr int64_t backward_cols_smem(int elem_bytes, bool simt, int d, int block) {
  return int64_t(2 * block + 2 * chunk(simt, d, block)) * ld(elem_bytes, d) * elem_bytes +
         int64_t(2 * chunk(simt, d, block)) * 4 + int64_t(scratch_floats(simt, d, block)) * 4;
}
constexpr int64_t backward_rows_smem(int elem_bytes, bool simt, int d, int block) {
  return int64_t(2 * block + 2 * chunk(simt, d, block)) * ld(elem_bytes, d) * elem_bytes +
         int64_t(scratch_floats(simt, d, block)) * 4;
}
}  // namespace bsa_tiles

// Bytes of dynamic shared memory one CTA needs for `dtype`, head dim and block size: of the forward kernel, or
// with `backward` the largest of the forward and both backward kernels (what a training step needs). -1 for an
// unsupported size. A device whose opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin) is smaller cannot run
// that configuration; the binding refuses it with a message naming the sizes.
constexpr int64_t block_sparse_cuda_smem_bytes(ScalarKind dtype, int64_t head_dim, int64_t block_size,
                                               bool backward) {
  const bool sizes_ok = (head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128) &&
                        (block_size == 16 || block_size == 32 || block_size == 64 || block_size == 128);
  if (!sizes_ok) return -1;
  const bool simt = dtype == ScalarKind::kFloat32;
  const int elem = simt ? 4 : 2, d = int(head_dim), bs = int(block_size);
  const int64_t fwd = bsa_tiles::forward_smem(elem, simt, d, bs);
  if (!backward) return fwd;
  const int64_t cols = bsa_tiles::backward_cols_smem(elem, simt, d, bs);
  const int64_t rows = bsa_tiles::backward_rows_smem(elem, simt, d, bs);
  const int64_t bwd = cols > rows ? cols : rows;
  return fwd > bwd ? fwd : bwd;
}

// Tensors keep their dtype (`dtype`, fp32 accumulation inside). q, k, v, out and grad_out may be strided on
// (batch, head, row): `*_stride` = {batch, head, row} in elements; the head dim is contiguous. Everything
// else is contiguous. The kernels trust the index values (ascending, in range) — ops.py builds the index from a
// bool layout and checks it once when it is cached, so there is no host sync per call — but they still skip an
// out-of-range block rather than read out of bounds.
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
  // With grad_bias: block_sparse_backward_workspace_floats(s, true) floats (any content; the launcher clears
  // it), or nullptr when that is 0.
  float* workspace = nullptr;
  // Flattened work items per kernel launch: 0 = the hardware's 2^31 - 1. Tests set a small value so that the
  // multi-launch path (work item offsets) runs on ordinary shapes.
  int64_t max_blocks_per_launch = 0;
};

// The bias gradient sums dS over the (B / Bb) * (H / Hb) batch rows and heads that share a bias block. The row
// pass splits those members into this many contiguous ranges, one CTA each per query block, so that a bias shared
// by many rows (the model folds rows into the batch) still fills the GPU; each range adds into its own fp32 copy
// of grad_bias in the workspace, and a second pass sums the copies in range order. Chosen from the shape alone
// (never the device), so the gradient's bits do not depend on the GPU it ran on. 1 = no workspace.
inline int64_t block_sparse_bias_grad_splits(const BlockSparseShape& s) {
  if (s.bias_batch <= 0 || s.bias_heads <= 0 || s.num_q_blocks <= 0) return 1;
  constexpr int64_t kTargetCtas = 1024;                        // a few waves on the largest GPUs
  constexpr int64_t kMaxSplits = 128;                          // bounds the second pass's reads
  constexpr int64_t kMaxWorkspaceFloats = int64_t(32) << 20;   // 128 MiB of fp32 copies at most
  const int64_t members = (s.batch / s.bias_batch) * (s.heads / s.bias_heads);
  const int64_t ctas = s.num_q_blocks * s.bias_batch * s.bias_heads;
  const int64_t bias_elems = s.bias_batch * s.bias_heads * s.seq_q * s.seq_k;
  int64_t splits = (kTargetCtas + ctas - 1) / ctas;
  if (splits > members) splits = members;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (bias_elems > 0 && splits > kMaxWorkspaceFloats / bias_elems) splits = kMaxWorkspaceFloats / bias_elems;
  return splits < 1 ? 1 : splits;
}
inline int64_t block_sparse_backward_workspace_floats(const BlockSparseShape& s, bool with_grad_bias) {
  const int64_t splits = with_grad_bias ? block_sparse_bias_grad_splits(s) : 1;
  return splits > 1 ? splits * s.bias_batch * s.bias_heads * s.seq_q * s.seq_k : 0;
}

}  // namespace af2_ext

struct CUstream_st;  // cudaStream_t is CUstream_st*; declared here so this header needs no CUDA headers

namespace af2_ext {
namespace cuda {

// Host-side launchers; they return the launch error (a cudaError_t as int, 0 = success) without syncing.
// A configuration whose shared memory (block_sparse_cuda_smem_bytes) exceeds the device's opt-in limit returns
// cudaErrorInvalidValue and launches nothing.
int forward(const BlockSparseCudaParams& p, CUstream_st* stream);
int backward(const BlockSparseCudaParams& p, CUstream_st* stream);

// The current device's opt-in shared memory per block in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin),
// queried once per device; -1 if it cannot be queried.
int64_t smem_optin_limit();

}  // namespace cuda
}  // namespace af2_ext
