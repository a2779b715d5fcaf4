// Activation quantization for the int8 compute mode; the format is described in int8_rows.h.
// Portable on purpose: it runs once per row per chunk (O(K)), against O(K * N) kernel work. It must
// still be cheap per column: with a libm call per column (fmaxf, nearbyint) and a division for the
// group index it took ~5% of the int8 mode's time at mixtral T = 64 (perf, 2 threads).
#include "cpu/int8_rows.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

namespace qmoe::cpu {

namespace {
// Round to nearest, ties to even, for |d| < 2^51, in the default rounding mode: d + 1.5 * 2^52 lands
// where the spacing of doubles is 1, so the add rounds d to an integer as nearbyint does; subtracting
// the constant again is exact. (Without -ffast-math the compiler keeps both operations.)
inline double round_even(double d) {
  constexpr double kShift = 6755399441055744.0;  // 1.5 * 2^52
  return (d + kShift) - kShift;
}
// max|x[0..K)|, or NaN where the row holds Inf or NaN.
inline float abs_max_finite(const float* x, int64_t K) {
  float m = 0.f;
  bool finite = true;
  for (int64_t c = 0; c < K; ++c) {
    const float a = std::fabs(x[c]);
    finite = finite && std::isfinite(x[c]);
    m = a > m ? a : m;  // fmax without a libm call: a NaN never wins
  }
  return finite ? m : std::nanf("");
}
}  // namespace

void quantize_row_int8(const float* x, int64_t K, int64_t W, int bits, int64_t block_size, int8_t* q, int32_t* nsum,
                       float* sx) {
  const int64_t G = int8_group_cols(block_size), groups = (W + G - 1) / G;
  std::memset(q, 0, size_t(W));
  for (int64_t g = 0; g < groups; ++g) nsum[g] = 0;
  const float m = abs_max_finite(x, K);
  if (m != m) {  // a row with Inf or NaN
    *sx = m;
    return;
  }
  *sx = m / 127.f;
  if (m == 0.f) return;
  const double inv = 127.0 / double(m);  // double: no overflow for tiny m, and |x * inv| <= 127 exactly
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    int32_t s = 0;
    const int64_t c1 = std::min(K, g0 + G);
    int64_t c = g0;
    // Whole 8-column groups (G is a multiple of 8, so c % 8 == 0 and column c + i lives at slot c +
    // int8_column_slot(bits, i)), which the compiler vectorizes; the rest column by column.
    for (; c + 8 <= c1; c += 8) {
      int32_t v[8];
      for (int i = 0; i < 8; ++i) v[i] = int32_t(round_even(double(x[c + i]) * inv));
      for (int i = 0; i < 8; ++i) s -= v[i];
      for (int i = 0; i < 8; ++i) q[c + int8_column_slot(bits, i)] = int8_t(v[i]);
    }
    for (; c < c1; ++c) {
      const int v = int(round_even(double(x[c]) * inv));
      q[int8_column_slot(bits, c)] = int8_t(v);
      s -= v;
    }
    nsum[g0 / G] = s;
  }
}

void quantize_row_int8_digits(const float* x, int64_t K, int64_t W, int bits, int64_t block_size, int8_t* q,
                              int32_t* nsum, int64_t nsum_stride, float* sx) {
  const int64_t G = int8_group_cols(block_size), groups = (W + G - 1) / G;
  const bool pairs = int8_pair_digits(bits, block_size);
  const int D = int8_digit_count(bits, block_size);
  std::memset(q, 0, size_t(D * W));
  for (int d = 0; d < D; ++d)
    for (int64_t g = 0; g < groups; ++g) nsum[d * nsum_stride + g] = 0;
  const float m = abs_max_finite(x, K);
  if (m != m) {  // a row with Inf or NaN
    *sx = m;
    return;
  }
  const double full = pairs ? 8388608.0 : 127.0;  // |x / sx| <= 2^23, or <= 127
  *sx = float(double(m) / full);  // exact for the pairs (a power of two) unless subnormal
  if (m == 0.f || *sx == 0.f) {  // sx 0 (m below full * 2^-149): the row reads as zeros
    *sx = 0.f;
    return;
  }
  // Digits of x / sx with the sx the kernels multiply by; every step is exact in double (x / sx to 2^-53).
  // A subnormal sx is too coarse for that (x / sx could pass the range): such rows (max|x| < 1.5e-36 or
  // < 1.4e-31) take full / m, as quantize_row_int8 does.
  const double inv = *sx >= FLT_MIN ? 1.0 / double(*sx) : full / double(m);
  if (pairs) {  // v = 4096 h + l, then each of h, l as 16 a + b (a within [-127, 127], b the rest)
    for (int64_t g0 = 0; g0 < K; g0 += G) {
      int8_t* const ph = q + g0 * 2;  // group g0 / G's a-codes in the h plane; b at + G, the l plane at + 2W
      int32_t sum[kInt8PairDigits] = {};
      // 8 columns a step (G is a multiple of 8, so column g0 + c + i lives at slot c + int8_column_slot(4, i) of
      // the group); columns past K (i >= n) as zeros.
      for (int64_t c = 0; c < std::min(G, K - g0); c += 8) {
        const int n = int(std::min<int64_t>(8, K - g0 - c));
        int32_t dg[kInt8PairDigits][8];
        for (int i = 0; i < 8; ++i) {
          const double v = i < n ? round_even(double(x[g0 + c + i]) * inv) : 0.0;
          const double h = round_even(v * 0x1p-12), l = v - 4096 * h;
          const double a = std::clamp(round_even(h * 0.0625), -127.0, 127.0), cc = std::clamp(round_even(l * 0.0625), -127.0, 127.0);
          dg[0][i] = int32_t(a), dg[1][i] = int32_t(h - 16 * a), dg[2][i] = int32_t(cc), dg[3][i] = int32_t(l - 16 * cc);
        }
        for (int d = 0; d < kInt8PairDigits; ++d) {
          int8_t* out = ph + (d >> 1) * 2 * W + (d & 1) * G + c;
          for (int i = 0; i < 8; ++i) out[int8_column_slot(4, i)] = int8_t(dg[d][i]), sum[d] -= dg[d][i];
        }
      }
      for (int d = 0; d < kInt8PairDigits; ++d) nsum[d * nsum_stride + g0 / G] = sum[d];
    }
    return;
  }
  for (int64_t c = 0; c < K; ++c) {
    double r = double(x[c]) * inv;
    const int64_t slot = int8_column_slot(bits, c);
    for (int d = 0; d < kInt8Digits; ++d) {
      const double v = round_even(r);
      q[d * W + slot] = int8_t(v);
      nsum[d * nsum_stride + c / G] -= int32_t(v);
      r = (r - v) * kInt8DigitBase;  // exact: r - v is exact and has at most 52 significant bits
    }
  }
}

}  // namespace qmoe::cpu
