// Compile-time dispatch for the CUDA launchers, in the style of flash-attention's static_switch.h: each case
// binds a compile-time name and calls the lambda; an unsupported value returns cudaErrorInvalidValue (the
// torch binding has already named it in a TORCH_CHECK, and cuda_tests check the error).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// ScalarKind (block_sparse_attention.h) -> T in {float, __half, __nv_bfloat16}.
#define AF2_DTYPE_SWITCH(KIND, T, ...)   \
  [&]() -> cudaError_t {                 \
    switch (KIND) {                      \
      case ScalarKind::kFloat32: {       \
        using T = float;                 \
        return __VA_ARGS__();            \
      }                                  \
      case ScalarKind::kFloat16: {       \
        using T = __half;                \
        return __VA_ARGS__();            \
      }                                  \
      case ScalarKind::kBFloat16: {      \
        using T = __nv_bfloat16;         \
        return __VA_ARGS__();            \
      }                                  \
    }                                    \
    return cudaErrorInvalidValue;        \
  }()

// The power-of-two sizes the kernels are built for, 16 / 32 / 64 / 128 (head dim, block size).
#define AF2_SIZE_SWITCH(VALUE, NAME, ...) \
  [&]() -> cudaError_t {                  \
    switch (VALUE) {                      \
      case 16: {                          \
        constexpr static int NAME = 16;   \
        return __VA_ARGS__();             \
      }                                   \
      case 32: {                          \
        constexpr static int NAME = 32;   \
        return __VA_ARGS__();             \
      }                                   \
      case 64: {                          \
        constexpr static int NAME = 64;   \
        return __VA_ARGS__();             \
      }                                   \
      case 128: {                         \
        constexpr static int NAME = 128;  \
        return __VA_ARGS__();             \
      }                                   \
    }                                     \
    return cudaErrorInvalidValue;         \
  }()
