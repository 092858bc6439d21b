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

int64_t backward_fused_num_tasks(const BlockSparseShape& s) { return s.batch * s.heads; }

bool backward_fused_applies(const BlockSparseShape& s, bool want_q, bool want_kv, bool want_bias, int num_threads) {
  if (!want_kv || !want_q) return false;  // one pass alone is cheaper than the fused one then
  if (want_bias && (s.bias_batch != s.batch || s.bias_heads != s.heads)) return false;  // shared bias rows
  // Enough (batch, head) tasks to keep every thread busy to the end; otherwise the passes' finer tasks win.
  const int64_t tasks = backward_fused_num_tasks(s);
  return tasks >= 4 * int64_t(num_threads) || tasks % num_threads == 0;
}

int64_t backward_workspace_elems(const BlockSparseShape& s) {
  return 2 * int64_t(s.block_size) * s.block_size + 3 * s.block_size * s.head_dim + 2 * s.block_size;
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

}  // namespace cpu
}  // namespace af2_ext
