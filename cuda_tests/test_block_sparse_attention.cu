// Tests for the block-sparse attention CUDA launchers (csrc/block_sparse_attention/block_sparse_attention_kernel.cu)
// against a dense CPU reference in double precision: forward output and lse, and the gradients of q, k, v and the
// bias. Inputs are rounded to the tested dtype first, so the reference sees exactly what the kernel sees.
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "block_sparse_attention/block_sparse_attention.h"
#include "common/cuda_utils.cuh"
#include "test_main.h"

using af2_ext::BlockSparseCudaParams;
using af2_ext::BlockSparseShape;
using af2_ext::ScalarKind;
using af2_ext::from_float;
using af2_ext::to_float;

namespace {

constexpr double kInfD = std::numeric_limits<double>::infinity();

struct Problem {
  int B = 2, H = 2, Nq = 45, Nk = 37, D = 32, bs = 16;
  int Hl = 2;                    // layout heads: 1 or H
  int Bb = 1, Hb = 1;            // bias (Bb, Hb, Nq, Nk); Bb = 0: no bias
  bool mask = true;              // random key padding mask
  bool pad_last_batch = false;   // ... with every key of the last batch row padded
  bool empty_first_row = true;   // query block 0 of layout head 0 sees nothing
  double density = 0.6;          // of the random block layout
  ScalarKind dtype = ScalarKind::kFloat32;
  ScalarKind bias_dtype = ScalarKind::kFloat32;
  int layout_mode = 0;  // q, k, v, out, grad_out: 0 contiguous, 1 (B, N, H, D + pad), 2 the same 1 element off
  unsigned seed = 1;
  bool want_q = true, want_kv = true, want_bias = true;
  int64_t max_blocks_per_launch = 0;  // > 0: every pass in several launches of at most this many CTAs

  int nqb() const { return (Nq + bs - 1) / bs; }
  int nkb() const { return (Nk + bs - 1) / bs; }
  float scale() const { return 1.0f / std::sqrt(float(D)); }
  std::string name() const {
    const char* dt[] = {"fp32", "fp16", "bf16"};
    std::ostringstream os;
    os << dt[int(dtype)] << " B=" << B << " H=" << H << " Nq=" << Nq << " Nk=" << Nk << " D=" << D << " bs=" << bs
       << " Hl=" << Hl << " bias=(" << Bb << "," << Hb << "," << dt[int(bias_dtype)] << ") mask=" << mask
       << " layout_mode=" << layout_mode;
    return os.str();
  }
};

float round_to(ScalarKind kind, float x) {
  switch (kind) {
    case ScalarKind::kFloat16: return to_float(from_float<__half>(x));
    case ScalarKind::kBFloat16: return to_float(from_float<__nv_bfloat16>(x));
    default: return x;
  }
}

std::vector<float> rounded(std::vector<float> x, ScalarKind kind) {
  for (float& v : x) v = round_to(kind, v);
  return x;
}

struct Inputs {
  std::vector<float> q, k, v, bias, grad_out;  // dense (B, H, N, D) / (Bb, Hb, Nq, Nk), rounded to their dtypes
  std::vector<uint8_t> layout;                 // (Hl, nqb, nkb)
  std::vector<uint8_t> mask;                   // (B, Nk), 1 = keep; empty without a mask
  std::vector<int32_t> row_count, row_index, col_count, col_index;
};

Inputs make_inputs(const Problem& pr) {
  Inputs in;
  const size_t nq = size_t(pr.B) * pr.H * pr.Nq * pr.D, nk = size_t(pr.B) * pr.H * pr.Nk * pr.D;
  in.q = rounded(af2_test::random_normal(nq, pr.seed * 7 + 1), pr.dtype);
  in.k = rounded(af2_test::random_normal(nk, pr.seed * 7 + 2), pr.dtype);
  in.v = rounded(af2_test::random_normal(nk, pr.seed * 7 + 3), pr.dtype);
  in.grad_out = rounded(af2_test::random_normal(nq, pr.seed * 7 + 4), pr.dtype);
  if (pr.Bb > 0)
    in.bias = rounded(af2_test::random_normal(size_t(pr.Bb) * pr.Hb * pr.Nq * pr.Nk, pr.seed * 7 + 5), pr.bias_dtype);
  std::mt19937 gen(pr.seed * 7 + 6);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const int nqb = pr.nqb(), nkb = pr.nkb();
  in.layout.assign(size_t(pr.Hl) * nqb * nkb, 0);
  for (auto& x : in.layout) x = u(gen) < pr.density;
  if (pr.empty_first_row && nqb > 1)
    for (int kb = 0; kb < nkb; ++kb) in.layout[kb] = 0;
  if (pr.mask) {
    in.mask.assign(size_t(pr.B) * pr.Nk, 0);
    for (auto& x : in.mask) x = u(gen) < 0.85;
    if (pr.pad_last_batch)
      for (int j = 0; j < pr.Nk; ++j) in.mask[size_t(pr.B - 1) * pr.Nk + j] = 0;
  }
  // ELL index and its transpose; unused entries are -1 (never read).
  in.row_count.assign(size_t(pr.Hl) * nqb, 0);
  in.row_index.assign(size_t(pr.Hl) * nqb * nkb, -1);
  in.col_count.assign(size_t(pr.Hl) * nkb, 0);
  in.col_index.assign(size_t(pr.Hl) * nkb * nqb, -1);
  for (int hl = 0; hl < pr.Hl; ++hl)
    for (int qb = 0; qb < nqb; ++qb)
      for (int kb = 0; kb < nkb; ++kb) {
        if (!in.layout[(size_t(hl) * nqb + qb) * nkb + kb]) continue;
        const size_t r = size_t(hl) * nqb + qb, c = size_t(hl) * nkb + kb;
        in.row_index[r * nkb + in.row_count[r]++] = kb;
        in.col_index[c * nqb + in.col_count[c]++] = qb;
      }
  return in;
}

// ---- dense CPU reference (double) ----

struct Reference {
  std::vector<float> out, lse, dq, dk, dv, dbias;
};

Reference reference(const Problem& pr, const Inputs& in) {
  const int B = pr.B, H = pr.H, Nq = pr.Nq, Nk = pr.Nk, D = pr.D, bs = pr.bs;
  const double scale = pr.scale();
  Reference r;
  r.out.assign(size_t(B) * H * Nq * D, 0.f);
  r.lse.assign(size_t(B) * H * Nq, 0.f);
  r.dq.assign(r.out.size(), 0.f);
  r.dk.assign(size_t(B) * H * Nk * D, 0.f);
  r.dv.assign(r.dk.size(), 0.f);
  std::vector<double> dbias(in.bias.size(), 0.0), dk(r.dk.size(), 0.0), dv(r.dv.size(), 0.0);
  std::vector<double> p(Nk), dp(Nk);
  std::vector<char> visible(Nk);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const int hl = pr.Hl == 1 ? 0 : h;
      const size_t bh = size_t(b) * H + h;
      const size_t bias_base = pr.Bb > 0 ? ((size_t(b / (B / pr.Bb)) * pr.Hb + (pr.Hb == 1 ? 0 : h)) * Nq) * Nk : 0;
      for (int i = 0; i < Nq; ++i) {
        const float* qi = &in.q[(bh * Nq + i) * D];
        const float* doi = &in.grad_out[(bh * Nq + i) * D];
        double m = -kInfD;
        for (int j = 0; j < Nk; ++j) {
          visible[j] = in.layout[(size_t(hl) * pr.nqb() + i / bs) * pr.nkb() + j / bs] &&
                       (in.mask.empty() || in.mask[size_t(b) * Nk + j]);
          if (!visible[j]) continue;
          const float* kj = &in.k[(bh * Nk + j) * D];
          double s = 0;
          for (int d = 0; d < D; ++d) s += double(qi[d]) * kj[d];
          s *= scale;
          if (pr.Bb > 0) s += in.bias[bias_base + size_t(i) * Nk + j];
          p[j] = s;
          m = std::max(m, s);
        }
        if (m == -kInfD) {  // no visible key: out = 0, lse = +inf, no gradient
          r.lse[bh * Nq + i] = float(kInfD);
          continue;
        }
        double sum = 0;
        for (int j = 0; j < Nk; ++j) sum += visible[j] ? std::exp(p[j] - m) : 0.0;
        for (int j = 0; j < Nk; ++j) p[j] = visible[j] ? std::exp(p[j] - m) / sum : 0.0;
        r.lse[bh * Nq + i] = float(m + std::log(sum));
        double delta = 0;
        for (int j = 0; j < Nk; ++j) {
          dp[j] = 0;
          if (!visible[j]) continue;
          const float* vj = &in.v[(bh * Nk + j) * D];
          for (int d = 0; d < D; ++d) dp[j] += double(doi[d]) * vj[d];
          delta += p[j] * dp[j];
        }
        for (int d = 0; d < D; ++d) {
          double o = 0, g = 0;
          for (int j = 0; j < Nk; ++j) {
            if (!visible[j]) continue;
            o += p[j] * in.v[(bh * Nk + j) * D + d];
            g += p[j] * (dp[j] - delta) * in.k[(bh * Nk + j) * D + d];
          }
          r.out[(bh * Nq + i) * D + d] = float(o);
          r.dq[(bh * Nq + i) * D + d] = float(g * scale);
        }
        for (int j = 0; j < Nk; ++j) {
          if (!visible[j]) continue;
          const double ds = p[j] * (dp[j] - delta);
          if (pr.Bb > 0) dbias[bias_base + size_t(i) * Nk + j] += ds;
          for (int d = 0; d < D; ++d) {
            dk[(bh * Nk + j) * D + d] += ds * qi[d] * scale;
            dv[(bh * Nk + j) * D + d] += p[j] * doi[d];
          }
        }
      }
    }
  r.dk.assign(dk.begin(), dk.end());
  r.dv.assign(dv.begin(), dv.end());
  r.dbias.assign(dbias.begin(), dbias.end());
  return r;
}

// ---- device side ----

// Where element (b, h, n, d) of a (B, H, N, D) tensor lives in its buffer.
struct View {
  int64_t offset = 0;
  int64_t stride[3] = {0, 0, 0};
  size_t size = 0;
};

View make_view(const Problem& pr, int N) {
  View v;
  const int64_t B = pr.B, H = pr.H, D = pr.D;
  if (pr.layout_mode == 0) {
    v.stride[0] = H * N * D;
    v.stride[1] = N * D;
    v.stride[2] = D;
    v.size = size_t(B * H * N * D);
  } else {  // (B, N, H, D + 8): rows of all heads interleaved, with a padding gap after each row
    const int64_t ld = D + 8;
    v.offset = pr.layout_mode == 2 ? 1 : 0;  // one element off: 16-byte loads are not allowed
    v.stride[0] = N * H * ld;
    v.stride[1] = ld;
    v.stride[2] = H * ld;
    v.size = size_t(v.offset + B * N * H * ld);
  }
  return v;
}

// Padding is NaN: reading it anywhere would show up in the results.
template <typename T>
std::vector<T> scatter(const std::vector<float>& dense, const Problem& pr, int N, const View& v) {
  std::vector<T> buf(v.size, from_float<T>(std::numeric_limits<float>::quiet_NaN()));
  for (int b = 0; b < pr.B; ++b)
    for (int h = 0; h < pr.H; ++h)
      for (int n = 0; n < N; ++n)
        for (int d = 0; d < pr.D; ++d)
          buf[v.offset + b * v.stride[0] + h * v.stride[1] + n * v.stride[2] + d] =
              from_float<T>(dense[((size_t(b) * pr.H + h) * N + n) * pr.D + d]);
  return buf;
}

template <typename T>
std::vector<float> gather(const std::vector<T>& buf, const Problem& pr, int N, const View& v) {
  std::vector<float> dense(size_t(pr.B) * pr.H * N * pr.D);
  for (int b = 0; b < pr.B; ++b)
    for (int h = 0; h < pr.H; ++h)
      for (int n = 0; n < N; ++n)
        for (int d = 0; d < pr.D; ++d)
          dense[((size_t(b) * pr.H + h) * N + n) * pr.D + d] =
              to_float(buf[v.offset + b * v.stride[0] + h * v.stride[1] + n * v.stride[2] + d]);
  return dense;
}

template <typename T>
std::vector<T> convert(const std::vector<float>& x) {
  std::vector<T> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = from_float<T>(x[i]);
  return y;
}

template <typename T>
std::vector<float> to_floats(const std::vector<T>& x) {
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = to_float(x[i]);
  return y;
}

struct Result {
  int forward_err = 0, backward_err = 0;
  std::vector<float> out, lse, dq, dk, dv, dbias;
  std::vector<float> dbias_again;  // a second backward: must be bitwise equal
  std::vector<float> dq_again, dk_again;
};

// The bias in its own dtype; the kernels read it through a void pointer.
struct BiasBuffer {
  std::unique_ptr<af2_test::DeviceBuffer<float>> f32;
  std::unique_ptr<af2_test::DeviceBuffer<__half>> f16;
  std::unique_ptr<af2_test::DeviceBuffer<__nv_bfloat16>> bf16;
  const void* ptr = nullptr;

  BiasBuffer(const std::vector<float>& bias, ScalarKind kind) {
    if (bias.empty()) return;
    switch (kind) {
      case ScalarKind::kFloat16:
        f16 = std::make_unique<af2_test::DeviceBuffer<__half>>(convert<__half>(bias));
        ptr = f16->get();
        break;
      case ScalarKind::kBFloat16:
        bf16 = std::make_unique<af2_test::DeviceBuffer<__nv_bfloat16>>(convert<__nv_bfloat16>(bias));
        ptr = bf16->get();
        break;
      default:
        f32 = std::make_unique<af2_test::DeviceBuffer<float>>(bias);
        ptr = f32->get();
    }
  }
};

template <typename T>
Result run_cuda(const Problem& pr, const Inputs& in) {
  Result res;
  const View qv = make_view(pr, pr.Nq), kv = make_view(pr, pr.Nk);
  af2_test::DeviceBuffer<T> q(scatter<T>(in.q, pr, pr.Nq, qv));
  af2_test::DeviceBuffer<T> k(scatter<T>(in.k, pr, pr.Nk, kv));
  af2_test::DeviceBuffer<T> v(scatter<T>(in.v, pr, pr.Nk, kv));
  af2_test::DeviceBuffer<T> grad_out(scatter<T>(in.grad_out, pr, pr.Nq, qv));
  af2_test::DeviceBuffer<T> out(std::vector<T>(qv.size, from_float<T>(std::numeric_limits<float>::quiet_NaN())));
  af2_test::DeviceBuffer<float> lse(size_t(pr.B) * pr.H * pr.Nq);
  af2_test::DeviceBuffer<float> delta(size_t(pr.B) * pr.H * pr.Nq);
  af2_test::DeviceBuffer<int32_t> row_count(in.row_count), row_index(in.row_index);
  af2_test::DeviceBuffer<int32_t> col_count(in.col_count), col_index(in.col_index);
  af2_test::DeviceBuffer<uint8_t> mask(in.mask.empty() ? std::vector<uint8_t>(1, 1) : in.mask);
  const std::vector<float> nan_q(size_t(pr.B) * pr.H * pr.Nq * pr.D, std::numeric_limits<float>::quiet_NaN());
  const std::vector<float> nan_k(size_t(pr.B) * pr.H * pr.Nk * pr.D, std::numeric_limits<float>::quiet_NaN());
  af2_test::DeviceBuffer<T> grad_q(convert<T>(nan_q)), grad_k(convert<T>(nan_k)), grad_v(convert<T>(nan_k));
  af2_test::DeviceBuffer<float> grad_bias(std::max<size_t>(in.bias.size(), 1));
  const BiasBuffer bias(in.bias, pr.bias_dtype);

  BlockSparseCudaParams p;
  BlockSparseShape& s = p.s;
  s.batch = pr.B;
  s.heads = pr.H;
  s.seq_q = pr.Nq;
  s.seq_k = pr.Nk;
  s.head_dim = pr.D;
  s.block_size = pr.bs;
  s.num_q_blocks = pr.nqb();
  s.num_k_blocks = pr.nkb();
  s.layout_heads = pr.Hl;
  s.bias_batch = pr.Bb;
  s.bias_heads = pr.Bb > 0 ? pr.Hb : 0;
  p.dtype = pr.dtype;
  p.q = q.get() + qv.offset;
  p.k = k.get() + kv.offset;
  p.v = v.get() + kv.offset;
  p.out = out.get() + qv.offset;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = qv.stride[i];
    p.k_stride[i] = kv.stride[i];
    p.v_stride[i] = kv.stride[i];
    p.out_stride[i] = qv.stride[i];
    p.grad_out_stride[i] = qv.stride[i];
  }
  p.lse = lse.get();
  p.row_count = row_count.get();
  p.row_index = row_index.get();
  p.col_count = col_count.get();
  p.col_index = col_index.get();
  p.key_padding_mask = in.mask.empty() ? nullptr : reinterpret_cast<const bool*>(mask.get());
  p.bias = bias.ptr;
  p.bias_dtype = pr.bias_dtype;
  p.scale = pr.scale();
  p.grad_out = grad_out.get() + qv.offset;
  p.delta = delta.get();
  p.grad_q = pr.want_q ? grad_q.get() : nullptr;
  p.grad_k = pr.want_kv ? grad_k.get() : nullptr;
  p.grad_v = pr.want_kv ? grad_v.get() : nullptr;
  p.grad_bias = pr.want_bias && pr.Bb > 0 ? grad_bias.get() : nullptr;
  // NaN-filled: the launcher must clear the copies it sums.
  const int64_t workspace_floats = af2_ext::block_sparse_backward_workspace_floats(s, p.grad_bias != nullptr);
  af2_test::DeviceBuffer<float> workspace(
      std::vector<float>(size_t(std::max<int64_t>(workspace_floats, 1)), std::numeric_limits<float>::quiet_NaN()));
  p.workspace = workspace_floats > 0 ? workspace.get() : nullptr;
  p.max_blocks_per_launch = pr.max_blocks_per_launch;

  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  res.forward_err = af2_ext::cuda::forward(p, stream);
  if (res.forward_err == 0) {
    CUDA_CHECK(cudaStreamSynchronize(stream));
    res.out = gather(out.to_host(), pr, pr.Nq, qv);
    res.lse = lse.to_host();
    for (int run = 0; run < 2; ++run) {
      CUDA_CHECK(cudaMemsetAsync(grad_bias.get(), 0, grad_bias.size() * sizeof(float), stream));
      res.backward_err = af2_ext::cuda::backward(p, stream);
      if (res.backward_err != 0) break;
      CUDA_CHECK(cudaStreamSynchronize(stream));
      auto& dq = run == 0 ? res.dq : res.dq_again;
      auto& dk = run == 0 ? res.dk : res.dk_again;
      auto& dbias = run == 0 ? res.dbias : res.dbias_again;
      if (pr.want_q) dq = to_floats(grad_q.to_host());
      if (pr.want_kv) {
        dk = to_floats(grad_k.to_host());
        if (run == 0) res.dv = to_floats(grad_v.to_host());
      }
      if (p.grad_bias != nullptr) dbias = grad_bias.to_host();
    }
  }
  CUDA_CHECK(cudaStreamDestroy(stream));
  return res;
}

Result run_cuda(const Problem& pr, const Inputs& in) {
  switch (pr.dtype) {
    case ScalarKind::kFloat16: return run_cuda<__half>(pr, in);
    case ScalarKind::kBFloat16: return run_cuda<__nv_bfloat16>(pr, in);
    default: return run_cuda<float>(pr, in);
  }
}

// Tolerances: |got - want| <= c * max(1, max|want|) + c * |want| with c by dtype and quantity. fp32 runs in fp32
// throughout; fp16/bf16 round P and dS to the input dtype for the tensor cores and the outputs to the dtype.
struct Tol {
  float out, lse, grad;
};
Tol tolerance(ScalarKind dtype) {
  switch (dtype) {
    case ScalarKind::kFloat16: return {4e-3f, 1e-4f, 1e-2f};
    case ScalarKind::kBFloat16: return {2e-2f, 1e-4f, 5e-2f};
    default: return {2e-5f, 1e-5f, 1e-4f};
  }
}

float max_abs(const std::vector<float>& x) {
  float m = 0.f;
  for (float v : x)
    if (std::isfinite(v)) m = std::max(m, std::fabs(v));
  return m;
}

bool close(const std::vector<float>& got, const std::vector<float>& want, float c, const std::string& what,
           const char* file, int line) {
  const float atol = c * std::max(1.f, max_abs(want));
  return af2_test::allclose(got, want, atol, c, what.c_str(), file, line);
}
#define EXPECT_CLOSE(got, want, c, what) ((void)close((got), (want), (c), (what), __FILE__, __LINE__))

// Every size fits an A100/H100 (163 KB per block or more); a device with less must refuse exactly the
// configurations whose computed shared memory exceeds its opt-in limit, with cudaErrorInvalidValue. Any other
// launch error, or a refusal of a configuration that fits, is a failure.
bool must_refuse(const Problem& pr, bool backward) {
  const int64_t limit = af2_ext::cuda::smem_optin_limit();
  EXPECT_TRUE(limit > 0);
  return af2_ext::block_sparse_cuda_smem_bytes(pr.dtype, pr.D, pr.bs, backward) > limit;
}

// Runs one problem and compares everything it computes with the reference.
void check_problem(const Problem& pr) {
  const Inputs in = make_inputs(pr);
  const Result got = run_cuda(pr, in);
  const std::string name = pr.name();
  const bool refuse_forward = must_refuse(pr, false), refuse_backward = must_refuse(pr, true);
  if (refuse_forward || (refuse_backward && got.forward_err == 0)) {
    const int err = refuse_forward ? got.forward_err : got.backward_err;
    EXPECT_EQ(err, int(cudaErrorInvalidValue));
    std::printf("  note: %s: refused by this device (shared memory %lld bytes)\n", name.c_str(),
                static_cast<long long>(af2_ext::block_sparse_cuda_smem_bytes(pr.dtype, pr.D, pr.bs, !refuse_forward)));
    return;
  }
  if (got.forward_err != 0 || got.backward_err != 0) {
    af2_test::report_failure(__FILE__, __LINE__,
                             name + ": launch failed: forward " + std::to_string(got.forward_err) + ", backward " +
                                 std::to_string(got.backward_err));
    return;
  }
  const Reference want = reference(pr, in);
  const Tol tol = tolerance(pr.dtype);
  EXPECT_CLOSE(got.out, want.out, tol.out, name + ": out");
  EXPECT_CLOSE(got.lse, want.lse, tol.lse, name + ": lse");
  if (pr.want_q) EXPECT_CLOSE(got.dq, want.dq, tol.grad, name + ": grad_q");
  if (pr.want_kv) {
    EXPECT_CLOSE(got.dk, want.dk, tol.grad, name + ": grad_k");
    EXPECT_CLOSE(got.dv, want.dv, tol.grad, name + ": grad_v");
  }
  if (pr.want_bias && pr.Bb > 0) {
    EXPECT_CLOSE(got.dbias, want.dbias, tol.grad, name + ": grad_bias");
    // No atomics: a second run gives the same bits.
    EXPECT_TRUE(got.dbias.size() == got.dbias_again.size() &&
                std::memcmp(got.dbias.data(), got.dbias_again.data(), got.dbias.size() * sizeof(float)) == 0);
  }
  EXPECT_TRUE(got.dq == got.dq_again);
  EXPECT_TRUE(got.dk == got.dk_again);
}

const ScalarKind kDtypes[] = {ScalarKind::kFloat32, ScalarKind::kFloat16, ScalarKind::kBFloat16};
const int kSizes[] = {16, 32, 64, 128};

}  // namespace

// Every dtype x head dim x block size: odd lengths, Nq != Nk, an empty layout row, a key padding mask, a shared
// (1, 1) bias, per-head layouts.
TEST_CASE(every_dtype_head_dim_block_size) {
  unsigned seed = 10;
  for (ScalarKind dtype : kDtypes)
    for (int D : kSizes)
      for (int bs : kSizes) {
        Problem pr;
        pr.dtype = dtype;
        pr.D = D;
        pr.bs = bs;
        pr.seed = ++seed;
        if (bs >= 64) {  // several blocks each way, with tails
          pr.Nq = 2 * bs + 13;
          pr.Nk = bs + 21;
          pr.B = 1;
        }
        check_problem(pr);
      }
}

// Rows with nothing visible: a fully padded batch row, empty layout rows (out = 0, lse = +inf, zero gradients,
// never NaN); shared layout (Hl = 1).
TEST_CASE(empty_rows_and_fully_padded_keys) {
  for (ScalarKind dtype : kDtypes)
    for (int bs : {16, 64}) {
      Problem pr;
      pr.dtype = dtype;
      pr.B = 3;
      pr.H = 2;
      pr.Hl = 1;
      pr.Nq = 70;
      pr.Nk = 53;
      pr.D = 64;
      pr.bs = bs;
      pr.pad_last_batch = true;
      pr.density = 0.5;
      pr.seed = 100 + bs;
      check_problem(pr);
    }
}

// Bias groups: Bb < B with Hb = 1, Bb = B with Hb = H, a low-precision bias under fp32 inputs; no bias; no mask.
TEST_CASE(bias_groups_and_dtypes) {
  unsigned seed = 200;
  for (ScalarKind dtype : kDtypes) {
    Problem pr;
    pr.dtype = dtype;
    pr.B = 4;
    pr.H = 3;
    pr.Hl = 3;
    pr.Bb = 2;
    pr.Hb = 1;
    pr.Nq = 45;
    pr.Nk = 37;
    pr.bs = 16;
    pr.seed = ++seed;
    check_problem(pr);
    pr.Bb = 4;
    pr.Hb = 3;
    pr.bs = 32;
    pr.seed = ++seed;
    check_problem(pr);
    pr.Bb = 1;
    pr.Hb = 1;
    pr.bias_dtype = dtype == ScalarKind::kFloat32 ? ScalarKind::kBFloat16 : ScalarKind::kFloat32;
    pr.seed = ++seed;
    check_problem(pr);
    pr.Bb = 0;
    pr.mask = false;
    pr.seed = ++seed;
    check_problem(pr);
  }
  Problem pr;
  pr.bias_dtype = ScalarKind::kFloat16;
  pr.seed = ++seed;
  check_problem(pr);
}

// q, k, v, out and grad_out as strided views (B, N, H, D + pad), then one element off (element-wise loads).
TEST_CASE(strided_and_unaligned_views) {
  unsigned seed = 300;
  for (ScalarKind dtype : kDtypes)
    for (int mode : {1, 2}) {
      Problem pr;
      pr.dtype = dtype;
      pr.layout_mode = mode;
      pr.D = 32;
      pr.bs = 32;
      pr.Nq = 77;
      pr.Nk = 90;
      pr.seed = ++seed;
      check_problem(pr);
    }
}

// Only some gradients wanted: the other outputs are not written (they keep their NaN fill, unchecked).
TEST_CASE(partial_gradients) {
  unsigned seed = 400;
  for (int which = 0; which < 3; ++which) {
    Problem pr;
    pr.dtype = ScalarKind::kFloat16;
    pr.want_q = which == 0;
    pr.want_kv = which == 1;
    pr.want_bias = which == 2;
    pr.seed = ++seed;
    check_problem(pr);
  }
}

// Batch x heads past the 65,535 of grid.y / grid.z (the model folds b * n rows into the batch), with a bias shared
// by every batch row: its gradient sums over all of them, split over several CTAs and added in a fixed order.
TEST_CASE(batch_beyond_grid_limit) {
  for (ScalarKind dtype : {ScalarKind::kFloat32, ScalarKind::kBFloat16}) {
    Problem pr;
    pr.dtype = dtype;
    pr.B = 65535 + 18;
    pr.H = 1;
    pr.Hl = 1;
    pr.Nq = 16;
    pr.Nk = 16;
    pr.D = 16;
    pr.bs = 16;
    pr.Bb = 1;
    pr.Hb = 1;
    pr.density = 1.0;
    pr.empty_first_row = false;
    pr.seed = 500 + int(dtype);
    BlockSparseShape s;
    s.batch = pr.B;
    s.heads = pr.H;
    s.seq_q = pr.Nq;
    s.seq_k = pr.Nk;
    s.num_q_blocks = pr.nqb();
    s.bias_batch = 1;
    s.bias_heads = 1;
    EXPECT_TRUE(af2_ext::block_sparse_bias_grad_splits(s) > 1);
    check_problem(pr);
  }
}

// Every pass split into several launches (the path past 2^31 - 1 CTAs), at odd launch sizes that cut through
// query blocks, heads, batch rows and bias splits: the same results as one launch.
TEST_CASE(several_launches_per_pass) {
  unsigned seed = 520;
  for (ScalarKind dtype : kDtypes)
    for (int64_t per_launch : {1, 5, 7}) {
      Problem pr;
      pr.dtype = dtype;
      pr.B = 3;
      pr.H = 2;
      pr.Nq = 70;
      pr.Nk = 53;
      pr.Bb = 1;
      pr.Hb = 1;
      pr.max_blocks_per_launch = per_launch;
      pr.seed = ++seed;
      check_problem(pr);
    }
}

// Heads past 65,535 (grid.y before), per-head layouts, a bias shared by all heads: its gradient sums 65,537
// members in split ranges.
TEST_CASE(heads_beyond_grid_limit) {
  Problem pr;
  pr.dtype = ScalarKind::kFloat16;
  pr.B = 1;
  pr.H = 65535 + 2;
  pr.Hl = pr.H;
  pr.Nq = 20;
  pr.Nk = 13;
  pr.D = 16;
  pr.bs = 16;
  pr.Bb = 1;
  pr.Hb = 1;
  pr.seed = 510;
  check_problem(pr);
}

// Unsupported sizes and inconsistent arguments are refused before anything is launched.
TEST_CASE(invalid_arguments) {
  Problem pr;
  const Inputs in = make_inputs(pr);
  af2_test::DeviceBuffer<float> q(in.q), k(in.k), v(in.k), out(in.q), grad_out(in.q);
  af2_test::DeviceBuffer<float> lse(in.q.size()), delta(in.q.size());
  af2_test::DeviceBuffer<int32_t> row_count(in.row_count), row_index(in.row_index);
  af2_test::DeviceBuffer<int32_t> col_count(in.col_count), col_index(in.col_index);
  BlockSparseCudaParams p;
  p.s.batch = pr.B;
  p.s.heads = pr.H;
  p.s.seq_q = pr.Nq;
  p.s.seq_k = pr.Nk;
  p.s.head_dim = pr.D;
  p.s.block_size = pr.bs;
  p.s.num_q_blocks = pr.nqb();
  p.s.num_k_blocks = pr.nkb();
  p.s.layout_heads = pr.Hl;
  p.q = q.get();
  p.k = k.get();
  p.v = v.get();
  p.out = out.get();
  for (int i = 0; i < 3; ++i) {
    const int64_t st[3] = {int64_t(pr.H) * pr.Nq * pr.D, int64_t(pr.Nq) * pr.D, pr.D};
    const int64_t sk[3] = {int64_t(pr.H) * pr.Nk * pr.D, int64_t(pr.Nk) * pr.D, pr.D};
    p.q_stride[i] = p.out_stride[i] = p.grad_out_stride[i] = st[i];
    p.k_stride[i] = p.v_stride[i] = sk[i];
  }
  p.lse = lse.get();
  p.row_count = row_count.get();
  p.row_index = row_index.get();
  p.col_count = col_count.get();
  p.col_index = col_index.get();
  p.grad_out = grad_out.get();
  p.delta = delta.get();
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  EXPECT_EQ(af2_ext::cuda::forward(p, stream), 0);  // the baseline is valid
  CUDA_CHECK(cudaStreamSynchronize(stream));

  BlockSparseCudaParams bad = p;
  bad.s.head_dim = 48;
  EXPECT_EQ(af2_ext::cuda::forward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.s.block_size = 8;
  bad.s.num_q_blocks = (pr.Nq + 7) / 8;
  bad.s.num_k_blocks = (pr.Nk + 7) / 8;
  EXPECT_EQ(af2_ext::cuda::forward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.s.num_q_blocks += 1;  // inconsistent with Nq and the block size
  EXPECT_EQ(af2_ext::cuda::forward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.dtype = static_cast<ScalarKind>(7);
  EXPECT_EQ(af2_ext::cuda::forward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.s.layout_heads = 3;
  EXPECT_EQ(af2_ext::cuda::forward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.grad_k = q.get();  // grad_k without grad_v
  EXPECT_EQ(af2_ext::cuda::backward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.grad_bias = lse.get();  // grad_bias without a bias shape
  EXPECT_EQ(af2_ext::cuda::backward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;  // a bias shared by all B * H = 4 members, 3 query blocks: split, so a workspace is needed
  bad.s.bias_batch = 1;
  bad.s.bias_heads = 1;
  bad.bias = lse.get();
  bad.grad_bias = lse.get();
  EXPECT_TRUE(af2_ext::block_sparse_backward_workspace_floats(bad.s, true) > 0);
  EXPECT_EQ(af2_ext::cuda::backward(bad, stream), int(cudaErrorInvalidValue));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  CUDA_CHECK(cudaStreamDestroy(stream));
}

// ---- non-finite values: a NaN reaches exactly what it touches; nothing a masked key holds reaches anything ----

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInfF = std::numeric_limits<float>::infinity();

// Whether query i of (b, h) sees key j: its layout block and the key padding mask.
bool sees(const Problem& pr, const Inputs& in, int b, int h, int i, int j) {
  const int hl = pr.Hl == 1 ? 0 : h;
  return in.layout[(size_t(hl) * pr.nqb() + i / pr.bs) * pr.nkb() + j / pr.bs] &&
         (in.mask.empty() || in.mask[size_t(b) * pr.Nk + j]);
}

// got is non-finite exactly where `bad` is set and elsewhere bit for bit the clean run's value.
void expect_only_at(const std::vector<float>& got, const std::vector<float>& clean, const std::vector<char>& bad,
                    const std::string& what) {
  if (got.size() != clean.size() || got.size() != bad.size()) {
    af2_test::report_failure(__FILE__, __LINE__,
                             what + ": sizes " + std::to_string(got.size()) + ", " + std::to_string(clean.size()) +
                                 ", " + std::to_string(bad.size()));
    return;
  }
  size_t wrong = 0, first = 0;
  for (size_t e = 0; e < got.size(); ++e) {
    const bool ok = bad[e] ? !std::isfinite(got[e]) : std::memcmp(&got[e], &clean[e], sizeof(float)) == 0;
    if (!ok && wrong++ == 0) first = e;
  }
  if (wrong == 0) return;
  std::ostringstream os;
  os << what << ": " << wrong << "/" << got.size() << " wrong, first at [" << first << "]: got " << got[first]
     << ", clean run " << clean[first] << ", expected " << (bad[first] ? "non-finite" : "the clean value");
  af2_test::report_failure(__FILE__, __LINE__, os.str());
}

Result run_checked(const Problem& pr, const Inputs& in) {
  Result r = run_cuda(pr, in);
  if (r.forward_err != 0 || r.backward_err != 0)
    af2_test::report_failure(__FILE__, __LINE__,
                             pr.name() + ": launch failed: forward " + std::to_string(r.forward_err) + ", backward " +
                                 std::to_string(r.backward_err));
  return r;
}

}  // namespace

// A NaN in one element of one query row: that row's output and lse, its grad_q row, the grad_k and grad_v rows of
// the keys it sees and its bias-gradient entries at those keys are non-finite; everything else is the clean run's,
// bit for bit (the kernels used to return zeros for the row: a NaN-dropping max and a `sum > 0` test).
TEST_CASE(nan_in_a_query_row) {
  for (ScalarKind dtype : kDtypes) {
    Problem pr;
    pr.dtype = dtype;
    pr.seed = 600 + int(dtype);
    const Inputs clean_in = make_inputs(pr);
    const int b = 1, h = 1;
    int i = -1;
    for (int r = pr.bs; r < pr.Nq && i < 0; ++r)
      for (int j = 0; j < pr.Nk && i < 0; ++j)
        if (sees(pr, clean_in, b, h, r, j)) i = r;
    CHECK(i >= 0);
    Inputs in = clean_in;
    in.q[((size_t(b) * pr.H + h) * pr.Nq + i) * pr.D + 3] = kNaN;
    const Result clean = run_checked(pr, clean_in), got = run_checked(pr, in);
    if (clean.forward_err != 0 || clean.backward_err != 0 || got.forward_err != 0 || got.backward_err != 0) continue;
    const size_t row = (size_t(b) * pr.H + h) * pr.Nq + i;
    std::vector<char> out_bad(got.out.size(), 0), lse_bad(got.lse.size(), 0);
    std::vector<char> key_bad(got.dk.size(), 0), bias_bad(got.dbias.size(), 0);
    for (int d = 0; d < pr.D; ++d) out_bad[row * pr.D + d] = 1;
    lse_bad[row] = 1;
    for (int j = 0; j < pr.Nk; ++j) {
      if (!sees(pr, in, b, h, i, j)) continue;
      for (int d = 0; d < pr.D; ++d) key_bad[((size_t(b) * pr.H + h) * pr.Nk + j) * pr.D + d] = 1;
      bias_bad[size_t(i) * pr.Nk + j] = 1;  // the (1, 1) bias is shared by every batch row and head
    }
    const std::string name = pr.name() + ", NaN in q row " + std::to_string(i);
    expect_only_at(got.out, clean.out, out_bad, name + ": out");
    expect_only_at(got.lse, clean.lse, lse_bad, name + ": lse");
    expect_only_at(got.dq, clean.dq, out_bad, name + ": grad_q");
    expect_only_at(got.dk, clean.dk, key_bad, name + ": grad_k");
    expect_only_at(got.dv, clean.dv, key_bad, name + ": grad_v");
    expect_only_at(got.dbias, clean.dbias, bias_bad, name + ": grad_bias");
  }
}

// NaN and inf in the k and v rows of padded keys (inside visited blocks) and in the bias at their columns and
// outside the layout: every output and gradient is the clean run's, bit for bit, and the padded keys' gradients are
// zero (a padded v row used to enter P·V as 0 * NaN, poisoning the block's rows).
TEST_CASE(nan_in_masked_keys) {
  for (ScalarKind dtype : kDtypes) {
    Problem pr;
    pr.dtype = dtype;
    pr.Bb = pr.B;  // a bias per batch row and head: a padded key's column can be poisoned in its row alone
    pr.Hb = pr.H;
    pr.seed = 610 + int(dtype);
    const Inputs clean_in = make_inputs(pr);
    Inputs in = clean_in;
    int padded = 0;
    std::vector<char> no_bad_q(clean_in.q.size(), 0), no_bad_k(clean_in.k.size(), 0);
    std::vector<char> no_bad_lse(size_t(pr.B) * pr.H * pr.Nq, 0), no_bad_bias(clean_in.bias.size(), 0);
    for (int b = 0; b < pr.B; ++b)
      for (int h = 0; h < pr.H; ++h)
        for (int i = 0; i < pr.Nq; ++i)
          for (int j = 0; j < pr.Nk; ++j) {
            const bool kept = in.mask[size_t(b) * pr.Nk + j] != 0;
            const size_t bias_at = ((size_t(b) * pr.H + h) * pr.Nq + i) * pr.Nk + j;
            if (!kept || !sees(pr, in, b, h, i, j)) in.bias[bias_at] = kNaN;
            if (kept || i > 0) continue;
            ++padded;
            for (int d = 0; d < pr.D; ++d) {
              const size_t at = ((size_t(b) * pr.H + h) * pr.Nk + j) * pr.D + d;
              in.k[at] = d == 0 ? kInfF : kNaN;
              in.v[at] = d == 1 ? kNaN : (d == 2 ? -kInfF : kInfF);
            }
          }
    CHECK(padded > 0);
    const Result clean = run_checked(pr, clean_in), got = run_checked(pr, in);
    if (clean.forward_err != 0 || clean.backward_err != 0 || got.forward_err != 0 || got.backward_err != 0) continue;
    const std::string name = pr.name() + ", NaN / inf at masked keys";
    expect_only_at(got.out, clean.out, no_bad_q, name + ": out");
    expect_only_at(got.lse, clean.lse, no_bad_lse, name + ": lse");
    expect_only_at(got.dq, clean.dq, no_bad_q, name + ": grad_q");
    expect_only_at(got.dk, clean.dk, no_bad_k, name + ": grad_k");
    expect_only_at(got.dv, clean.dv, no_bad_k, name + ": grad_v");
    expect_only_at(got.dbias, clean.dbias, no_bad_bias, name + ": grad_bias");
    for (int b = 0; b < pr.B; ++b)
      for (int j = 0; j < pr.Nk; ++j) {
        if (in.mask[size_t(b) * pr.Nk + j]) continue;
        for (int h = 0; h < pr.H; ++h)
          for (int d = 0; d < pr.D; ++d) {
            const size_t at = ((size_t(b) * pr.H + h) * pr.Nk + j) * pr.D + d;
            EXPECT_TRUE(got.dk[at] == 0.f && got.dv[at] == 0.f);
          }
      }
  }
}

AF2_TEST_MAIN()
