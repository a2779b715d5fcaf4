// The vector SwiGLU of the bf16 and int8 compute modes (KernelSet::swiglu, kernels_avx512_common.h)
// against swiglu_scalar, the contract's formula, on random values and on the edges (limits, overflow
// and underflow of e^x, NaN, infinities, signed zeros): the same NaN and infinities, and otherwise
//   |got - want| <= 8 ulp(want) + |g (u + beta)| * FLT_MIN.
// Why: the two differ only in e^x (the vector one is within ~2 ulp), after which each computes
// 1 + e, the division and two products, each rounding on its own (up to 4 more ulp between them);
// measured worst over 44.8M random values: 7 ulp. The second term covers a sigmoid below FLT_MIN
// (alpha |g| > 87), where both lose relative precision in the subnormals and e^x may overflow in one
// and not the other at the boundary.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu_isas.h"
#include "qmoe/reference.h"
#include "qmoe/spec.h"

namespace qmoe {
namespace {

float ulp_of(float v) {
  const float a = std::fabs(v);
  return std::nextafter(a, std::numeric_limits<float>::infinity()) - a;
}

// Compares the kernel set's SwiGLU with swiglu_scalar on `g` + `bg`, `u` + `bu` (any length, 16 at a
// time; empty bias vectors: no bias).
void expect_close(cpu::SwigluFn f, const MoeSpec& s, std::vector<float> g, std::vector<float> u,
                  const std::vector<float>& bg = {}, const std::vector<float>& bu = {}) {
  std::vector<float> out(g.size(), -1.f);
  for (size_t i = 0; i < g.size(); i += 16) {
    const int n = int(std::min<size_t>(16, g.size() - i));
    f(g.data() + i, u.data() + i, bg.empty() ? nullptr : bg.data() + i, bu.empty() ? nullptr : bu.data() + i,
      out.data() + i, n, s.swiglu_limit, s.activation_alpha, s.activation_beta);
  }
  for (size_t i = 0; i < g.size(); ++i) {  // the sums the kernel forms, for the scalar formula
    if (!bg.empty()) g[i] += bg[i];
    if (!bu.empty()) u[i] += bu[i];
  }
  for (size_t i = 0; i < g.size(); ++i) {
    const float want = swiglu_scalar(s, g[i], u[i]), got = out[i];
    SCOPED_TRACE("g=" + std::to_string(g[i]) + " u=" + std::to_string(u[i]) + " limit=" +
                 std::to_string(s.swiglu_limit) + " alpha=" + std::to_string(s.activation_alpha) +
                 " beta=" + std::to_string(s.activation_beta));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << got;
    } else if (std::isinf(want)) {
      EXPECT_EQ(got, want);
    } else {
      const double gu = std::fabs(double(std::min(g[i], s.swiglu_limit)) *
                                  (double(std::clamp(u[i], -s.swiglu_limit, s.swiglu_limit)) + s.activation_beta));
      const double tol = 8.0 * std::max(ulp_of(want), std::numeric_limits<float>::denorm_min()) +
                         gu * std::numeric_limits<float>::min();
      EXPECT_LE(std::fabs(double(got) - double(want)), tol) << "got " << got << " want " << want;
    }
  }
}

std::vector<cpu::SwigluFn> vector_swiglus() {
  std::vector<cpu::SwigluFn> v;
  if (test::has_avx512_bf16()) v.push_back(cpu::avx512_bf16_kernels().swiglu);
  if (test::has_avx512_vnni()) v.push_back(cpu::avx512_vnni_kernels().swiglu);
  return v;
}

TEST(CpuSwiglu, ExactSetsUseTheScalarFormula) {
  EXPECT_EQ(cpu::portable_kernels().swiglu, nullptr);
  EXPECT_EQ(cpu::avx2_kernels().swiglu, nullptr);
  EXPECT_EQ(cpu::avx512_kernels().swiglu, nullptr);
}

TEST(CpuSwiglu, VectorMatchesScalarOnRandomValues) {
  const auto fns = vector_swiglus();
  if (fns.empty()) GTEST_SKIP() << "no AVX-512 BF16 or VNNI on this CPU";
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const float inf = std::numeric_limits<float>::infinity();
  struct Params { float limit, alpha, beta; };
  for (const Params p : {Params{inf, 1.f, 0.f}, Params{7.f, 1.702f, 1.f}, Params{3.5f, 0.5f, -0.25f}}) {
    MoeSpec s;
    s.swiglu_limit = p.limit, s.activation_alpha = p.alpha, s.activation_beta = p.beta;
    for (float scale : {0.01f, 1.f, 8.f, 60.f}) {
      std::normal_distribution<float> d(0.f, scale);
      std::vector<float> g(1000), u(1000);
      for (size_t i = 0; i < g.size(); ++i) g[i] = d(rng), u[i] = d(rng);
      std::vector<float> bg(g.size()), bu(g.size());  // biases, added by the kernel before the formula
      for (size_t i = 0; i < g.size(); ++i) bg[i] = d(rng), bu[i] = d(rng);
      for (cpu::SwigluFn f : fns) {
        expect_close(f, s, g, u);
        expect_close(f, s, g, u, bg, bu);
        expect_close(f, s, g, u, bg, {});
      }
    }
  }
}

TEST(CpuSwiglu, VectorMatchesScalarOnEdges) {
  const auto fns = vector_swiglus();
  if (fns.empty()) GTEST_SKIP() << "no AVX-512 BF16 or VNNI on this CPU";
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> edges = {0.f,   -0.f,  1e-30f, -1e-30f, 7.f,   -7.f,  7.0001f, -7.0001f, 80.f,  -80.f,
                                    87.f,  -87.f, 88.5f,  -88.5f,  89.f,  -89.f, 103.f,   -103.f,   110.f, -110.f,
                                    3e38f, -3e38f, inf,   -inf,    nan};
  std::vector<float> g, u;
  for (float a : edges)
    for (float b : edges) g.push_back(a), u.push_back(b);
  for (const float limit : {inf, 7.f}) {
    MoeSpec s;
    s.swiglu_limit = limit, s.activation_alpha = 1.702f, s.activation_beta = 1.f;
    for (cpu::SwigluFn f : fns) expect_close(f, s, g, u);
  }
}

}  // namespace
}  // namespace qmoe
