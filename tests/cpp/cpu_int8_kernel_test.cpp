// The int8 compute mode's pair kernels (src/cpu/kernels_avx512_vnni.cpp) on random tiles, with the
// activation rows made by quantize_row_int8 (int8_rows.h), against float64 sums written here from the
// packed format's definition (cpu_layout.h).
//
// The bound (reasoned, not tuned). The weights w = s * (q - z) are used exactly (integer codes, the
// scale applied once per group in fp32), so the new error is the activation rounding: with
// sx = max|x| / 127, |x - sx * xq| <= sx / 2 per column (+ 2^-24 relative for sx's own rounding). For
// one output y = sum_c w_c x_c that gives
//   |y_kernel - y| <= (sx / 2) * W + g * m * W,   W = sum_c |w_c|,  m = max|x| (>= |sx * xq|),
// where g covers the fp32 steps: per group float(isum) is exact (< 2^24), fma(s, isum, acc) rounds once
// (a path of at most nb groups + 1 roundings, each relative to at most m * W), and the final * sx once.
// Checked twice per output:
//   1. against y from the unrounded x, with the whole bound (the mode's promise);
//   2. against y_q = sum_c w_c * (sx * xq_c), with g * m * W only: the kernel really uses every
//      column's code exactly once, with the right weight and zero point (an off-by-one column, a wrong
//      nibble or zero point is far outside it).
// Also: a token's result is bitwise the same whatever other tokens share the call (determinism across
// chunk sizes depends on it), a pair with an infinite scale gives exactly the exact portable kernel's
// result (the fallback), a row of zeros gives zeros, and the activation quantizer's own contract.
//
// Shapes: int4 and int8; row-wise and blocks 16..256 and 512 (two integer groups per block); odd K (and K
// below one block, and K past one row-wise group of 256); zero points on neither, one or both tiles;
// fp32/fp16/bf16 scales; 1..tokens_per_call tokens per call. A fresh seed per run, printed with every
// failure; replay with QMOE_TEST_SEED=<seed>.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_layout.h"
#include "cpu/int8_rows.h"
#include "cpu_isas.h"
#include "qmoe/dtype.h"
#include "random_pair.h"
#include "test_seed.h"

namespace {

using namespace qmoe;
using namespace qmoe::cpu;

using test::base_seed;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The value column c of a row of `planes` digit planes (int8_rows.h) stands for, in float64.
double digits_value(const int8_t* q, int64_t W, int bits, int64_t block, int planes, float sx, int64_t c) {
  const int64_t slot = int8_column_slot(bits, c), G = int8_group_cols(block);
  if (planes == kInt8PairDigits) {
    const auto digit = [&](int d) { return double(q[int8_digit_offset(true, W, G, d, slot)]); };
    return double(sx) * (4096 * (16 * digit(0) + digit(1)) + 16 * digit(2) + digit(3));
  }
  double v = 0, unit = sx;
  for (int d = 0; d < planes; ++d, unit /= kInt8DigitBase) v += unit * q[int8_digit_offset(false, W, G, d, slot)];
  return v;
}

// One random pair job: the weights (random_pair.h) and the token rows, fp32 and as quantize_row_int8
// makes them.
// digits = kInt8Digits: the int8x3 mode's rows (quantize_row_int8_digits: three digits, or two digit pairs for
// 4-bit weights in blocks of 16 or 32), planes W codes and W / 16 sums apart.
struct PairCase : test::RandomPairWeights {
  int tokens = 1;
  int digits = 1;
  int64_t W = 0;  // row width of the quantized rows
  std::vector<float> x[kMaxTokens];
  std::vector<int8_t> xq[kMaxTokens];
  std::vector<int32_t> nsum[kMaxTokens];
  float sx[kMaxTokens] = {};

  std::string str() const {
    return weights_str() + " tokens=" + std::to_string(tokens) + (digits > 1 ? " digits=" + std::to_string(digits) : "");
  }

  // Digit planes of a row: 1, or int8_digit_count's 3 or 4 (pairs).
  int planes() const { return digits == 1 ? 1 : int8_digit_count(bits, block); }
  bool pairs() const { return planes() == kInt8PairDigits; }

  void quantize(int t) {
    xq[t].assign(size_t(planes() * W), 0);
    nsum[t].assign(size_t(planes() * W / 16), 0);
    if (digits == 1) quantize_row_int8(x[t].data(), K, W, bits, block, xq[t].data(), nsum[t].data(), &sx[t]);
    else quantize_row_int8_digits(x[t].data(), K, W, bits, block, xq[t].data(), nsum[t].data(), W / 16, &sx[t]);
  }
  // The value the codes of token t, column c stand for, in float64.
  double xhat(int t, int64_t c) const { return digits_value(xq[t].data(), W, bits, block, planes(), sx[t], c); }

  void make(std::mt19937_64& rng) {
    make_weights(rng);
    W = round_up(K + 8, 64);  // as the backend's rows: readable and zero past K
    std::uniform_real_distribution<float> xd(-2.f, 2.f);
    for (int t = 0; t < tokens; ++t) {
      x[t].assign(size_t(W), 0.f);
      const float amp = std::ldexp(1.f, int(rng() % 16) - 8);  // rows of different magnitudes
      for (int64_t c = 0; c < K; ++c) x[t][size_t(c)] = amp * xd(rng);
      quantize(t);
    }
  }

  PairJob job(float* acc) const {
    PairJob jb{};
    fill(jb);
    jb.tokens = tokens;
    for (int t = 0; t < tokens; ++t)
      jb.x[t] = x[t].data(), jb.xq[t] = xq[t].data(), jb.xneg_sum[t] = nsum[t].data(), jb.xscale[t] = sx[t];
    jb.xq_digit_stride = W, jb.xneg_digit_stride = W / 16;
    jb.xq_pairs = pairs();
    jb.acc = acc;
    return jb;
  }

  // y from x (or from sx * xq), W = sum |w| and m = max |x| in float64, for lane (tile, l) and token t.
  void exact(int tile, int l, int t, bool quantized, double& y, double& w_abs, double& m) const {
    y = 0, w_abs = 0, m = 0;
    for (int64_t c = 0; c < K; ++c) {
      const double w = weight(tile, l, c);
      const double xv = quantized ? xhat(t, c) : double(x[t][size_t(c)]);
      y += w * xv, w_abs += std::fabs(w), m = std::max(m, std::fabs(double(x[t][size_t(c)])));
    }
  }
};

using test::has_avx512_vnni;
PairKernel int8_kernel(int bits) { return test::kernel_of(avx512_vnni_kernels(), bits); }

// The bound of the file's header for rows of `digits` digit planes: each column's rounding is sx / 2 /
// 254^(digits - 1), and the combination of the digits' sums adds up to two fp32 roundings per group and
// two rounded constants (counted as two more).
void expect_within_bound(const KernelSet& ks, int digits, std::mt19937_64& rng) {
  int checked = 0;
  for (int bits : {4, 8})
    for (int64_t block : {int64_t(0), int64_t(16), int64_t(32), int64_t(64), int64_t(128), int64_t(256), int64_t(512)})
      for (int rep = 0; rep < 6; ++rep) {
        PairCase c;
        c.digits = digits;
        c.random_shape(rng, bits, block, rep);
        c.tokens = 1 + int(rng() % uint64_t(ks.tokens_per_call(bits)));
        c.make(rng);
        std::vector<float> acc(size_t(c.tokens * kPairRows));
        test::kernel_of(ks, bits)(c.job(acc.data()));
        const int64_t groups = (c.K + 255) / 256 + c.nb;  // an upper bound on the integer groups
        const double n = double((digits > 1 ? 5 : 1) * groups + 2), g = n * 0x1p-24 / (1 - n * 0x1p-24) + 0x1p-23;
        // A column's rounding, in units of sx (pairs: sx is max|x| / 2^23).
        const double step = c.pairs() ? 0.5 : 0.5 / std::pow(double(kInt8DigitBase), digits - 1);
        for (int t = 0; t < c.tokens; ++t)
          for (int lane = 0; lane < kPairRows; ++lane) {
            double y, w, m, yq, wq, mq;
            c.exact(lane / kTileRows, lane % kTileRows, t, false, y, w, m);
            c.exact(lane / kTileRows, lane % kTileRows, t, true, yq, wq, mq);
            const double got = acc[size_t(t * kPairRows + lane)];
            ASSERT_LE(std::fabs(got - y), step * double(c.sx[t]) * w * (1 + 0x1p-22) + g * m * w)
                << c.str() << " token " << t << " lane " << lane << ": kernel " << got << " exact " << y << " (sum |w| "
                << w << ", sx " << c.sx[t] << ", base seed " << base_seed() << ")";
            ASSERT_LE(std::fabs(got - yq), g * m * w)
                << c.str() << " token " << t << " lane " << lane << ": kernel " << got << " vs sum with the codes' value "
                << yq << " (sum |w| " << w << ", base seed " << base_seed() << ")";
            ++checked;
          }
      }
  EXPECT_GT(checked, 0);
}

TEST(CpuInt8Kernel, WithinBoundOfExactSum) {
  if (!has_avx512_vnni()) GTEST_SKIP() << "this CPU lacks AVX512_VNNI";
  std::mt19937_64 rng(base_seed());
  expect_within_bound(avx512_vnni_kernels(), 1, rng);
}

// The int8x3 mode's kernels (three digit planes; tile multiplies, and vpdpbusd for calls of 1-2 tokens):
// within the bound, a token's result independent of its call (the two kinds' sums bitwise equal: below),
// the infinite-scale fallback.
TEST(CpuInt8Kernel, DigitsWithinBoundOfExactSum) {
  if (!amx_available()) GTEST_SKIP() << "this CPU (or OS) gives no AMX tile multiplies";
  std::mt19937_64 rng(base_seed() + 7);
  expect_within_bound(avx512_amx_digits_kernels(), kInt8Digits, rng);
}

struct DigitCase : PairCase {
  DigitCase() { digits = kInt8Digits; }
};

TEST(CpuInt8Kernel, DigitsTokenResultIndependentOfBatch) {
  if (!amx_available()) GTEST_SKIP() << "this CPU (or OS) gives no AMX tile multiplies";
  std::mt19937_64 rng(base_seed() + 8);
  test::expect_tokens_independent<DigitCase>(avx512_amx_digits_kernels(), rng);
  test::expect_infinite_scale_falls_back<DigitCase>(avx512_amx_digits_kernels(), rng);
}

// The VBMI kernels transpose the weight codes with one byte permute instead of two shuffles: the same
// bytes, so the same sums, bit for bit, for every width, block, zero points, token count and odd K.
TEST(CpuInt8Kernel, VbmiTransposeGivesTheSameSums) {
  if (!test::has_avx512_vnni_vbmi()) GTEST_SKIP() << "this CPU lacks AVX512_VNNI or AVX512_VBMI";
  std::mt19937_64 rng(base_seed() + 4);
  int compared = 0;
  for (int bits : {4, 8})
    for (int64_t block : {int64_t(0), int64_t(16), int64_t(32), int64_t(64), int64_t(128), int64_t(256)})
      for (int rep = 0; rep < 4; ++rep) {
        PairCase c;
        c.random_shape(rng, bits, block, rep);
        c.tokens = 1 + int(rng() % uint64_t(avx512_vnni_kernels(false).tokens_per_call(bits)));
        c.make(rng);
        std::vector<float> plain(size_t(c.tokens * kPairRows)), vbmi(plain.size());
        test::kernel_of(avx512_vnni_kernels(false), bits)(c.job(plain.data()));
        test::kernel_of(avx512_vnni_kernels(true), bits)(c.job(vbmi.data()));
        ASSERT_EQ(std::memcmp(plain.data(), vbmi.data(), plain.size() * sizeof(float)), 0)
            << c.str() << ": the VBMI kernel's sums differ (base seed " << base_seed() << ")";
        compared += int(plain.size());
      }
  EXPECT_GT(compared, 0);
}

// The AMX kernels (every call on the tile multiplies, 1..32 tokens) give the VNNI kernels' sums bit for
// bit: with the token rows apart (copied into a block by the kernel) and as one strided block (loaded in
// place, as the backend hands them). digits = kInt8Digits: the int8x3 mode's kernels of both kinds.
void expect_amx_equals_vnni(int digits, std::mt19937_64& rng) {
  const KernelSet& amx_set = digits == 1 ? avx512_amx_kernels(true) : avx512_amx_digits_kernels(true);
  int compared = 0;
  for (int bits : {4, 8})
    for (int64_t block : {int64_t(0), int64_t(16), int64_t(32), int64_t(64), int64_t(128), int64_t(256), int64_t(512)})
      for (int rep = 0; rep < 6; ++rep) {
        PairCase c;
        c.digits = digits;
        c.random_shape(rng, bits, block, rep);
        c.tokens = 1 + int(rng() % uint64_t(amx_set.tokens_per_call(bits)));
        c.make(rng);
        std::vector<float> vnni(size_t(c.tokens * kPairRows));
        for (int t = 0; t < c.tokens; ++t) {  // one token per call: a token's sums do not depend on the others
          PairJob jb = c.job(vnni.data() + t * kPairRows);
          jb.tokens = 1, jb.x[0] = jb.x[t], jb.xq[0] = jb.xq[t], jb.xneg_sum[0] = jb.xneg_sum[t], jb.xscale[0] = jb.xscale[t];
          if (digits == 1) int8_kernel(bits)(jb);
          else avx512_vnni_digits(jb);
        }
        const int64_t row = c.planes() * c.W;  // one token's codes, its digit planes W apart
        std::vector<int8_t> block_rows(size_t(c.tokens * row));
        for (int t = 0; t < c.tokens; ++t) std::memcpy(block_rows.data() + t * row, c.xq[t].data(), size_t(row));
        for (bool strided : {false, true}) {
          std::vector<float> amx(vnni.size());
          PairJob jb = c.job(amx.data());
          if (strided)
            for (int t = 0; t < c.tokens; ++t) jb.xq[t] = block_rows.data() + t * row;
          test::kernel_of(amx_set, bits)(jb);
          ASSERT_EQ(std::memcmp(vnni.data(), amx.data(), vnni.size() * sizeof(float)), 0)
              << c.str() << (strided ? " (rows as one block)" : " (rows apart)")
              << ": the AMX kernel's sums differ from the VNNI kernel's (base seed " << base_seed() << ")";
          compared += int(amx.size());
        }
      }
  EXPECT_GT(compared, 0);
}

TEST(CpuInt8Kernel, AmxGivesTheVnniSums) {
  if (!amx_available()) GTEST_SKIP() << "this CPU (or OS) gives no AMX tile multiplies";
  std::mt19937_64 rng(base_seed() + 5);
  expect_amx_equals_vnni(1, rng);
}

TEST(CpuInt8Kernel, AmxDigitsGiveTheVnniDigitSums) {
  if (!amx_available()) GTEST_SKIP() << "this CPU (or OS) gives no AMX tile multiplies";
  std::mt19937_64 rng(base_seed() + 10);
  expect_amx_equals_vnni(kInt8Digits, rng);
}

TEST(CpuInt8Kernel, AmxTokenResultIndependentOfBatch) {
  if (!amx_available()) GTEST_SKIP() << "this CPU (or OS) gives no AMX tile multiplies";
  std::mt19937_64 rng(base_seed() + 6);
  test::expect_tokens_independent<PairCase>(avx512_amx_kernels(true), rng);
  test::expect_infinite_scale_falls_back<PairCase>(avx512_amx_kernels(true), rng);
}

TEST(CpuInt8Kernel, TokenResultIndependentOfBatch) {
  if (!has_avx512_vnni()) GTEST_SKIP() << "this CPU lacks AVX512_VNNI";
  std::mt19937_64 rng(base_seed() + 1);
  test::expect_tokens_independent<PairCase>(avx512_vnni_kernels(), rng);
}

TEST(CpuInt8Kernel, InfiniteScaleFallsBackToExactKernel) {
  if (!has_avx512_vnni()) GTEST_SKIP() << "this CPU lacks AVX512_VNNI";
  std::mt19937_64 rng(base_seed() + 2);
  test::expect_infinite_scale_falls_back<PairCase>(avx512_vnni_kernels(), rng);
}

// A row of zeros: sx = 0, codes 0, outputs +0 (zero points or not).
TEST(CpuInt8Kernel, ZeroRowGivesZeros) {
  if (!has_avx512_vnni()) GTEST_SKIP() << "this CPU lacks AVX512_VNNI";
  std::mt19937_64 rng(base_seed() + 3);
  for (int bits : {4, 8}) {
    PairCase c;
    c.bits = bits, c.block = 16, c.K = 75, c.zp[1] = true, c.tokens = 2;
    c.make(rng);
    std::fill(c.x[1].begin(), c.x[1].end(), 0.f);
    c.quantize(1);
    EXPECT_EQ(c.sx[1], 0.f);
    std::vector<float> acc(size_t(2 * kPairRows), 1.f);
    int8_kernel(bits)(c.job(acc.data()));
    for (int lane = 0; lane < kPairRows; ++lane) ASSERT_EQ(acc[size_t(kPairRows + lane)], 0.f) << c.str() << " lane " << lane;
  }
}

// quantize_row_int8's contract (int8_rows.h): codes in [-127, 127], |x - sx q| <= sx / 2, the extreme
// column gets +-127, group sums, zeros past K, the slot order for int4, NaN scale for non-finite rows.
TEST(CpuInt8Kernel, QuantizerContract) {
  std::mt19937_64 rng(base_seed() + 4);
  std::uniform_real_distribution<float> xd(-3.f, 3.f);
  for (int bits : {4, 8})
    for (int64_t block : {int64_t(0), int64_t(16), int64_t(128), int64_t(512)}) {
      const int64_t K = 2 * int64_t(rng() % 400) + 1, W = round_up(K + 8, 16), G = int8_group_cols(block);
      std::vector<float> x(size_t(W), 0.f);
      for (int64_t c = 0; c < K; ++c) x[size_t(c)] = xd(rng);
      std::vector<int8_t> q(size_t(W), 99);
      std::vector<int32_t> ns(size_t(W / 16), 99);
      float sx = -1;
      quantize_row_int8(x.data(), K, W, bits, block, q.data(), ns.data(), &sx);
      float m = 0;
      for (int64_t c = 0; c < K; ++c) m = std::max(m, std::fabs(x[size_t(c)]));
      ASSERT_EQ(sx, m / 127.f);
      std::vector<int32_t> want(size_t(W / 16), 0);
      bool extreme = false;
      for (int64_t c = 0; c < K; ++c) {
        const int v = q[size_t(int8_column_slot(bits, c))];
        ASSERT_LE(std::abs(v), 127);
        ASSERT_LE(std::fabs(double(x[size_t(c)]) - double(sx) * v), 0.5 * sx * (1 + 0x1p-20)) << "column " << c;
        extreme = extreme || std::abs(v) == 127;
        want[size_t(c / G)] -= v;
      }
      EXPECT_TRUE(extreme);
      for (int64_t c = K; c < W; ++c) ASSERT_EQ(q[size_t(int8_column_slot(bits, c))], 0) << "padding column " << c;
      for (int64_t g = 0; g < (W + G - 1) / G; ++g) ASSERT_EQ(ns[size_t(g)], want[size_t(g)]) << "group " << g;
    }
  // int4 slots: columns 0..7 -> 0, 4, 1, 5, 2, 6, 3, 7.
  const int64_t slots[] = {0, 4, 1, 5, 2, 6, 3, 7};
  for (int64_t c = 0; c < 16; ++c) EXPECT_EQ(int8_column_slot(4, c), (c & 8) + slots[c & 7]);
  std::vector<float> x(16, 1.f);
  x[3] = INFINITY;
  std::vector<int8_t> q(16);
  std::vector<int32_t> ns(1);
  float sx = 0;
  quantize_row_int8(x.data(), 16, 16, 4, 16, q.data(), ns.data(), &sx);
  EXPECT_TRUE(std::isnan(sx));
}

// The AVX-512 form of the digit pairs (int8_rows_avx512.cpp) writes the portable form's bytes, sums and scale:
// odd K, partial groups, rows of every magnitude (subnormal sx), zero rows, rows with Inf or NaN.
TEST(CpuInt8Kernel, PairDigitsAvx512MatchPortable) {
  if (!test::has_avx512()) GTEST_SKIP() << "this CPU lacks AVX-512 F/BW/VL";
  std::mt19937_64 rng(base_seed() + 11);
  std::uniform_real_distribution<float> xd(-3.f, 3.f);
  int compared = 0;
  for (int64_t block : {16, 32})
    for (float amp : {1.f, 0x1p-100f, 0x1p-130f, 0x1p-145f, 0x1p100f, 0.f})
      for (int rep = 0; rep < 4; ++rep) {
        const int64_t K = 2 * int64_t(rng() % 300) + 1, W = round_up(K + 8, 64), N = W / 16;
        std::vector<float> x(size_t(W), 0.f);
        for (int64_t c = 0; c < K; ++c) x[size_t(c)] = amp * xd(rng);
        if (rep == 3) x[size_t(rng() % uint64_t(K))] = rng() % 2 ? NAN : -INFINITY;
        std::vector<int8_t> q0(size_t(4 * W), 99), q1(q0);
        std::vector<int32_t> n0(size_t(4 * N), 99), n1(n0);
        float s0 = -1, s1 = -2;
        quantize_row_int8_digits(x.data(), K, W, 4, block, q0.data(), n0.data(), N, &s0);
        quantize_row_int8_pairs_avx512(x.data(), K, W, block, q1.data(), n1.data(), N, &s1);
        const std::string where = "K=" + std::to_string(K) + " block=" + std::to_string(block) + " amp=" +
                                  std::to_string(amp) + " rep " + std::to_string(rep) + " (base seed " +
                                  std::to_string(base_seed()) + ")";
        ASSERT_EQ(std::memcmp(&s0, &s1, sizeof s0), 0) << where << ": scale " << s0 << " vs " << s1;
        ASSERT_EQ(q0, q1) << where;
        ASSERT_EQ(n0, n1) << where;
        ++compared;
      }
  EXPECT_EQ(compared, 48);
}

// quantize_row_int8_digits's contract (int8_rows.h), both forms: three digits under the int8 option's scale, in
// [-127, 127], within sx / (2 * 254^2) of x; or (4-bit weights, blocks of 16 and 32) two pairs under max|x| / 2^23,
// a and c in [-127, 127], |b|, |d| <= 16, |16 a + b| and |16 c + d| <= 2048, within sx / 2 of x. Rows of every magnitude (down
// to subnormal sx), per-plane group sums, zeros past K, slot order, zeros for a zero row, NaN scale for
// non-finite rows.
TEST(CpuInt8Kernel, DigitQuantizerContract) {
  std::mt19937_64 rng(base_seed() + 9);
  std::uniform_real_distribution<float> xd(-3.f, 3.f);
  int pair_rows = 0;
  for (int bits : {4, 8})
    for (int64_t block : {int64_t(0), int64_t(16), int64_t(32), int64_t(128), int64_t(512)})
      for (float amp : {1.f, 0x1p-100f, 0x1p-130f, 0x1p100f}) {
        const int64_t K = 2 * int64_t(rng() % 400) + 1, W = round_up(K + 8, 64), G = int8_group_cols(block), N = W / 16;
        const int D = int8_digit_count(bits, block);
        const bool pairs = D == kInt8PairDigits;
        ASSERT_EQ(pairs, bits == 4 && (block == 16 || block == 32));
        pair_rows += pairs;
        std::vector<float> x(size_t(W), 0.f);
        for (int64_t c = 0; c < K; ++c) x[size_t(c)] = amp * xd(rng);
        std::vector<int8_t> q(size_t(D * W), 99);
        std::vector<int32_t> ns(size_t(D * N), 99);
        float sx = -1;
        quantize_row_int8_digits(x.data(), K, W, bits, block, q.data(), ns.data(), N, &sx);
        float m = 0;
        for (int64_t c = 0; c < K; ++c) m = std::max(m, std::fabs(x[size_t(c)]));
        ASSERT_EQ(sx, pairs ? float(double(m) / 0x1p23) : m / 127.f) << "amp " << amp;
        std::vector<int32_t> want(size_t(D * N), 0);
        for (int64_t c = 0; c < W; ++c) {
          const int64_t slot = int8_column_slot(bits, c);
          for (int d = 0; d < D; ++d) {
            const int code = q[size_t(int8_digit_offset(pairs, W, G, d, slot))];
            if (pairs && d % 2 == 1) {
              const int whole = 16 * q[size_t(int8_digit_offset(true, W, G, d - 1, slot))] + code;
              ASSERT_LE(std::abs(whole), 2048) << "column " << c << " pair " << d / 2;
              ASSERT_LE(std::abs(code), 16) << "column " << c << " digit " << d;
            } else {
              ASSERT_LE(std::abs(code), 127) << "column " << c << " digit " << d;
            }
            if (c >= K) ASSERT_EQ(code, 0) << "column " << c << " past K";
            if (c < K) want[size_t(d * N + c / G)] -= code;
          }
          const double v = digits_value(q.data(), W, bits, block, D, sx, c);
          const double unit = pairs ? 0.5 * sx : 0.5 * sx / (kInt8DigitBase * kInt8DigitBase);
          if (c < K && sx >= FLT_MIN)  // subnormal sx: the row is within 2^23 * 2^-126 of zero anyway
            ASSERT_LE(std::fabs(double(x[size_t(c)]) - v), unit * (1 + 0x1p-20))
                << "column " << c << " amp " << amp << " (base seed " << base_seed() << ")";
        }
        for (int d = 0; d < D; ++d)
          for (int64_t g = 0; g < (W + G - 1) / G; ++g)
            ASSERT_EQ(ns[size_t(d * N + g)], want[size_t(d * N + g)]) << "digit " << d << " group " << g;
      }
  EXPECT_EQ(pair_rows, 8);
  std::vector<float> x(16, 0.f);
  std::vector<int8_t> q(size_t(kInt8Digits * 16), 5);
  std::vector<int32_t> ns(size_t(kInt8Digits), 5);
  float sx = -1;
  quantize_row_int8_digits(x.data(), 16, 16, 8, 16, q.data(), ns.data(), 1, &sx);
  EXPECT_EQ(sx, 0.f);
  for (int8_t v : q) EXPECT_EQ(v, 0);
  for (int32_t v : ns) EXPECT_EQ(v, 0);
  x[7] = NAN;
  quantize_row_int8_digits(x.data(), 16, 16, 8, 16, q.data(), ns.data(), 1, &sx);
  EXPECT_TRUE(std::isnan(sx));
}

}  // namespace
