// Instantiates the CPU kernels once per instruction set and picks one at run time, so a single wheel runs
// AVX-512 code where the CPU has it and stays correct on any x86-64 (or non-x86) CPU. No torch headers here:
// the ISA regions must not instantiate inline code that other translation units could share.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "block_sparse_attention/block_sparse_attention.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define AF2_EXT_X86_DISPATCH 1
#endif

namespace af2_ext {
namespace cpu {

#if AF2_EXT_X86_DISPATCH
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#endif
namespace isa_avx512 {
constexpr int kFloatLanes = 16;
#include "common/cpu_simd.h"
#include "block_sparse_attention/block_sparse_attention_cpu_kernel.h"
}  // namespace isa_avx512
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace isa_avx2 {
constexpr int kFloatLanes = 8;
#include "common/cpu_simd.h"
#include "block_sparse_attention/block_sparse_attention_cpu_kernel.h"
}  // namespace isa_avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // AF2_EXT_X86_DISPATCH

namespace isa_generic {
constexpr int kFloatLanes = 4;
#include "common/cpu_simd.h"
#include "block_sparse_attention/block_sparse_attention_cpu_kernel.h"
}  // namespace isa_generic

namespace {

enum class Isa { generic, avx2, avx512 };

Isa detect_isa() {
  Isa best = Isa::generic;
#if AF2_EXT_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = Isa::avx512;
#endif
  // AF2_EXT_CPU_ISA=generic|avx2|avx512 lowers the choice (for tests and comparisons); never raises it.
  if (const char* env = std::getenv("AF2_EXT_CPU_ISA")) {
    const std::string want(env);
    Isa asked = want == "generic" ? Isa::generic : want == "avx2" ? Isa::avx2 : Isa::avx512;
    if (asked < best) best = asked;
  }
  return best;
}

Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

}  // namespace

#if AF2_EXT_X86_DISPATCH
#define AF2_EXT_CPU_DISPATCH(fn, ...)                                  \
  switch (active_isa()) {                                              \
    case Isa::avx512: return isa_avx512::fn(__VA_ARGS__);              \
    case Isa::avx2: return isa_avx2::fn(__VA_ARGS__);                  \
    default: return isa_generic::fn(__VA_ARGS__);                      \
  }
#else
#define AF2_EXT_CPU_DISPATCH(fn, ...) return isa_generic::fn(__VA_ARGS__);
#endif

const char* isa_name() {
  switch (active_isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

int64_t forward_num_tasks(const BlockSparseShape& s) { return s.batch * s.heads * s.num_q_blocks; }

int64_t forward_workspace_elems(const BlockSparseShape& s) {
  return int64_t(s.block_size) * s.block_size + 2 * s.block_size * s.head_dim + 4 * s.block_size;
}

int64_t backward_prepare_num_tasks(const BlockSparseShape& s) { return s.batch * s.heads * s.num_q_blocks; }

int64_t backward_rows_num_tasks(const BlockSparseShape& s, bool with_grad_bias) {
  return (with_grad_bias ? s.bias_batch * s.bias_heads : s.batch * s.heads) * s.num_q_blocks;
}

int64_t backward_cols_num_tasks(const BlockSparseShape& s) { return s.batch * s.heads * s.num_k_blocks; }

int64_t backward_workspace_elems(const BlockSparseShape& s) {
  return 2 * int64_t(s.block_size) * s.block_size + 2 * s.block_size * s.head_dim + 2 * s.block_size;
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

template void forward<float>(const BlockSparseCpuForward<float>&, int64_t, int64_t, float*);
template void forward<double>(const BlockSparseCpuForward<double>&, int64_t, int64_t, double*);
template void backward_prepare<float>(const BlockSparseCpuBackward<float>&, int64_t, int64_t);
template void backward_prepare<double>(const BlockSparseCpuBackward<double>&, int64_t, int64_t);
template void backward_rows<float>(const BlockSparseCpuBackward<float>&, int64_t, int64_t, float*);
template void backward_rows<double>(const BlockSparseCpuBackward<double>&, int64_t, int64_t, double*);
template void backward_cols<float>(const BlockSparseCpuBackward<float>&, int64_t, int64_t, float*);
template void backward_cols<double>(const BlockSparseCpuBackward<double>&, int64_t, int64_t, double*);

}  // namespace cpu
}  // namespace af2_ext
