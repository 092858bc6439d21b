// cuda_tests for the fused coupling kernel of reversible recompute (csrc/reversible/reversible_kernel.cu):
// every (buffer dtype, added dtype) pair against the host expression round(float(dst) + sign * float(src)),
// which the kernel must match bit for bit; both updates of one launch; sizes around the grid-stride limits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "reversible/reversible.h"
#include "test_main.h"

namespace {

using af2_ext::CouplingUpdate;
using af2_ext::ScalarKind;

size_t element_size(ScalarKind k) { return k == ScalarKind::kFloat32 ? 4 : 2; }

// Host values stored in `kind`, read back as the float each stored element represents.
std::vector<uint8_t> encode(const std::vector<float>& v, ScalarKind kind) {
  std::vector<uint8_t> bytes(v.size() * element_size(kind));
  for (size_t i = 0; i < v.size(); ++i) {
    if (kind == ScalarKind::kFloat32) {
      std::memcpy(&bytes[i * 4], &v[i], 4);
    } else if (kind == ScalarKind::kFloat16) {
      const __half h = __float2half_rn(v[i]);
      std::memcpy(&bytes[i * 2], &h, 2);
    } else {
      const __nv_bfloat16 b = __float2bfloat16_rn(v[i]);
      std::memcpy(&bytes[i * 2], &b, 2);
    }
  }
  return bytes;
}

std::vector<float> decode(const std::vector<uint8_t>& bytes, ScalarKind kind) {
  const size_t n = bytes.size() / element_size(kind);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    if (kind == ScalarKind::kFloat32) {
      std::memcpy(&v[i], &bytes[i * 4], 4);
    } else if (kind == ScalarKind::kFloat16) {
      __half h;
      std::memcpy(&h, &bytes[i * 2], 2);
      v[i] = __half2float(h);
    } else {
      __nv_bfloat16 b;
      std::memcpy(&b, &bytes[i * 2], 2);
      v[i] = __bfloat162float(b);
    }
  }
  return v;
}

float round_to(float x, ScalarKind kind) { return decode(encode({x}, kind), kind)[0]; }

struct Case {
  std::vector<uint8_t> dst, src;
  std::vector<float> want;
};

Case make_case(size_t n, ScalarKind dst_kind, ScalarKind src_kind, float sign, unsigned seed) {
  Case c;
  c.dst = encode(af2_test::random_normal(n, seed), dst_kind);
  c.src = encode(af2_test::random_normal(n, seed + 1), src_kind);
  const auto d = decode(c.dst, dst_kind), s = decode(c.src, src_kind);
  c.want.resize(n);
  for (size_t i = 0; i < n; ++i) c.want[i] = round_to(d[i] + sign * s[i], dst_kind);
  return c;
}

const ScalarKind kKinds[] = {ScalarKind::kFloat32, ScalarKind::kFloat16, ScalarKind::kBFloat16};

}  // namespace

TEST_CASE(single_update_every_dtype_pair) {
  for (ScalarKind dk : kKinds)
    for (ScalarKind sk : kKinds)
      for (size_t n : {size_t(1), size_t(255), size_t(4097)}) {
        Case c = make_case(n, dk, sk, 1.f, unsigned(n) + 10 * int(dk) + 100 * int(sk));
        af2_test::DeviceBuffer<uint8_t> dst(c.dst), src(c.src);
        CouplingUpdate u;
        u.n = int64_t(n);
        u.dst_dtype = dk;
        u.src_dtype = sk;
        u.dst = dst.get();
        u.src = src.get();
        CHECK_EQ(af2_ext::cuda::coupling_update(u, CouplingUpdate{}, nullptr), 0);
        CUDA_CHECK(cudaDeviceSynchronize());
        const auto got = decode(dst.to_host(), dk);
        EXPECT_ALLCLOSE(got, c.want, 0.f, 0.f);  // bit-exact: fp32 arithmetic, one rounding
      }
}

TEST_CASE(two_updates_one_launch) {
  // y -= f (bf16 storage, fp32 f) and grad += vjp (fp32) of a different size, as coupling_backward_ does.
  const size_t ny = 1000, ng = 333;
  Case y = make_case(ny, ScalarKind::kBFloat16, ScalarKind::kFloat32, -1.f, 7);
  Case g = make_case(ng, ScalarKind::kFloat32, ScalarKind::kFloat32, 1.f, 8);
  af2_test::DeviceBuffer<uint8_t> yd(y.dst), fd(y.src), gd(g.dst), vd(g.src);
  CouplingUpdate first, second;
  first.n = int64_t(ny);
  first.dst_dtype = ScalarKind::kBFloat16;
  first.src_dtype = ScalarKind::kFloat32;
  first.dst = yd.get();
  first.src = fd.get();
  first.sign = -1.f;
  second.n = int64_t(ng);
  second.dst = gd.get();
  second.src = vd.get();
  CHECK_EQ(af2_ext::cuda::coupling_update(first, second, nullptr), 0);
  CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_ALLCLOSE(decode(yd.to_host(), ScalarKind::kBFloat16), y.want, 0.f, 0.f);
  EXPECT_ALLCLOSE(decode(gd.to_host(), ScalarKind::kFloat32), g.want, 0.f, 0.f);
}

TEST_CASE(grid_stride_covers_large_sizes) {
  // More elements than one grid of 65536 x 256 threads covers: the grid-stride loop must reach them all.
  const size_t n = size_t(65536) * 256 + 12345;
  std::vector<float> ones(n, 1.f), twos(n, 2.f);
  af2_test::DeviceBuffer<float> dst(ones), src(twos);
  CouplingUpdate u;
  u.n = int64_t(n);
  u.dst = dst.get();
  u.src = src.get();
  CHECK_EQ(af2_ext::cuda::coupling_update(u, CouplingUpdate{}, nullptr), 0);
  CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = dst.to_host();
  size_t wrong = 0;
  for (float v : got) wrong += v != 3.f;
  EXPECT_EQ(wrong, size_t(0));
}

TEST_CASE(empty_is_a_no_op) {
  EXPECT_EQ(af2_ext::cuda::coupling_update(CouplingUpdate{}, CouplingUpdate{}, nullptr), 0);
}

AF2_TEST_MAIN()
