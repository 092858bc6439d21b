// Compiles the bf16 kernel header named by AF2_EXT_BF16_KERNEL_HEADER for AVX-512 with AVX512-BF16, into namespace
// isa_avx512_bf16 (with kFloatLanes = 16, common/cpu_simd.h and the dot GEMM of common/cpu_bf16_dot.h), on x86
// with GCC/Clang; nothing elsewhere. Include it inside the kernel's namespace, after <algorithm>, <cmath>, <cstdint>,
// <cstring>, <limits>, <type_traits>, <immintrin.h> (x86) and common/cpu_isa.h; call into it only where
// cpu::bf16_kernels_available(). No include guard: one use per file.
#ifndef AF2_EXT_BF16_KERNEL_HEADER
#error "define AF2_EXT_BF16_KERNEL_HEADER before including common/cpu_bf16_region.h"
#endif

#if AF2_EXT_X86_DISPATCH
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma")
#endif
namespace isa_avx512_bf16 {
constexpr int kFloatLanes = 16;
#include "common/cpu_simd.h"
#include "common/cpu_bf16_dot.h"
#include AF2_EXT_BF16_KERNEL_HEADER
}  // namespace isa_avx512_bf16
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // AF2_EXT_X86_DISPATCH
