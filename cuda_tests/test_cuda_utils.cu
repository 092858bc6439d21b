// Tests for csrc/common/cuda_utils.cuh against CPU references.
#include <cstdint>
#include <limits>

#include "common/cuda_utils.cuh"
#include "test_main.h"

using af2_ext::ceil_div;
using af2_ext::from_float;
using af2_ext::to_float;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kThreads = 128;
constexpr int kBlocks = 8;
constexpr int kN = kThreads * kBlocks;  // a multiple of 32: every warp is full, as the reductions require

static_assert(ceil_div(7, 2) == 4 && ceil_div(8, 2) == 4 && ceil_div(0, 3) == 0, "ceil_div");
static_assert(ceil_div<int64_t>(int64_t{1} << 40, 3) == ((int64_t{1} << 40) + 2) / 3, "ceil_div");

uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

template <typename T>
uint16_t bits16(T x) {
  static_assert(sizeof(T) == 2, "16-bit type");
  uint16_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// fp32 -> a binary format with `mant_bits` stored mantissa bits and minimum normal exponent `emin`,
// round to nearest even, overflow to inf; returned as the fp32 value it represents. Written from
// the IEEE definition so it does not share code with cuda_fp16.h / cuda_bf16.h.
float round_to_format(float x, int mant_bits, int emin, double overflow_threshold) {
  if (std::isnan(x) || std::isinf(x) || x == 0.0f) return x;
  if (std::fabs(static_cast<double>(x)) >= overflow_threshold) return x > 0 ? kInf : -kInf;
  int e;
  std::frexp(static_cast<double>(x), &e);  // |x| in [2^(e-1), 2^e)
  const int exponent = std::max(e - 1, emin);
  const double ulp = std::ldexp(1.0, exponent - mant_bits);
  const double q = std::nearbyint(static_cast<double>(x) / ulp);  // default mode: ties to even
  return static_cast<float>(q * ulp);
}

float round_to_half(float x) { return round_to_format(x, 10, -14, 65520.0); }
float round_to_bf16(float x) {
  return round_to_format(x, 7, -126, std::ldexp(2.0 - std::ldexp(1.0, -8), 127));
}

float decode_half(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(static_cast<double>(mant), -24);
  } else if (exp == 31) {
    v = mant == 0 ? INFINITY : NAN;
  } else {
    v = std::ldexp(static_cast<double>(1024 + mant), exp - 25);
  }
  return static_cast<float>(sign ? -v : v);
}

float decode_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <int kWidth>
__global__ void warp_reduce_kernel(const float* in, float* out_max, float* out_sum) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = in[i];
  out_max[i] = af2_ext::warp_reduce_max<kWidth>(v);
  out_sum[i] = af2_ext::warp_reduce_sum<kWidth>(v);
}

template <int kWidth>
__global__ void warp_reduce_max_nan_kernel(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = af2_ext::warp_reduce_max_nan<kWidth>(in[i]);
}

// The NaN-propagating max: a group with a NaN gives NaN in every lane, wherever the NaN sits; otherwise the plain
// max, -inf for a fully masked group.
template <int kWidth>
void check_warp_reduce_max_nan(unsigned seed) {
  std::vector<float> in = af2_test::random_normal(kN, seed, 10.0f);
  std::mt19937 gen(seed + 1);
  std::uniform_int_distribution<int> pick(0, kN - 1);
  for (int k = 0; k < kN / 50; ++k) in[pick(gen)] = NAN;
  for (int j = 0; j < kWidth; ++j) in[2 * kWidth + j] = -kInf;
  in[4 * kWidth + kWidth - 1] = NAN;  // the last lane of a group
  in[6 * kWidth] = NAN;               // the first lane of a group
  af2_test::DeviceBuffer<float> d_in(in), d_out(kN);
  warp_reduce_max_nan_kernel<kWidth><<<kBlocks, kThreads>>>(d_in.get(), d_out.get());
  CUDA_CHECK_LAUNCH();
  const std::vector<float> got = d_out.to_host();
  int bad = 0;
  for (int g = 0; g < kN / kWidth; ++g) {
    bool nan = false;
    float m = -kInf;
    for (int j = 0; j < kWidth; ++j) {
      const float v = in[g * kWidth + j];
      nan = nan || std::isnan(v);
      m = std::max(m, v);
    }
    for (int j = 0; j < kWidth; ++j) {
      const float x = got[g * kWidth + j];
      if (nan ? !std::isnan(x) : float_bits(x) != float_bits(m)) ++bad;
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST_CASE(warp_reduce_max_nan_propagates) {
  check_warp_reduce_max_nan<4>(71);
  check_warp_reduce_max_nan<32>(72);
}

template <int kWidth>
void check_warp_reduce(unsigned seed) {
  std::vector<float> in = af2_test::random_normal(kN, seed, 10.0f);
  std::mt19937 gen(seed + 1);
  std::uniform_int_distribution<int> pick(0, kN - 1);
  for (int k = 0; k < kN / 20; ++k) in[pick(gen)] = -kInf;
  for (int j = 0; j < kWidth; ++j) {
    in[3 * kWidth + j] = -kInf;                        // fully masked group: max and sum are -inf
    in[5 * kWidth + j] = -std::fabs(in[5 * kWidth + j]) - 1.0f;  // all-negative finite group
  }

  af2_test::DeviceBuffer<float> d_in(in), d_max(kN), d_sum(kN);
  warp_reduce_kernel<kWidth><<<kBlocks, kThreads>>>(d_in.get(), d_max.get(), d_sum.get());
  CUDA_CHECK_LAUNCH();
  const std::vector<float> got_max = d_max.to_host(), got_sum = d_sum.to_host();

  std::vector<float> want_max(kN), want_sum(kN), sum_tol(kN);
  for (int g = 0; g < kN / kWidth; ++g) {
    float m = -kInf;
    double s = 0.0, s_abs = 0.0;
    for (int j = 0; j < kWidth; ++j) {
      const float v = in[g * kWidth + j];
      m = std::max(m, v);
      s += v;
      s_abs += std::fabs(v);
    }
    for (int j = 0; j < kWidth; ++j) {
      want_max[g * kWidth + j] = m;
      want_sum[g * kWidth + j] = static_cast<float>(s);
      // log2(kWidth) fp32 additions, each off by at most eps/2 of the running |sum|.
      sum_tol[g * kWidth + j] = static_cast<float>(6e-8 * (1 + std::log2(kWidth)) * s_abs + 1e-30);
    }
  }

  const std::string tag = "width " + std::to_string(kWidth);
  // max selects an input value, so it must be exact.
  int max_bad = 0, sum_bad = 0;
  for (int i = 0; i < kN; ++i) {
    if (float_bits(got_max[i]) != float_bits(want_max[i])) ++max_bad;
    const bool sum_ok = std::isinf(want_sum[i])
                            ? got_sum[i] == want_sum[i]
                            : std::fabs(got_sum[i] - want_sum[i]) <= sum_tol[i];
    if (!sum_ok) {
      if (sum_bad == 0) {
        std::ostringstream os;
        os << tag << ": warp_reduce_sum at [" << i << "] got " << got_sum[i] << " want "
           << want_sum[i] << " tol " << sum_tol[i];
        af2_test::report_failure(__FILE__, __LINE__, os.str());
      }
      ++sum_bad;
    }
    // Every lane of a group holds the same result, bit for bit.
    const int first = i / kWidth * kWidth;
    if (float_bits(got_sum[i]) != float_bits(got_sum[first])) {
      af2_test::report_failure(__FILE__, __LINE__,
                               tag + ": lanes of one group disagree on the sum at " +
                                   std::to_string(i));
      break;
    }
  }
  EXPECT_EQ(max_bad, 0);
  EXPECT_EQ(sum_bad, 0);
  EXPECT_TRUE(got_max[3 * kWidth] == -kInf && got_sum[3 * kWidth] == -kInf);
  EXPECT_TRUE(got_max[5 * kWidth] < 0.0f);
}

template <typename T>
__global__ void round_trip_kernel(const float* in, T* narrow, float* back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T t = from_float<T>(in[i]);
  narrow[i] = t;
  back[i] = to_float(t);
}

template <typename T>
__global__ void decode_kernel(const uint16_t* bits, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  T t;
  memcpy(&t, &bits[i], sizeof(t));
  out[i] = to_float(t);
}

std::vector<float> conversion_inputs() {
  std::vector<float> v = {0.0f,          -0.0f,         1.0f,           -2.0f,      0.5f,
                          kInf,          -kInf,         65504.0f,       65519.0f,   65520.0f,
                          -70000.0f,     1.0f + 1.0f / 2048,            1.0f + 3.0f / 2048,
                          1.0f + 1.0f / 256,            1.0f + 3.0f / 256,          6e-8f,
                          -3e-8f,        1e-6f,         1e-39f,         -1e-40f,    3.3e38f,
                          -3.4e38f,      std::numeric_limits<float>::max()};
  for (float scale : {1e-7f, 1e-3f, 1.0f, 1e3f, 1e5f, 1e30f}) {
    const std::vector<float> r = af2_test::random_normal(256, static_cast<unsigned>(scale * 7 + 1));
    for (float x : r) v.push_back(x * scale);
  }
  return v;
}

template <typename T>
void run_round_trip(const std::vector<float>& in, std::vector<T>* narrow, std::vector<float>* back) {
  const int n = static_cast<int>(in.size());
  af2_test::DeviceBuffer<float> d_in(in), d_back(in.size());
  af2_test::DeviceBuffer<T> d_narrow(in.size());
  round_trip_kernel<T><<<ceil_div(n, kThreads), kThreads>>>(d_in.get(), d_narrow.get(),
                                                            d_back.get(), n);
  CUDA_CHECK_LAUNCH();
  *narrow = d_narrow.to_host();
  *back = d_back.to_host();
}

template <typename T>
void check_round_trip(float (*round_ref)(float), float (*decode_ref)(uint16_t), const char* name) {
  const std::vector<float> in = conversion_inputs();
  std::vector<T> narrow;
  std::vector<float> back;
  run_round_trip<T>(in, &narrow, &back);
  int bad = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    const float want = round_ref(in[i]);
    // Bitwise, so the sign of zero and the infinities are checked too.
    const bool ok = float_bits(back[i]) == float_bits(want) &&
                    float_bits(decode_ref(bits16(narrow[i]))) == float_bits(want);
    if (!ok && bad++ == 0) {
      std::ostringstream os;
      os.precision(9);
      os << name << ": from_float(" << in[i] << ") -> bits 0x" << std::hex << bits16(narrow[i])
         << std::dec << " -> to_float " << back[i] << ", want " << want;
      af2_test::report_failure(__FILE__, __LINE__, os.str());
    }
  }
  EXPECT_EQ(bad, 0);
}

template <typename T>
void check_decode_all(float (*decode_ref)(uint16_t), const char* name) {
  constexpr int n = 1 << 16;
  std::vector<uint16_t> bits(n);
  for (int i = 0; i < n; ++i) bits[i] = static_cast<uint16_t>(i);
  af2_test::DeviceBuffer<uint16_t> d_bits(bits);
  af2_test::DeviceBuffer<float> d_out(n);
  decode_kernel<T><<<ceil_div(n, kThreads), kThreads>>>(d_bits.get(), d_out.get(), n);
  CUDA_CHECK_LAUNCH();
  const std::vector<float> got = d_out.to_host();
  int bad = 0;
  for (int i = 0; i < n; ++i) {
    const float want = decode_ref(bits[i]);
    const bool ok = std::isnan(want) ? std::isnan(got[i]) : float_bits(got[i]) == float_bits(want);
    if (!ok && bad++ == 0) {
      std::ostringstream os;
      os << name << ": to_float(bits 0x" << std::hex << i << std::dec << ") = " << got[i]
         << ", want " << want;
      af2_test::report_failure(__FILE__, __LINE__, os.str());
    }
  }
  EXPECT_EQ(bad, 0);
}

}  // namespace

TEST_CASE(warp_reduce_width_32) { check_warp_reduce<32>(1); }
TEST_CASE(warp_reduce_width_16) { check_warp_reduce<16>(2); }
TEST_CASE(warp_reduce_width_8) { check_warp_reduce<8>(3); }
TEST_CASE(warp_reduce_width_4) { check_warp_reduce<4>(4); }
TEST_CASE(warp_reduce_width_2) { check_warp_reduce<2>(5); }
TEST_CASE(warp_reduce_width_1) { check_warp_reduce<1>(6); }

TEST_CASE(convert_float_is_identity) {
  const std::vector<float> in = conversion_inputs();
  std::vector<float> narrow, back;
  run_round_trip<float>(in, &narrow, &back);
  int bad = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    bad += float_bits(narrow[i]) != float_bits(in[i]) || float_bits(back[i]) != float_bits(in[i]);
  }
  EXPECT_EQ(bad, 0);
}

TEST_CASE(convert_half_round_trip) { check_round_trip<__half>(round_to_half, decode_half, "half"); }
TEST_CASE(convert_bf16_round_trip) {
  check_round_trip<__nv_bfloat16>(round_to_bf16, decode_bf16, "bf16");
}
TEST_CASE(to_float_half_all_bit_patterns) { check_decode_all<__half>(decode_half, "half"); }
TEST_CASE(to_float_bf16_all_bit_patterns) { check_decode_all<__nv_bfloat16>(decode_bf16, "bf16"); }

TEST_CASE(reference_self_check) {
  // The CPU references must agree with each other on exactly representable values, or the
  // device comparisons above mean nothing.
  EXPECT_EQ(round_to_half(65504.0f), decode_half(0x7bff));
  EXPECT_EQ(round_to_half(65520.0f), kInf);
  EXPECT_EQ(round_to_half(1.0f + 1.0f / 2048), 1.0f);  // tie rounds to even mantissa
  EXPECT_EQ(round_to_half(1.0f + 3.0f / 2048), decode_half(0x3c02));
  EXPECT_EQ(round_to_half(std::ldexp(1.0f, -24)), decode_half(0x0001));
  EXPECT_EQ(round_to_bf16(1.0f + 1.0f / 256), 1.0f);
  EXPECT_EQ(round_to_bf16(1.0f + 3.0f / 256), decode_bf16(0x3f82));
  EXPECT_EQ(round_to_bf16(3.4e38f), kInf);
}

AF2_TEST_MAIN()
