#pragma once
// Run-time choice of the instruction set for the CPU kernels. Each *_cpu_kernel.cpp compiles its kernel bodies
// once per ISA (common/cpu_isa_regions.h) and calls them through AF2_EXT_CPU_DISPATCH, so one wheel runs
// AVX-512 code where the CPU has it and stays correct on any x86-64 (or non-x86) CPU.
#include <cstdlib>
#include <string>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define AF2_EXT_X86_DISPATCH 1
#endif

namespace af2_ext {
namespace cpu {

// Ordered: each level has everything below it. avx512_bf16 adds the bf16 dot products (vdpbf16ps) that the bf16
// kernels use; the fp32 / fp64 kernels run their avx512 code there.
enum class Isa { generic, avx2, avx512, avx512_bf16 };

inline Isa detect_isa() {
  Isa best = Isa::generic;
#if AF2_EXT_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    best = Isa::avx512;
    if (__builtin_cpu_supports("avx512bf16")) best = Isa::avx512_bf16;
  }
#endif
  // AF2_EXT_CPU_ISA=generic|avx2|avx512|avx512_bf16 lowers the choice (for tests and comparisons); never raises it.
  if (const char* env = std::getenv("AF2_EXT_CPU_ISA")) {
    const std::string want(env);
    Isa asked = want == "generic" ? Isa::generic
                : want == "avx2"  ? Isa::avx2
                : want == "avx512" ? Isa::avx512
                                   : Isa::avx512_bf16;
    if (asked < best) best = asked;
  }
  return best;
}

// Decided once per process (an inline function's static is shared by every translation unit).
inline Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// Whether the bf16 kernels (bf16 dot products, *_bf16_cpu_kernel.cpp) run here: the CPU has AVX512-BF16 and
// AF2_EXT_CPU_ISA does not lower the choice below "avx512_bf16". Otherwise bf16 inputs are computed by the fp32
// kernels on fp32 copies.
inline bool bf16_kernels_available() { return active_isa() >= Isa::avx512_bf16; }

}  // namespace cpu
}  // namespace af2_ext

// `return isa_<active>::fn(args...)`, for use inside namespace af2_ext::cpu after cpu_isa_regions.h.
#if AF2_EXT_X86_DISPATCH
#define AF2_EXT_CPU_DISPATCH(fn, ...)                     \
  switch (active_isa()) {                                 \
    case Isa::avx512_bf16:                                \
    case Isa::avx512: return isa_avx512::fn(__VA_ARGS__); \
    case Isa::avx2: return isa_avx2::fn(__VA_ARGS__);     \
    default: return isa_generic::fn(__VA_ARGS__);         \
  }
#else
#define AF2_EXT_CPU_DISPATCH(fn, ...) return isa_generic::fn(__VA_ARGS__);
#endif
