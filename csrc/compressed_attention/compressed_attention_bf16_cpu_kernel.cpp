// Key/value compression forward in bf16 on the CPU's bf16 dot products (AVX512-BF16), compiled for that ISA and run
// only where cpu::bf16_kernels_available(). No torch headers here.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "compressed_attention/compressed_attention.h"

#include "common/cpu_isa.h"

#if AF2_EXT_X86_DISPATCH
#include <immintrin.h>
#endif

namespace af2_ext {
namespace cpu {

#define AF2_EXT_BF16_KERNEL_HEADER "compressed_attention/compressed_attention_bf16_cpu_kernel.h"
#include "common/cpu_bf16_region.h"

int64_t kv_compress_bf16_workspace_floats(const KvCompressShape& s) { return s.seq_c * s.head_dim; }

void kv_compress_forward_bf16(const KvCompressBf16Params& p, int64_t begin, int64_t end, float* workspace) {
#if AF2_EXT_X86_DISPATCH
  isa_avx512_bf16::kv_compress_forward_bf16_impl(p, begin, end, workspace);
#else
  (void)p, (void)begin, (void)end, (void)workspace;
  std::abort();  // unreachable: bf16_kernels_available() is false
#endif
}

}  // namespace cpu
}  // namespace af2_ext
