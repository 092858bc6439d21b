// Minimal test harness for cuda_tests/test_*.cu: no gtest, no torch.
//
//   TEST_CASE(warp_reduce) { EXPECT_EQ(a, b); CHECK(ptr != nullptr); ... }
//   AF2_TEST_MAIN()
//
// EXPECT_* record a failure and continue; CHECK* record a failure and return from the test case.
// AF2_TEST_MAIN skips the whole binary (exit 77, ctest's SKIP_RETURN_CODE) when no CUDA device is
// usable; set AF2_EXT_REQUIRE_GPU=1 to make that a failure instead (for GPU CI, so a broken driver
// cannot pass as "skipped").
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/cuda_utils.cuh"

namespace af2_test {

constexpr int kSkipReturnCode = 77;  // must match SKIP_RETURN_CODE in cuda_tests/CMakeLists.txt

struct TestCase {
  const char* name;
  void (*fn)();
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> cases;
  return cases;
}

inline int& failure_count() {
  static int n = 0;
  return n;
}

struct Registrar {
  Registrar(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

inline void report_failure(const char* file, int line, const std::string& msg) {
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, msg.c_str());
  ++failure_count();
}

template <typename A, typename B>
std::string format_pair(const char* op, const char* ea, const char* eb, const A& a, const B& b) {
  std::ostringstream os;
  os << ea << " " << op << " " << eb << " (" << a << " vs " << b << ")";
  return os.str();
}

inline void skip_if_no_gpu() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && count > 0) return;
  const std::string reason =
      err != cudaSuccess ? std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)
                         : std::string("cudaGetDeviceCount returned 0");
  const char* require = std::getenv("AF2_EXT_REQUIRE_GPU");
  if (require != nullptr && std::strcmp(require, "") != 0 && std::strcmp(require, "0") != 0) {
    std::fprintf(stderr, "FAILED: AF2_EXT_REQUIRE_GPU is set but no CUDA device (%s)\n",
                 reason.c_str());
    std::exit(EXIT_FAILURE);
  }
  std::printf("SKIPPED: no CUDA device (%s)\n", reason.c_str());
  std::exit(kSkipReturnCode);
}

// Runs every TEST_CASE (or only those whose name contains argv[1]); returns the process exit code.
inline int run_all(int argc, char** argv) {
  skip_if_no_gpu();
  int dev = 0;
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %d: %s (sm_%d%d)\n", dev, prop.name, prop.major, prop.minor);

  const char* filter = argc > 1 ? argv[1] : nullptr;
  int ran = 0;
  for (const TestCase& tc : registry()) {
    if (filter != nullptr && std::strstr(tc.name, filter) == nullptr) continue;
    const int before = failure_count();
    tc.fn();
    ++ran;
    std::printf("[%s] %s\n", failure_count() == before ? "  OK  " : " FAIL ", tc.name);
  }
  if (ran == 0) {
    std::fprintf(stderr, "FAILED: no test case matched\n");
    return EXIT_FAILURE;
  }
  std::printf("%d test case(s), %d failed check(s)\n", ran, failure_count());
  return failure_count() == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

// Fixed-seed inputs so a failure reproduces.
inline std::vector<float> random_normal(size_t n, unsigned seed, float stddev = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// Element-wise |got - want| <= atol + rtol * |want|; infinities must match exactly, NaN never
// matches. Reports the count, the worst element and the largest error.
inline bool allclose(const std::vector<float>& got, const std::vector<float>& want, float atol,
                     float rtol, const char* what, const char* file, int line) {
  if (got.size() != want.size()) {
    std::ostringstream os;
    os << what << ": size " << got.size() << " vs " << want.size();
    report_failure(file, line, os.str());
    return false;
  }
  size_t bad = 0, worst = 0;
  double worst_excess = -1.0, max_err = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = want[i];
    bool ok;
    double excess;
    if (std::isinf(w) || std::isinf(g) || std::isnan(w) || std::isnan(g)) {
      ok = g == w;
      excess = ok ? 0.0 : INFINITY;
    } else {
      const double err = std::fabs(g - w);
      max_err = std::max(max_err, err);
      excess = err - (atol + rtol * std::fabs(w));
      ok = excess <= 0.0;
    }
    if (!ok) ++bad;
    if (!ok && excess > worst_excess) {
      worst_excess = excess;
      worst = i;
    }
  }
  if (bad == 0) return true;
  std::ostringstream os;
  os << what << ": " << bad << "/" << got.size() << " mismatches, worst at [" << worst
     << "]: got " << got[worst] << " want " << want[worst] << " (max finite abs err " << max_err
     << ", atol " << atol << ", rtol " << rtol << ")";
  report_failure(file, line, os.str());
  return false;
}

// Owning device allocation for tests.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) { CUDA_CHECK(cudaMalloc(&ptr_, n * sizeof(T))); }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    CUDA_CHECK(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return ptr_; }
  size_t size() const { return n_; }
  std::vector<T> to_host() const {
    std::vector<T> host(n_);
    CUDA_CHECK(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t n_;
};

}  // namespace af2_test

#define TEST_CASE(name)                                              \
  static void name();                                                \
  static const ::af2_test::Registrar name##_registrar(#name, &name); \
  static void name()

#define AF2_TEST_MAIN() \
  int main(int argc, char** argv) { return ::af2_test::run_all(argc, argv); }

#define EXPECT_TRUE(cond)                                                      \
  do {                                                                         \
    if (!(cond)) ::af2_test::report_failure(__FILE__, __LINE__, "expected " #cond); \
  } while (0)

#define AF2_TEST_CMP_(op, a, b, on_fail)                                                  \
  do {                                                                                    \
    const auto& af2_a_ = (a);                                                             \
    const auto& af2_b_ = (b);                                                             \
    if (!(af2_a_ op af2_b_)) {                                                            \
      ::af2_test::report_failure(__FILE__, __LINE__,                                      \
                                 ::af2_test::format_pair(#op, #a, #b, af2_a_, af2_b_));   \
      on_fail;                                                                            \
    }                                                                                     \
  } while (0)

#define EXPECT_EQ(a, b) AF2_TEST_CMP_(==, a, b, (void)0)
#define EXPECT_NE(a, b) AF2_TEST_CMP_(!=, a, b, (void)0)
#define EXPECT_LE(a, b) AF2_TEST_CMP_(<=, a, b, (void)0)
#define EXPECT_LT(a, b) AF2_TEST_CMP_(<, a, b, (void)0)

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      ::af2_test::report_failure(__FILE__, __LINE__, "required " #cond);             \
      return;                                                                        \
    }                                                                                \
  } while (0)
#define CHECK_EQ(a, b) AF2_TEST_CMP_(==, a, b, return)

#define EXPECT_ALLCLOSE(got, want, atol, rtol) \
  ((void)::af2_test::allclose((got), (want), (atol), (rtol), #got " vs " #want, __FILE__, __LINE__))

// After a kernel launch: catches both launch-configuration errors and faults during execution.
#define CUDA_CHECK_LAUNCH()                   \
  do {                                        \
    CUDA_CHECK(cudaGetLastError());           \
    CUDA_CHECK(cudaDeviceSynchronize());      \
  } while (0)
