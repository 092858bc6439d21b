// Every af2_ext schema, defined once. Implementations register per dispatch key in their own files
// (<op>_cpu.cpp, <op>_cuda.cpp); the Python package loads this library through the empty PyInit__C below.
#include <Python.h>
#include <torch/library.h>

#include "block_sparse_attention/block_sparse_attention.h"
#include "compressed_attention/compressed_attention.h"

extern "C" {
// Importing af2_ext._C runs the static TORCH_LIBRARY registrations; the module itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(af2_ext, m) {
  // Returns (out (B, H, Nq, D), lse (B, H, Nq) in fp32, fp64 for fp64 inputs). col_count/col_index are not
  // read by the forward; they are inputs so that autograd can hand them to the backward.
  m.def(
      "block_sparse_attention_forward(Tensor q, Tensor k, Tensor v, Tensor row_count, Tensor row_index, "
      "Tensor col_count, Tensor col_index, int block_size, Tensor? key_padding_mask, Tensor? bias, "
      "float scale) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v, grad_bias); a gradient whose output_mask entry is false comes back as
  // an empty tensor.
  m.def(
      "block_sparse_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor row_count, Tensor row_index, Tensor col_count, Tensor col_index, int block_size, "
      "Tensor? key_padding_mask, Tensor? bias, float scale, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Key/value compression of memory-compressed attention (see compressed_attention.h): returns (kc, vc),
  // (B, H, ceil(Nk / ratio), D) in k's dtype. weight (H*D, D, ratio) and bias (H*D) may be any floating dtype.
  m.def("kv_compress_forward(Tensor k, Tensor v, Tensor weight, Tensor? bias, int ratio) -> (Tensor, Tensor)");
  // Returns (grad_k, grad_v, grad_weight, grad_bias) in the dtypes of k, v, weight and bias; a gradient whose
  // output_mask entry is false (or grad_bias without a bias) comes back as an empty tensor.
  m.def(
      "kv_compress_backward(Tensor grad_kc, Tensor grad_vc, Tensor k, Tensor v, Tensor weight, Tensor? bias, "
      "int ratio, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // Fused coupling steps of reversible recompute (see reversible/reversible.h), in place: x += f; and
  // y -= f with grad += vjp in one pass. f and vjp may be in the buffer's dtype or float32.
  m.def("coupling_forward_(Tensor(a!) x, Tensor f) -> ()");
  m.def("coupling_backward_(Tensor(a!) y, Tensor f, Tensor(b!) grad, Tensor vjp) -> ()");
  // Bytes of shared memory per block the CUDA kernels need for (dtype, head dim, block size), forward only or
  // the whole training step (block_sparse_cuda_smem_bytes); -1 for an unsupported size or dtype. Host
  // arithmetic only, so a CPU-only build answers too; ops.py compares it with the GPU's opt-in limit.
  m.def("block_sparse_attention_cuda_smem_bytes(ScalarType dtype, int head_dim, int block_size, bool backward) -> int",
        [](c10::ScalarType dtype, int64_t head_dim, int64_t block_size, bool backward) -> int64_t {
          af2_ext::ScalarKind kind;
          switch (dtype) {
            case c10::ScalarType::Float: kind = af2_ext::ScalarKind::kFloat32; break;
            case c10::ScalarType::Half: kind = af2_ext::ScalarKind::kFloat16; break;
            case c10::ScalarType::BFloat16: kind = af2_ext::ScalarKind::kBFloat16; break;
            default: return -1;
          }
          return af2_ext::block_sparse_cuda_smem_bytes(kind, head_dim, block_size, backward);
        });
  // The instruction set the CPU kernels run with on this machine: "avx512", "avx2" or "generic".
  m.def("cpu_isa() -> str", []() { return std::string(af2_ext::cpu::isa_name()); });
}
