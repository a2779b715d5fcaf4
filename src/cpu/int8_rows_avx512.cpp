// The int8x3 mode's digit pairs (int8_rows.h) computed 8 columns at a time with AVX-512: the same bytes as
// quantize_row_int8_digits (tested), for the backend's rows. Why: the portable loop runs scalar doubles, a
// row's four digits, slot order and group sums column by column, and took 8% of qwen3-30b-a3b's T = 512 in
// the int8x3 mode (perf, 2 threads; k = 8 routes per token make the activation rows as many as the weight
// rows a call streams). Built with -mavx512f/bw/vl; call only where the CPU has them (amx_available()
// implies it).
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "cpu/int8_rows.h"

namespace qmoe::cpu {

void quantize_row_int8_pairs_avx512(const float* x, int64_t K, int64_t W, int64_t block_size, int8_t* q,
                                    int32_t* nsum, int64_t nsum_stride, float* sx) {
  const int64_t G = int8_group_cols(block_size), groups = (W + G - 1) / G;
  std::memset(q, 0, size_t(kInt8PairDigits * W));
  for (int d = 0; d < kInt8PairDigits; ++d)
    for (int64_t g = 0; g < groups; ++g) nsum[d * nsum_stride + g] = 0;
  // max|x| and whether the row holds Inf or NaN (all exponent bits set).
  const __m512i exp_bits = _mm512_set1_epi32(0x7f800000);
  __m512 mx = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t c = 0; c < K; c += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(__mmask16(K - c >= 16 ? 0xffff : (1u << (K - c)) - 1), x + c);
    bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), exp_bits), exp_bits);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
  }
  if (bad) {
    *sx = std::nanf("");
    return;
  }
  // As quantize_row_int8_digits: sx = max|x| / 2^23, inv = 1 / sx (or 2^23 / m where sx is subnormal).
  const float m = _mm512_reduce_max_ps(mx);
  *sx = float(double(m) / 8388608.0);
  if (m == 0.f || *sx == 0.f) {
    *sx = 0.f;
    return;
  }
  const __m512d inv = _mm512_set1_pd(*sx >= FLT_MIN ? 1.0 / double(*sx) : 8388608.0 / double(m));
  constexpr int kNear = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512d lo127 = _mm512_set1_pd(-127.0), hi127 = _mm512_set1_pd(127.0);
  // int8_column_slot(4, i) for 8 columns: the even ones, then the odd ones.
  const __m128i slots = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 8, 8, 8, 8, 8, 8, 8);
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    int8_t* const ph = q + g0 * 2;  // the group's a-codes in the h plane; b at + G, the l plane at + 2W
    __m256i sum[kInt8PairDigits] = {};
    for (int64_t c = 0; c < std::min(G, K - g0); c += 8) {
      const int64_t n = std::min<int64_t>(8, K - g0 - c);
      const __m256 xf = _mm256_maskz_loadu_ps(__mmask8((1u << n) - 1), x + g0 + c);
      const __m512d v = _mm512_roundscale_pd(_mm512_mul_pd(_mm512_cvtps_pd(xf), inv), kNear);
      const __m512d h = _mm512_roundscale_pd(_mm512_mul_pd(v, _mm512_set1_pd(0x1p-12)), kNear);
      const __m512d l = _mm512_fnmadd_pd(h, _mm512_set1_pd(4096.0), v);
      __m256i dg[kInt8PairDigits];
      int d = 0;
      for (const __m512d p : {h, l}) {
        const __m512d hi = _mm512_min_pd(hi127, _mm512_max_pd(lo127, _mm512_roundscale_pd(_mm512_mul_pd(p, _mm512_set1_pd(0.0625)), kNear)));
        dg[d++] = _mm512_cvtpd_epi32(hi);
        dg[d++] = _mm512_cvtpd_epi32(_mm512_fnmadd_pd(hi, _mm512_set1_pd(16.0), p));
      }
      for (d = 0; d < kInt8PairDigits; ++d) {
        sum[d] = _mm256_sub_epi32(sum[d], dg[d]);
        const __m128i bytes = _mm_shuffle_epi8(_mm256_cvtepi32_epi8(dg[d]), slots);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(ph + (d >> 1) * 2 * W + (d & 1) * G + c), bytes);
      }
    }
    for (int d = 0; d < kInt8PairDigits; ++d) {
      const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum[d]), _mm256_extracti128_si256(sum[d], 1));
      const __m128i s2 = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
      nsum[d * nsum_stride + g0 / G] = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xb1)));
    }
  }
}

}  // namespace qmoe::cpu
