// Compiles the ISA-generic kernel header named by AF2_EXT_ISA_KERNEL_HEADER once per instruction set, into
// namespaces isa_avx512 and isa_avx2 (x86 with GCC/Clang) and isa_generic, each defining kFloatLanes and the
// SIMD layer of common/cpu_simd.h. Include it inside the kernel's namespace, after <algorithm>, <cmath>,
// <cstdint>, <cstring>, <limits>, <type_traits> and common/cpu_isa.h. No include guard: one use per file.
//
// The target pragmas apply to everything in a region, so a region must not instantiate inline code that
// other translation units could share (no torch headers, no standard containers inside).
#ifndef AF2_EXT_ISA_KERNEL_HEADER
#error "define AF2_EXT_ISA_KERNEL_HEADER before including common/cpu_isa_regions.h"
#endif

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
#include AF2_EXT_ISA_KERNEL_HEADER
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
#include AF2_EXT_ISA_KERNEL_HEADER
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
#include AF2_EXT_ISA_KERNEL_HEADER
}  // namespace isa_generic
