// Tests for the key/value compression CUDA launchers (csrc/compressed_attention/compressed_attention_kernel.cu)
// against a CPU reference in double precision: kc, vc and the gradients of k, v, weight and bias. Inputs are
// rounded to the tested dtype first, so the reference sees exactly what the kernel sees. Also: the weight
// gradient's row splits (workspace partials summed in a second pass), more heads than grid.y holds, and the
// launchers' refusals.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/cuda_utils.cuh"
#include "compressed_attention/compressed_attention.h"
#include "test_main.h"

using af2_ext::KvCompressCudaParams;
using af2_ext::KvCompressShape;
using af2_ext::ScalarKind;
using af2_ext::from_float;
using af2_ext::to_float;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr size_t kGuard = 256;  // NaN elements on both sides of every output: a stray write shows up there

struct Problem {
  int B = 2, H = 2, Nk = 37, D = 32, ratio = 2;
  ScalarKind dtype = ScalarKind::kFloat32;
  bool bias = true;
  int layout_mode = 0;  // k, v: 0 contiguous, 1 (B, Nk, H, D + 8), 2 the same one element off
  bool want_kc = true, want_vc = true;
  bool want_k = true, want_v = true, want_weight = true, want_bias = true;
  unsigned seed = 1;

  int Nc() const { return (Nk + ratio - 1) / ratio; }
  KvCompressShape shape() const {
    KvCompressShape s;
    s.batch = B;
    s.heads = H;
    s.seq_k = Nk;
    s.head_dim = D;
    s.ratio = ratio;
    s.seq_c = Nc();
    return s;
  }
  std::string name() const {
    const char* dt[] = {"fp32", "fp16", "bf16"};
    std::ostringstream os;
    os << dt[int(dtype)] << " B=" << B << " H=" << H << " Nk=" << Nk << " D=" << D << " ratio=" << ratio
       << " bias=" << bias << " layout_mode=" << layout_mode << " want=" << want_kc << want_vc << "/" << want_k
       << want_v << want_weight << want_bias;
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
  std::vector<float> k, v;              // dense (B, H, Nk, D), rounded to the dtype
  std::vector<float> weight, bias;      // (H*D, D, ratio), (H*D) or empty: fp32
  std::vector<float> grad_kc, grad_vc;  // (B, H, Nc, D), rounded to the dtype
};

Inputs make_inputs(const Problem& pr) {
  Inputs in;
  const size_t nk = size_t(pr.B) * pr.H * pr.Nk * pr.D, nc = size_t(pr.B) * pr.H * pr.Nc() * pr.D;
  const size_t nw = size_t(pr.H) * pr.D * pr.D * pr.ratio;
  in.k = rounded(af2_test::random_normal(nk, pr.seed * 7 + 1), pr.dtype);
  in.v = rounded(af2_test::random_normal(nk, pr.seed * 7 + 2), pr.dtype);
  in.weight = af2_test::random_normal(nw, pr.seed * 7 + 3, 1.0f / std::sqrt(float(pr.D * pr.ratio)));
  if (pr.bias) in.bias = af2_test::random_normal(size_t(pr.H) * pr.D, pr.seed * 7 + 4);
  in.grad_kc = rounded(af2_test::random_normal(nc, pr.seed * 7 + 5), pr.dtype);
  in.grad_vc = rounded(af2_test::random_normal(nc, pr.seed * 7 + 6), pr.dtype);
  return in;
}

// ---- CPU reference (double), straight from the formulas in compressed_attention.h ----

struct Reference {
  std::vector<float> kc, vc, grad_k, grad_v, grad_weight, grad_bias;
};

Reference reference(const Problem& pr, const Inputs& in) {
  const int B = pr.B, H = pr.H, Nk = pr.Nk, D = pr.D, r = pr.ratio, Nc = pr.Nc();
  const auto w = [&](int h, int e, int d, int t) { return double(in.weight[((size_t(h) * D + e) * D + d) * r + t]); };
  const auto at = [&](const std::vector<float>& x, int b, int h, int n, int N, int d) {
    return double(x[((size_t(b) * H + h) * N + n) * D + d]);
  };
  std::vector<double> kc(size_t(B) * H * Nc * D), vc(kc.size()), gk(size_t(B) * H * Nk * D), gv(gk.size());
  std::vector<double> gw(in.weight.size(), 0.0), gb(size_t(H) * D, 0.0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      for (int j = 0; j < Nc; ++j)
        for (int e = 0; e < D; ++e) {
          double sk = pr.bias ? in.bias[size_t(h) * D + e] : 0.0, sv = sk;
          for (int t = 0; t < r && j * r + t < Nk; ++t)
            for (int d = 0; d < D; ++d) {
              sk += w(h, e, d, t) * at(in.k, b, h, j * r + t, Nk, d);
              sv += w(h, e, d, t) * at(in.v, b, h, j * r + t, Nk, d);
            }
          kc[((size_t(b) * H + h) * Nc + j) * D + e] = sk;
          vc[((size_t(b) * H + h) * Nc + j) * D + e] = sv;
          const double gkc = at(in.grad_kc, b, h, j, Nc, e), gvc = at(in.grad_vc, b, h, j, Nc, e);
          gb[size_t(h) * D + e] += gkc + gvc;
          for (int t = 0; t < r && j * r + t < Nk; ++t)
            for (int d = 0; d < D; ++d)
              gw[((size_t(h) * D + e) * D + d) * r + t] +=
                  gkc * at(in.k, b, h, j * r + t, Nk, d) + gvc * at(in.v, b, h, j * r + t, Nk, d);
        }
      for (int n = 0; n < Nk; ++n)
        for (int d = 0; d < D; ++d) {
          double sk = 0, sv = 0;
          for (int e = 0; e < D; ++e) {
            sk += w(h, e, d, n % r) * at(in.grad_kc, b, h, n / r, Nc, e);
            sv += w(h, e, d, n % r) * at(in.grad_vc, b, h, n / r, Nc, e);
          }
          gk[((size_t(b) * H + h) * Nk + n) * D + d] = sk;
          gv[((size_t(b) * H + h) * Nk + n) * D + d] = sv;
        }
    }
  Reference ref;
  ref.kc.assign(kc.begin(), kc.end());
  ref.vc.assign(vc.begin(), vc.end());
  ref.grad_k.assign(gk.begin(), gk.end());
  ref.grad_v.assign(gv.begin(), gv.end());
  ref.grad_weight.assign(gw.begin(), gw.end());
  ref.grad_bias.assign(gb.begin(), gb.end());
  return ref;
}

// ---- device side ----

// Where element (b, h, n, d) of k or v lives in its buffer.
struct View {
  int64_t offset = 0;
  int64_t stride[3] = {0, 0, 0};
  size_t size = 0;
};

View make_view(const Problem& pr) {
  View v;
  const int64_t B = pr.B, H = pr.H, N = pr.Nk, D = pr.D;
  if (pr.layout_mode == 0) {
    v.stride[0] = H * N * D;
    v.stride[1] = N * D;
    v.stride[2] = D;
    v.size = size_t(B * H * N * D);
  } else {  // (B, N, H, D + 8): rows of all heads interleaved, with a padding gap after each row
    const int64_t ld = D + 8;
    v.offset = pr.layout_mode == 2 ? 1 : 0;
    v.stride[0] = N * H * ld;
    v.stride[1] = ld;
    v.stride[2] = H * ld;
    v.size = size_t(v.offset + B * N * H * ld);
  }
  return v;
}

// Padding is NaN: reading it anywhere would show up in the results.
template <typename T>
std::vector<T> scatter(const std::vector<float>& dense, const Problem& pr, const View& v) {
  std::vector<T> buf(v.size, from_float<T>(kNaN));
  for (int b = 0; b < pr.B; ++b)
    for (int h = 0; h < pr.H; ++h)
      for (int n = 0; n < pr.Nk; ++n)
        for (int d = 0; d < pr.D; ++d)
          buf[v.offset + b * v.stride[0] + h * v.stride[1] + n * v.stride[2] + d] =
              from_float<T>(dense[((size_t(b) * pr.H + h) * pr.Nk + n) * pr.D + d]);
  return buf;
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

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

bool all_nan(const std::vector<float>& x) {
  for (float v : x)
    if (!std::isnan(v)) return false;
  return true;
}

// Every output, read back whether it was wanted or not (an unwanted one must keep its NaN fill).
struct Result {
  int forward_err = 0, backward_err = 0;
  std::vector<float> kc, vc, grad_k, grad_v, grad_weight, grad_bias;
  bool backward_deterministic = true;  // a second backward gives the same bits
  bool guards_intact = true;           // nothing was written past the end of an output
};

// An output of n elements between two guards, all NaN; the output starts at element kGuard.
template <typename T>
std::vector<T> nan_buffer(size_t n) {
  return convert<T>(std::vector<float>(n + 2 * kGuard, kNaN));
}

// The output part of a buffer read back; clears guards_intact when a guard was written.
std::vector<float> without_guards(const std::vector<float>& x, bool& guards_intact) {
  const auto first = x.begin() + kGuard, last = x.end() - kGuard;
  guards_intact = guards_intact && all_nan(std::vector<float>(x.begin(), first)) &&
                  all_nan(std::vector<float>(last, x.end()));
  return std::vector<float>(first, last);
}

template <typename T>
Result run_cuda(const Problem& pr, const Inputs& in) {
  Result res;
  const View kv = make_view(pr);
  const size_t nk = size_t(pr.B) * pr.H * pr.Nk * pr.D, nc = size_t(pr.B) * pr.H * pr.Nc() * pr.D;
  af2_test::DeviceBuffer<T> k(scatter<T>(in.k, pr, kv)), v(scatter<T>(in.v, pr, kv));
  af2_test::DeviceBuffer<float> weight(in.weight);
  af2_test::DeviceBuffer<float> bias(in.bias.empty() ? std::vector<float>(1, kNaN) : in.bias);
  af2_test::DeviceBuffer<T> grad_kc(convert<T>(in.grad_kc)), grad_vc(convert<T>(in.grad_vc));
  af2_test::DeviceBuffer<T> kc(nan_buffer<T>(nc)), vc(nan_buffer<T>(nc));
  const std::vector<T> nan_k = nan_buffer<T>(nk);
  const std::vector<float> nan_w = nan_buffer<float>(in.weight.size()), nan_b = nan_buffer<float>(size_t(pr.H) * pr.D);
  af2_test::DeviceBuffer<T> grad_k(nan_k.size()), grad_v(nan_k.size());
  af2_test::DeviceBuffer<float> grad_weight(nan_w.size()), grad_bias(nan_b.size());

  KvCompressCudaParams p;
  const KvCompressShape& s = p.s = pr.shape();
  p.dtype = pr.dtype;
  p.k = k.get() + kv.offset;
  p.v = v.get() + kv.offset;
  for (int i = 0; i < 3; ++i) p.k_stride[i] = p.v_stride[i] = kv.stride[i];
  p.weight = weight.get();
  p.bias = pr.bias ? bias.get() : nullptr;
  p.kc = pr.want_kc ? kc.get() + kGuard : nullptr;
  p.vc = pr.want_vc ? vc.get() + kGuard : nullptr;
  p.grad_kc = grad_kc.get();
  p.grad_vc = grad_vc.get();
  p.grad_k = pr.want_k ? grad_k.get() + kGuard : nullptr;
  p.grad_v = pr.want_v ? grad_v.get() + kGuard : nullptr;
  p.grad_weight = pr.want_weight ? grad_weight.get() + kGuard : nullptr;
  p.grad_bias = pr.want_bias && pr.bias ? grad_bias.get() + kGuard : nullptr;
  // The row splits' partials: NaN before every run, so a partial left unwritten shows up in the sums.
  const int64_t ws_floats =
      af2_ext::cuda::kv_compress_backward_workspace_floats(s, p.grad_weight != nullptr, p.grad_bias != nullptr);
  const std::vector<float> nan_ws(size_t(std::max<int64_t>(ws_floats, 1)), kNaN);
  af2_test::DeviceBuffer<float> workspace(nan_ws.size());
  p.workspace = ws_floats > 0 ? workspace.get() : nullptr;

  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  res.forward_err = af2_ext::cuda::kv_compress_forward(p, stream);
  if (res.forward_err == 0) {
    CUDA_CHECK(cudaStreamSynchronize(stream));
    res.kc = without_guards(to_floats(kc.to_host()), res.guards_intact);
    res.vc = without_guards(to_floats(vc.to_host()), res.guards_intact);
  }
  for (int run = 0; run < 2 && res.forward_err == 0; ++run) {
    // The outputs start as NaN on every run: each must be fully written, and by the run itself.
    CUDA_CHECK(cudaMemcpy(grad_k.get(), nan_k.data(), nan_k.size() * sizeof(T), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(grad_v.get(), nan_k.data(), nan_k.size() * sizeof(T), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(grad_weight.get(), nan_w.data(), nan_w.size() * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(grad_bias.get(), nan_b.data(), nan_b.size() * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(workspace.get(), nan_ws.data(), nan_ws.size() * sizeof(float), cudaMemcpyHostToDevice));
    res.backward_err = af2_ext::cuda::kv_compress_backward(p, stream);
    if (res.backward_err != 0) break;
    CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<float> gk = without_guards(to_floats(grad_k.to_host()), res.guards_intact);
    const std::vector<float> gv = without_guards(to_floats(grad_v.to_host()), res.guards_intact);
    const std::vector<float> gw = without_guards(grad_weight.to_host(), res.guards_intact);
    const std::vector<float> gb = without_guards(grad_bias.to_host(), res.guards_intact);
    if (run == 0) {
      res.grad_k = gk;
      res.grad_v = gv;
      res.grad_weight = gw;
      res.grad_bias = gb;
    } else {
      res.backward_deterministic = bitwise_equal(gk, res.grad_k) && bitwise_equal(gv, res.grad_v) &&
                                   bitwise_equal(gw, res.grad_weight) && bitwise_equal(gb, res.grad_bias);
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

// Tolerances: |got - want| <= c * max(1, max|want|) + c * |want|. The kernels accumulate in fp32 from exactly the
// reference's inputs, so only kc, vc, grad_k and grad_v (rounded to the dtype on output) see the dtype; the weight
// and bias gradients are fp32 sums.
struct Tol {
  float io, param;
};
Tol tolerance(ScalarKind dtype) {
  switch (dtype) {
    case ScalarKind::kFloat16: return {2e-3f, 5e-5f};
    case ScalarKind::kBFloat16: return {1e-2f, 5e-5f};
    default: return {2e-5f, 5e-5f};
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

// A wanted output matches the reference; an unwanted one was never written.
void expect_output(bool wanted, const std::vector<float>& got, const std::vector<float>& want, float c,
                   const std::string& what) {
  if (wanted) {
    EXPECT_CLOSE(got, want, c, what);
  } else if (!all_nan(got)) {
    af2_test::report_failure(__FILE__, __LINE__, what + ": written although not wanted");
  }
}

// Runs one problem and compares everything it computes with the reference.
void check_problem(const Problem& pr) {
  const Inputs in = make_inputs(pr);
  const Result got = run_cuda(pr, in);
  const std::string name = pr.name();
  if (got.forward_err != 0 || got.backward_err != 0) {
    af2_test::report_failure(__FILE__, __LINE__,
                             name + ": launch failed: forward " + std::to_string(got.forward_err) + ", backward " +
                                 std::to_string(got.backward_err));
    return;
  }
  const Reference want = reference(pr, in);
  const Tol tol = tolerance(pr.dtype);
  expect_output(pr.want_kc, got.kc, want.kc, tol.io, name + ": kc");
  expect_output(pr.want_vc, got.vc, want.vc, tol.io, name + ": vc");
  expect_output(pr.want_k, got.grad_k, want.grad_k, tol.io, name + ": grad_k");
  expect_output(pr.want_v, got.grad_v, want.grad_v, tol.io, name + ": grad_v");
  expect_output(pr.want_weight, got.grad_weight, want.grad_weight, tol.param, name + ": grad_weight");
  expect_output(pr.want_bias && pr.bias, got.grad_bias, want.grad_bias, tol.param, name + ": grad_bias");
  if (!got.guards_intact) af2_test::report_failure(__FILE__, __LINE__, name + ": wrote past the end of an output");
  if (!got.backward_deterministic)
    af2_test::report_failure(__FILE__, __LINE__, name + ": a second backward gave different bits");
}

const ScalarKind kDtypes[] = {ScalarKind::kFloat32, ScalarKind::kFloat16, ScalarKind::kBFloat16};
const int kHeadDims[] = {16, 32, 64, 128};

}  // namespace

// Every dtype x head dim x ratio 1..4 and 7, Nk a multiple of the ratio and not: B * Nc = 69 or 72 rows, so the
// 64-row CTAs and the 64-row chunks of the weight gradient both end in a partial tile.
TEST_CASE(every_dtype_head_dim_ratio) {
  unsigned seed = 10;
  for (ScalarKind dtype : kDtypes)
    for (int D : kHeadDims)
      for (int ratio : {1, 2, 3, 4, 7})
        for (int extra : {0, 1}) {
          if (ratio == 1 && extra == 1) continue;  // every Nk is a multiple of 1
          Problem pr;
          pr.dtype = dtype;
          pr.B = 3;
          pr.D = D;
          pr.ratio = ratio;
          pr.Nk = 23 * ratio + extra;
          pr.seed = ++seed;
          check_problem(pr);
        }
}

// Fewer keys than the ratio (one compressed row, taps past Nk) and a last group with a single key.
TEST_CASE(short_contexts) {
  unsigned seed = 100;
  for (ScalarKind dtype : kDtypes)
    for (int D : {16, 64})
      for (const auto& nk_ratio : {std::pair<int, int>{1, 7}, {3, 7}, {6, 7}, {3, 4}, {9, 4}, {5, 2}}) {
        Problem pr;
        pr.dtype = dtype;
        pr.D = D;
        pr.Nk = nk_ratio.first;
        pr.ratio = nk_ratio.second;
        pr.seed = ++seed;
        check_problem(pr);
      }
}

// k and v as strided views (B, Nk, H, D + 8), then one element off; a larger ratio.
TEST_CASE(strided_and_unaligned_views) {
  unsigned seed = 200;
  for (ScalarKind dtype : kDtypes)
    for (int mode : {1, 2})
      for (int D : {32, 128}) {
        Problem pr;
        pr.dtype = dtype;
        pr.layout_mode = mode;
        pr.D = D;
        pr.ratio = 3;
        pr.Nk = 50;
        pr.seed = ++seed;
        check_problem(pr);
      }
}

// No bias: kc = the convolution alone, and no bias gradient.
TEST_CASE(without_bias) {
  unsigned seed = 300;
  for (ScalarKind dtype : kDtypes) {
    Problem pr;
    pr.dtype = dtype;
    pr.bias = false;
    pr.D = 64;
    pr.ratio = 4;
    pr.Nk = 45;
    pr.seed = ++seed;
    check_problem(pr);
  }
}

// Each output wanted alone: the others are neither computed nor written.
TEST_CASE(partial_outputs) {
  unsigned seed = 400;
  for (ScalarKind dtype : {ScalarKind::kFloat32, ScalarKind::kBFloat16})
    for (int which = 0; which < 4; ++which) {
      Problem pr;
      pr.dtype = dtype;
      pr.D = 32;
      pr.ratio = 3;
      pr.Nk = 40;
      pr.want_kc = which % 2 == 0;
      pr.want_vc = which % 2 == 1;
      pr.want_k = which == 0;
      pr.want_v = which == 1;
      pr.want_weight = which == 2;
      pr.want_bias = which == 3;
      pr.seed = ++seed;
      check_problem(pr);
    }
}

// Many rows: several CTAs per head in the forward and grad of k, v; many chunks in the weight gradient, in two
// row splits.
TEST_CASE(many_rows) {
  unsigned seed = 500;
  for (ScalarKind dtype : kDtypes) {
    Problem pr;
    pr.dtype = dtype;
    pr.B = 4;
    pr.H = 3;
    pr.Nk = 301;
    pr.D = 64;
    pr.ratio = 2;
    pr.seed = ++seed;
    check_problem(pr);
  }
}

// Too few (tile, tap, head) CTAs for a GPU: the weight gradient's rows are split (S > 1) into workspace partials
// that a second kernel adds in split order. Cases: the last split shorter than the others and ending in a partial
// 64-row chunk, Nk not a multiple of the ratio (3425 / 2); D = 128 tiles; D = 16 with ratio 3; taps past Nk (their
// partials are zero); no bias (weight partials only). check_problem also runs the backward twice and compares bits.
TEST_CASE(weight_row_splits) {
  struct Case {
    int B, H, Nk, D, ratio;
    bool bias;
  };
  const Case cases[] = {{3, 4, 3425, 32, 2, true}, {2, 1, 1025, 128, 2, true}, {3, 1, 2001, 16, 3, true},
                        {600, 1, 3, 16, 4, true},  {3, 4, 3425, 32, 2, false}};
  unsigned seed = 600;
  for (const Case& c : cases)
    for (ScalarKind dtype : kDtypes) {
      Problem pr;
      pr.dtype = dtype;
      pr.B = c.B;
      pr.H = c.H;
      pr.Nk = c.Nk;
      pr.D = c.D;
      pr.ratio = c.ratio;
      pr.bias = c.bias;
      pr.seed = ++seed;
      const int64_t splits = af2_ext::cuda::kv_compress_weight_splits(pr.shape());
      if (splits <= 1) {
        af2_test::report_failure(__FILE__, __LINE__, pr.name() + ": expected a row split, got S = 1");
        continue;
      }
      check_problem(pr);
    }
  // The first case is the one the comment promises: 5139 rows = 81 chunks (the last one 19 rows) in 14 splits of 6
  // chunks, the last split 3.
  Problem first;
  first.B = 3;
  first.H = 4;
  first.Nk = 3425;
  const int64_t chunks = (int64_t(first.B) * first.Nc() + 63) / 64, splits =
      af2_ext::cuda::kv_compress_weight_splits(first.shape());
  const int64_t per_split = (chunks + splits - 1) / splits;
  EXPECT_NE(int64_t(first.B) * first.Nc() % 64, 0);
  EXPECT_LT(chunks - (splits - 1) * per_split, per_split);
}

// grad_bias alone launches only the bias CTAs, with the same row splits and summation order as next to
// grad_weight: the same bits either way.
TEST_CASE(weight_row_splits_bias_alone) {
  Problem pr;
  pr.B = 3;
  pr.H = 4;
  pr.Nk = 3425;
  pr.seed = 650;
  EXPECT_LT(1, af2_ext::cuda::kv_compress_weight_splits(pr.shape()));
  Problem alone = pr;
  alone.want_kc = alone.want_vc = false;
  alone.want_k = alone.want_v = alone.want_weight = false;
  check_problem(alone);  // against the reference; the other outputs are left alone
  const Inputs in = make_inputs(pr);
  const Result both = run_cuda(pr, in), bias_only = run_cuda(alone, in);
  CHECK_EQ(both.backward_err, 0);
  CHECK_EQ(bias_only.backward_err, 0);
  EXPECT_TRUE(bitwise_equal(both.grad_bias, bias_only.grad_bias));
}

// Heads h of x laid out (outer, H, inner), in the order given: (outer, heads.size(), inner).
std::vector<float> take_heads(const std::vector<float>& x, size_t outer, int H, const std::vector<int>& heads) {
  const size_t inner = x.size() / (outer * H);
  std::vector<float> y;
  y.reserve(outer * heads.size() * inner);
  for (size_t o = 0; o < outer; ++o)
    for (int h : heads) {
      const auto first = x.begin() + (o * H + h) * inner;
      y.insert(y.end(), first, first + inner);
    }
  return y;
}

size_t count_nan(const std::vector<float>& x) {
  return size_t(std::count_if(x.begin(), x.end(), [](float v) { return std::isnan(v); }));
}

// More heads than grid.y holds (65,535): every kernel is launched in chunks of heads with the chunk's first head
// passed in. Tiny B, Nk and D (the weight, H * D * D * ratio floats, is the largest buffer: 134 MB); the reference
// is computed for heads at the start, on both sides of the chunk boundary and at the end, and every output element
// of every head must have been written.
TEST_CASE(more_heads_than_grid_y) {
  Problem pr;
  pr.B = 1;
  pr.H = 65535 + 4;
  pr.Nk = 3;
  pr.D = 16;
  pr.ratio = 2;
  pr.seed = 700;
  const Inputs in = make_inputs(pr);
  const Result got = run_cuda(pr, in);
  const std::string name = pr.name();
  CHECK_EQ(got.forward_err, 0);
  CHECK_EQ(got.backward_err, 0);
  EXPECT_EQ(count_nan(got.kc) + count_nan(got.vc) + count_nan(got.grad_k) + count_nan(got.grad_v), size_t(0));
  EXPECT_EQ(count_nan(got.grad_weight) + count_nan(got.grad_bias), size_t(0));
  EXPECT_TRUE(got.guards_intact);
  EXPECT_TRUE(got.backward_deterministic);

  const std::vector<int> heads = {0, 1, 65534, 65535, 65536, pr.H - 1};
  Problem sub = pr;
  sub.H = int(heads.size());
  Inputs sub_in;
  sub_in.k = take_heads(in.k, pr.B, pr.H, heads);
  sub_in.v = take_heads(in.v, pr.B, pr.H, heads);
  sub_in.weight = take_heads(in.weight, 1, pr.H, heads);
  sub_in.bias = take_heads(in.bias, 1, pr.H, heads);
  sub_in.grad_kc = take_heads(in.grad_kc, pr.B, pr.H, heads);
  sub_in.grad_vc = take_heads(in.grad_vc, pr.B, pr.H, heads);
  const Reference want = reference(sub, sub_in);
  const Tol tol = tolerance(pr.dtype);
  EXPECT_CLOSE(take_heads(got.kc, pr.B, pr.H, heads), want.kc, tol.io, name + ": kc");
  EXPECT_CLOSE(take_heads(got.vc, pr.B, pr.H, heads), want.vc, tol.io, name + ": vc");
  EXPECT_CLOSE(take_heads(got.grad_k, pr.B, pr.H, heads), want.grad_k, tol.io, name + ": grad_k");
  EXPECT_CLOSE(take_heads(got.grad_v, pr.B, pr.H, heads), want.grad_v, tol.io, name + ": grad_v");
  EXPECT_CLOSE(take_heads(got.grad_weight, 1, pr.H, heads), want.grad_weight, tol.param, name + ": grad_weight");
  EXPECT_CLOSE(take_heads(got.grad_bias, 1, pr.H, heads), want.grad_bias, tol.param, name + ": grad_bias");
}

// With a row split the weight and bias gradients need the workspace: without one the backward is refused before
// anything is launched (grad_k keeps its NaN fill); outputs that need none run without it.
TEST_CASE(missing_workspace) {
  Problem pr;
  pr.B = 3;
  pr.H = 4;
  pr.Nk = 3425;
  const KvCompressShape s = pr.shape();
  const int64_t splits = af2_ext::cuda::kv_compress_weight_splits(s);
  CHECK(splits > 1);
  const int64_t nw = int64_t(pr.H) * pr.D * pr.D * pr.ratio, nb = int64_t(pr.H) * pr.D;
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward_workspace_floats(s, true, true), splits * (nw + nb));
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward_workspace_floats(s, true, false), splits * nw);
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward_workspace_floats(s, false, true), splits * nb);
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward_workspace_floats(s, false, false), int64_t(0));
  EXPECT_EQ(af2_ext::cuda::kv_compress_weight_splits(Problem().shape()), int64_t(1));  // one 64-row chunk
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward_workspace_floats(Problem().shape(), true, true), int64_t(0));

  const Inputs in = make_inputs(pr);
  af2_test::DeviceBuffer<float> k(in.k), v(in.v), weight(in.weight), grad_kc(in.grad_kc), grad_vc(in.grad_vc);
  const std::vector<float> nan_k(in.k.size(), kNaN);
  af2_test::DeviceBuffer<float> grad_k(nan_k), grad_weight(in.weight.size()), grad_bias(static_cast<size_t>(nb));
  af2_test::DeviceBuffer<float> workspace(static_cast<size_t>(splits * (nw + nb)));
  KvCompressCudaParams p;
  p.s = s;
  p.k = k.get();
  p.v = v.get();
  const int64_t st[3] = {int64_t(pr.H) * pr.Nk * pr.D, int64_t(pr.Nk) * pr.D, pr.D};
  for (int i = 0; i < 3; ++i) p.k_stride[i] = p.v_stride[i] = st[i];
  p.weight = weight.get();
  p.grad_kc = grad_kc.get();
  p.grad_vc = grad_vc.get();
  p.grad_k = grad_k.get();
  p.grad_weight = grad_weight.get();
  p.grad_bias = grad_bias.get();
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(p, stream), int(cudaErrorInvalidValue));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  EXPECT_TRUE(all_nan(grad_k.to_host()));  // refused before the grad of k was launched
  KvCompressCudaParams bad = p;
  bad.grad_k = nullptr;
  bad.grad_weight = nullptr;  // grad_bias alone
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.grad_k = nullptr;
  bad.grad_bias = nullptr;  // grad_weight alone
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.grad_weight = bad.grad_bias = nullptr;  // grad_k alone needs no workspace
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(bad, stream), 0);
  p.workspace = workspace.get();
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(p, stream), 0);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  CUDA_CHECK(cudaStreamDestroy(stream));
}

// Unsupported sizes and inconsistent arguments are refused before anything is launched.
TEST_CASE(invalid_arguments) {
  Problem pr;
  const Inputs in = make_inputs(pr);
  af2_test::DeviceBuffer<float> k(in.k), v(in.v), weight(in.weight), grad_kc(in.grad_kc), grad_vc(in.grad_vc);
  af2_test::DeviceBuffer<float> kc(in.grad_kc.size()), vc(in.grad_vc.size()), grad_weight(in.weight.size());
  KvCompressCudaParams p;
  p.s = pr.shape();
  p.k = k.get();
  p.v = v.get();
  const int64_t st[3] = {int64_t(pr.H) * pr.Nk * pr.D, int64_t(pr.Nk) * pr.D, pr.D};
  for (int i = 0; i < 3; ++i) p.k_stride[i] = p.v_stride[i] = st[i];
  p.weight = weight.get();
  p.kc = kc.get();
  p.vc = vc.get();
  p.grad_kc = grad_kc.get();
  p.grad_vc = grad_vc.get();
  p.grad_weight = grad_weight.get();
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  EXPECT_EQ(af2_ext::cuda::kv_compress_forward(p, stream), 0);  // the baseline is valid
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(p, stream), 0);
  CUDA_CHECK(cudaStreamSynchronize(stream));

  KvCompressCudaParams bad = p;
  bad.s.head_dim = 48;
  EXPECT_EQ(af2_ext::cuda::kv_compress_forward(bad, stream), int(cudaErrorInvalidValue));
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.dtype = static_cast<ScalarKind>(7);
  EXPECT_EQ(af2_ext::cuda::kv_compress_forward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.s.seq_c += 1;  // inconsistent with Nk and the ratio
  EXPECT_EQ(af2_ext::cuda::kv_compress_forward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.s.ratio = 0;
  EXPECT_EQ(af2_ext::cuda::kv_compress_forward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.s.ratio = af2_ext::cuda::kKvCompressMaxRatio + 1;  // more weight tiles than grid.x holds
  bad.s.seq_c = 1;
  EXPECT_EQ(af2_ext::cuda::kv_compress_forward(bad, stream), int(cudaErrorInvalidValue));
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.s.batch = af2_ext::cuda::kKvCompressMaxRows / bad.s.seq_c + 1;  // more 64-row CTAs than grid.x holds
  EXPECT_EQ(af2_ext::cuda::kv_compress_forward(bad, stream), int(cudaErrorInvalidValue));
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.weight = nullptr;
  EXPECT_EQ(af2_ext::cuda::kv_compress_forward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.k = nullptr;  // kc wanted without k
  EXPECT_EQ(af2_ext::cuda::kv_compress_forward(bad, stream), int(cudaErrorInvalidValue));
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(bad, stream), int(cudaErrorInvalidValue));  // grad_weight needs k
  bad = p;
  bad.grad_vc = nullptr;  // grad_weight without grad_vc
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.grad_weight = nullptr;
  bad.grad_k = k.get();  // grad_k without grad_kc
  bad.grad_kc = nullptr;
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.weight = nullptr;  // the weight gradient does not read the weight (the binding passes none then)
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(bad, stream), 0);
  bad.grad_k = kc.get();  // but the input gradients do
  EXPECT_EQ(af2_ext::cuda::kv_compress_backward(bad, stream), int(cudaErrorInvalidValue));
  bad = p;
  bad.kc = bad.vc = nullptr;  // nothing wanted: nothing to do
  EXPECT_EQ(af2_ext::cuda::kv_compress_forward(bad, stream), 0);
  CUDA_CHECK(cudaStreamSynchronize(stream));
  CUDA_CHECK(cudaStreamDestroy(stream));
}

AF2_TEST_MAIN()
