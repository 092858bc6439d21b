// Instantiates the block-sparse attention CPU kernels once per instruction set (common/cpu_isa_regions.h) and
// picks one at run time. No torch headers here: the ISA regions must not instantiate shared inline code.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "block_sparse_attention/block_sparse_attention.h"

#include "common/cpu_isa.h"

namespace af2_ext {
namespace cpu {

#define AF2_EXT_ISA_KERNEL_HEADER "block_sparse_attention/block_sparse_attention_cpu_kernel.h"
#include "common/cpu_isa_regions.h"

const char* isa_name() {
  switch (active_isa()) {
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

int64_t forward_num_tasks(const BlockSparseShape& s) { return s.batch * s.heads * s.num_q_blocks; }

int64_t forward_workspace_elems(const BlockSparseShape& s) {
  return int64_t(s.block_size) * s.block_size + 3 * s.block_size * s.head_dim + 4 * s.block_size;
}

int64_t backward_prepare_num_tasks(const BlockSparseShape& s) { return s.batch * s.heads * s.num_q_blocks; }

int64_t backward_rows_num_tasks(const BlockSparseShape& s, bool with_grad_bias) {
  return (with_grad_bias ? s.bias_batch * s.bias_heads : s.batch * s.heads) * s.num_q_blocks;
}

int64_t backward_cols_num_tasks(const BlockSparseShape& s) { return s.batch * s.heads * s.num_k_blocks; }

int64_t backward_fused_bias_splits(const BlockSparseShape& s, bool with_grad_bias) {
  if (!with_grad_bias || s.bias_batch <= 0 || s.bias_heads <= 0) return 0;
  const int64_t members = (s.batch / s.bias_batch) * (s.heads / s.bias_heads);
  if (members == 1) return 0;
  // Enough tasks for a many-core CPU, partial sums of at most 16 Mi elements (64 MiB in fp32); from the shape
  // alone, so that the bias gradient's bits do not depend on the machine.
  constexpr int64_t kTargetTasks = 32, kMaxPartialElems = int64_t(16) << 20;
  const int64_t groups = s.bias_batch * s.bias_heads, bias_elems = groups * s.seq_q * s.seq_k;
  int64_t splits = std::min(members, (kTargetTasks + groups - 1) / groups);
  splits = std::min(splits, std::max<int64_t>(1, kMaxPartialElems / std::max<int64_t>(1, bias_elems)));
  return std::max<int64_t>(1, splits);
}

int64_t backward_fused_num_tasks(const BlockSparseShape& s, bool with_grad_bias) {
  const int64_t splits = backward_fused_bias_splits(s, with_grad_bias);
  return splits == 0 ? s.batch * s.heads : splits * s.bias_batch * s.bias_heads;
}

int64_t backward_fused_reduce_num_tasks(const BlockSparseShape& s) { return s.bias_batch * s.bias_heads * s.seq_k; }

bool backward_fused_stages_queries(const BlockSparseShape& s) { return s.seq_q >= s.seq_k; }

bool backward_fused_applies(const BlockSparseShape& s, bool want_q, bool want_kv, bool want_bias, int num_threads) {
  if (!want_kv || !want_q) return false;  // one pass alone is cheaper than the fused one then
  // Enough tasks to keep every thread busy to the end; otherwise the passes' finer tasks win.
  const int64_t tasks = backward_fused_num_tasks(s, want_bias);
  return tasks >= 4 * int64_t(num_threads) || tasks % num_threads == 0;
}

int64_t backward_workspace_elems(const BlockSparseShape& s) {
  return 2 * int64_t(s.block_size) * s.block_size + 5 * s.block_size * s.head_dim + 2 * s.block_size;
}

template <typename T>
void forward(const BlockSparseCpuForward<T>& p, int64_t begin, int64_t end, T* workspace) {
  AF2_EXT_CPU_DISPATCH(forward_impl<T>, p, begin, end, workspace)
}

template <typename T>
void backward_prepare(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end) {
  AF2_EXT_CPU_DISPATCH(backward_prepare_impl<T>, p, begin, end)
}

template <typename T>
void backward_rows(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* workspace) {
  AF2_EXT_CPU_DISPATCH(backward_rows_impl<T>, p, begin, end, workspace)
}

template <typename T>
void backward_cols(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* workspace) {
  AF2_EXT_CPU_DISPATCH(backward_cols_impl<T>, p, begin, end, workspace)
}

template <typename T>
void backward_fused(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end, T* workspace) {
  AF2_EXT_CPU_DISPATCH(backward_fused_impl<T>, p, begin, end, workspace)
}

template <typename T>
void backward_fused_reduce_bias(const BlockSparseCpuBackward<T>& p, int64_t begin, int64_t end) {
  AF2_EXT_CPU_DISPATCH(backward_fused_reduce_bias_impl<T>, p, begin, end)
}

template void forward<float>(const BlockSparseCpuForward<float>&, int64_t, int64_t, float*);
template void forward<double>(const BlockSparseCpuForward<double>&, int64_t, int64_t, double*);
template void backward_prepare<float>(const BlockSparseCpuBackward<float>&, int64_t, int64_t);
template void backward_prepare<double>(const BlockSparseCpuBackward<double>&, int64_t, int64_t);
template void backward_rows<float>(const BlockSparseCpuBackward<float>&, int64_t, int64_t, float*);
template void backward_rows<double>(const BlockSparseCpuBackward<double>&, int64_t, int64_t, double*);
template void backward_cols<float>(const BlockSparseCpuBackward<float>&, int64_t, int64_t, float*);
template void backward_cols<double>(const BlockSparseCpuBackward<double>&, int64_t, int64_t, double*);
template void backward_fused<float>(const BlockSparseCpuBackward<float>&, int64_t, int64_t, float*);
template void backward_fused<double>(const BlockSparseCpuBackward<double>&, int64_t, int64_t, double*);
template void backward_fused_reduce_bias<float>(const BlockSparseCpuBackward<float>&, int64_t, int64_t);
template void backward_fused_reduce_bias<double>(const BlockSparseCpuBackward<double>&, int64_t, int64_t);

}  // namespace cpu
}  // namespace af2_ext
