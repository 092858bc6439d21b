// The bf16 block-sparse attention CPU kernels (block_sparse_attention_bf16_cpu_kernel.h), compiled for AVX-512 with
// AVX512-BF16 and run only where the CPU has it (cpu::bf16_kernels_available). No torch headers here.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "block_sparse_attention/block_sparse_attention.h"

#include "common/cpu_isa.h"

#if AF2_EXT_X86_DISPATCH
#include <immintrin.h>
#endif

namespace af2_ext {
namespace cpu {

#define AF2_EXT_BF16_KERNEL_HEADER "block_sparse_attention/block_sparse_attention_bf16_cpu_kernel.h"
#include "common/cpu_bf16_region.h"

int64_t forward_bf16_workspace_floats(const BlockSparseShape& s) {
#if AF2_EXT_X86_DISPATCH
  // kKeyChunk scores and (kKeyChunk / 2) probability pairs per query, the output block, the query pairs, 4 rows.
  constexpr int64_t kChunk = isa_avx512_bf16::kKeyChunk;
  const int64_t bs = s.block_size, D = s.head_dim;
  return kChunk * bs + bs * D + (D / 2) * bs + (kChunk / 2) * bs + 4 * bs;
#else
  (void)s;
  return 0;
#endif
}

int64_t backward_bf16_workspace_floats(const BlockSparseShape& s) {
#if AF2_EXT_X86_DISPATCH
  return isa_avx512_bf16::backward_bf16_workspace_elems_impl(s);
#else
  (void)s;
  return 0;
#endif
}

void backward_fused_bf16(const BlockSparseCpuBackwardBf16& p, int64_t begin, int64_t end, float* workspace) {
#if AF2_EXT_X86_DISPATCH
  isa_avx512_bf16::backward_fused_bf16_impl(p, begin, end, workspace);
#else
  (void)p, (void)begin, (void)end, (void)workspace;
  std::abort();  // unreachable: bf16_kernels_available() is false
#endif
}

void pack_v_pairs_bf16(const PackVPairsBf16& p, int64_t begin, int64_t end) {
#if AF2_EXT_X86_DISPATCH
  isa_avx512_bf16::pack_v_pairs_bf16_impl(p, begin, end);
#else
  (void)p, (void)begin, (void)end;
  std::abort();  // unreachable: bf16_kernels_available() is false
#endif
}

void forward_bf16(const BlockSparseCpuForwardBf16& p, int64_t begin, int64_t end, float* workspace) {
#if AF2_EXT_X86_DISPATCH
  isa_avx512_bf16::forward_bf16_impl(p, begin, end, workspace);
#else
  (void)p, (void)begin, (void)end, (void)workspace;
  std::abort();  // unreachable: bf16_kernels_available() is false
#endif
}

}  // namespace cpu
}  // namespace af2_ext
