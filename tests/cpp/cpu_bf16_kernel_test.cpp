// The bf16 compute mode's pair kernels (src/cpu/kernels_avx512_bf16.cpp) on random tiles, against
// float64 sums written here from the packed format's definition (cpu_layout.h).
//
// The bound (reasoned, not tuned). The weights w = s * (q - z) are exact (q - z has at most 8
// significant bits; s is applied in fp32 per block, exactly as the exact kernels do), so the only
// new error is the rounding of each activation to bf16: |bf16(x) - x| <= 2^-8 |x| (nearest even, 8
// significant bits). For one output y = sum_c w_c x_c that gives
//   |y_kernel - y| <= 2^-8 * S + g * S_b,   S = sum |w_c x_c|,  S_b = sum |w_c bf16(x_c)|,
// with g = n u / (1 - n u), u = 2^-24, the fp32 accumulation of the kernel over a path of at most
// n = K + nb + 4 roundings (a chain step adds two exact bf16 x bf16 products, ev + od, the scale's fma,
// one add per block). Checked twice per output:
//   1. against y computed from the unrounded x, with the whole bound (the mode's promise);
//   2. against y_b computed from bf16(x), with g * S_b only: the kernel really uses the rounded x of
//      every column exactly once, with the right weight (an off-by-one column, wrong nibble or wrong
//      zero point is far outside g * S_b).
// x stays in [-2, 2] away from 0 by at least 2^-20, so no bf16 denormal (which vdpbf16ps flushes) occurs.
// Also: a token's result is bitwise the same whatever other tokens share the call (determinism across
// chunk sizes depends on it), and a pair with an infinite scale gives exactly the exact portable
// kernel's result (the fallback).
//
// Shapes: int4 and int8; row-wise and blocks 16..256; odd K (and K below one block); zero points on
// neither, one or both tiles; fp32/fp16/bf16 scales; 1..tokens_per_call tokens per call. A fresh seed per run,
// printed with every failure; replay with QMOE_TEST_SEED=<seed>.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_layout.h"
#include "cpu_isas.h"
#include "qmoe/dtype.h"
#include "random_pair.h"
#include "test_seed.h"

namespace {

using namespace qmoe;
using namespace qmoe::cpu;

using test::base_seed;

// One random pair job: the weights (random_pair.h) and the token rows, fp32 and bf16.
struct PairCase : test::RandomPairWeights {
  int tokens = 1;
  std::vector<float> x[kMaxTokens];
  std::vector<uint16_t> xb[kMaxTokens];

  std::string str() const { return weights_str() + " tokens=" + std::to_string(tokens); }

  void make(std::mt19937_64& rng) {
    make_weights(rng);
    const int pack = 8 / bits;
    std::uniform_real_distribution<float> xd(-2.f, 2.f);
    for (int t = 0; t < tokens; ++t) {
      x[t].assign(size_t(J * pack), 0.f);  // zero past K, as the backend's rows are
      xb[t].assign(size_t(J * pack), 0);
      for (int64_t c = 0; c < K; ++c) {
        float v = xd(rng);
        if (std::fabs(v) < 0x1p-20f) v = 0x1p-20f;
        x[t][size_t(c)] = v;
        xb[t][size_t(c)] = float_to_bf16(v);
      }
    }
  }

  PairJob job(float* acc) const {
    PairJob jb{};
    fill(jb);
    jb.tokens = tokens;
    for (int t = 0; t < tokens; ++t) jb.x[t] = x[t].data(), jb.xb[t] = xb[t].data();
    jb.acc = acc;
    return jb;
  }

  // y (from x or from bf16(x)) and S = sum |w x| in float64, for lane (tile, l) and token t.
  void exact(int tile, int l, int t, bool rounded, double& y, double& s_abs) const {
    y = 0, s_abs = 0;
    for (int64_t c = 0; c < K; ++c) {
      const double w = weight(tile, l, c);
      const double xv = rounded ? double(bf16_to_float(xb[t][size_t(c)])) : double(x[t][size_t(c)]);
      y += w * xv, s_abs += std::fabs(w * xv);
    }
  }
};

using test::has_avx512_bf16;
PairKernel bf16_kernel(int bits) { return test::kernel_of(avx512_bf16_kernels(), bits); }

TEST(CpuBf16Kernel, WithinBoundOfExactSum) {
  if (!has_avx512_bf16()) GTEST_SKIP() << "this CPU lacks AVX512_BF16";
  std::mt19937_64 rng(base_seed());
  int checked = 0;
  for (int bits : {4, 8})
    for (int64_t block : {int64_t(0), int64_t(16), int64_t(32), int64_t(64), int64_t(128), int64_t(256)})
      for (int rep = 0; rep < 6; ++rep) {
        PairCase c;
        c.random_shape(rng, bits, block, rep);
        c.tokens = 1 + int(rng() % uint64_t(avx512_bf16_kernels().tokens_per_call(bits)));
        c.make(rng);
        std::vector<float> acc(size_t(c.tokens * kPairRows));
        bf16_kernel(bits)(c.job(acc.data()));
        const double n = double(c.K + c.nb + 4), g = n * 0x1p-24 / (1 - n * 0x1p-24);
        for (int t = 0; t < c.tokens; ++t)
          for (int lane = 0; lane < kPairRows; ++lane) {
            double y, s, yb, sb;
            c.exact(lane / kTileRows, lane % kTileRows, t, false, y, s);
            c.exact(lane / kTileRows, lane % kTileRows, t, true, yb, sb);
            const double got = acc[size_t(t * kPairRows + lane)];
            ASSERT_LE(std::fabs(got - y), 0x1p-8 * s + g * sb)
                << c.str() << " token " << t << " lane " << lane << ": kernel " << got << " exact " << y
                << " (sum |w x| " << s << ", base seed " << base_seed() << ")";
            ASSERT_LE(std::fabs(got - yb), g * sb)
                << c.str() << " token " << t << " lane " << lane << ": kernel " << got << " vs sum with bf16(x) " << yb
                << " (sum |w x| " << sb << ", base seed " << base_seed() << ")";
            ++checked;
          }
      }
  EXPECT_GT(checked, 0);
}

TEST(CpuBf16Kernel, TokenResultIndependentOfBatch) {
  if (!has_avx512_bf16()) GTEST_SKIP() << "this CPU lacks AVX512_BF16";
  std::mt19937_64 rng(base_seed() + 1);
  test::expect_tokens_independent<PairCase>(avx512_bf16_kernels(), rng);
}

TEST(CpuBf16Kernel, InfiniteScaleFallsBackToExactKernel) {
  if (!has_avx512_bf16()) GTEST_SKIP() << "this CPU lacks AVX512_BF16";
  std::mt19937_64 rng(base_seed() + 2);
  test::expect_infinite_scale_falls_back<PairCase>(avx512_bf16_kernels(), rng);
}

}  // namespace
