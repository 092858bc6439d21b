// Instantiates the key/value compression CPU kernels once per instruction set (common/cpu_isa_regions.h) and
// picks one at run time. No torch headers here: the ISA regions must not instantiate shared inline code.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "compressed_attention/compressed_attention.h"

#include "common/cpu_isa.h"

namespace af2_ext {
namespace cpu {

#define AF2_EXT_ISA_KERNEL_HEADER "compressed_attention/compressed_attention_cpu_kernel.h"
#include "common/cpu_isa_regions.h"

int64_t kv_compress_forward_num_tasks(const KvCompressShape& s) { return 2 * s.batch * s.heads; }
int64_t kv_compress_backward_input_num_tasks(const KvCompressShape& s) { return 2 * s.batch * s.heads; }
int64_t kv_compress_backward_weight_num_tasks(const KvCompressShape& s) { return s.heads * s.ratio; }

template <typename T>
void kv_compress_forward(const KvCompressCpuParams<T>& p, int64_t begin, int64_t end) {
  AF2_EXT_CPU_DISPATCH(kv_compress_forward_impl<T>, p, begin, end)
}

template <typename T>
void kv_compress_backward_input(const KvCompressCpuParams<T>& p, int64_t begin, int64_t end) {
  AF2_EXT_CPU_DISPATCH(kv_compress_backward_input_impl<T>, p, begin, end)
}

template <typename T>
void kv_compress_backward_weight(const KvCompressCpuParams<T>& p, int64_t begin, int64_t end) {
  AF2_EXT_CPU_DISPATCH(kv_compress_backward_weight_impl<T>, p, begin, end)
}

template void kv_compress_forward<float>(const KvCompressCpuParams<float>&, int64_t, int64_t);
template void kv_compress_forward<double>(const KvCompressCpuParams<double>&, int64_t, int64_t);
template void kv_compress_backward_input<float>(const KvCompressCpuParams<float>&, int64_t, int64_t);
template void kv_compress_backward_input<double>(const KvCompressCpuParams<double>&, int64_t, int64_t);
template void kv_compress_backward_weight<float>(const KvCompressCpuParams<float>&, int64_t, int64_t);
template void kv_compress_backward_weight<double>(const KvCompressCpuParams<double>&, int64_t, int64_t);

}  // namespace cpu
}  // namespace af2_ext
