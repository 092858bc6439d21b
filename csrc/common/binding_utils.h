#pragma once
// Helpers every torch binding (csrc/<op>/<op>_cpu.cpp, <op>_cuda.cpp) shares: the CPU kernels' compute dtype,
// staging of strided inputs, and the {batch, head, row} strides the kernels read. Host-only; needs torch.
#include <torch/types.h>

#include <cstdint>

namespace af2_ext {

// The CPU kernels compute in fp64 for fp64 inputs and in fp32 for everything else.
inline at::ScalarType cpu_accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// In `dtype`, read in place at its strides when the last (head) dim is contiguous (the usual (B, N, H, D)
// storage of attention modules), copied otherwise.
inline at::Tensor staged(const at::Tensor& t, at::ScalarType dtype) {
  auto out = t.to(dtype);
  return out.stride(-1) == 1 ? out : out.contiguous();
}

// The kernels need a unit stride on the head dim; anything else is copied once.
inline at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// A bf16 (B, H, N, D) tensor as the bf16 CPU kernels read it, rows in 32-bit pairs: head dim contiguous and rows an
// even number of elements apart; copied otherwise.
inline at::Tensor even_rows(const at::Tensor& t) {
  auto out = unit_last_stride(t);
  return out.stride(2) % 2 == 0 ? out : out.contiguous();
}

inline const uint16_t* bf16_bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

inline uint16_t* bf16_bits_mut(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// {batch, head, row} strides of a (B, H, N, D) tensor, in elements.
inline void set_strides(int64_t (&dst)[3], const at::Tensor& t) {
  dst[0] = t.stride(0);
  dst[1] = t.stride(1);
  dst[2] = t.stride(2);
}

}  // namespace af2_ext
