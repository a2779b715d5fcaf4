// AVX2 pair kernels (built with -mavx2 -mfma -mf16c; called only after __builtin_cpu_supports says
// so). A 16-row tile is two ymm of 8 fp32 lanes, so a pair is four 8-row groups. With 16 ymm registers
// the kernel runs G groups at once such that G * tokens = 4 (at one token, all four groups: eight
// independent FMA chains, enough to hide the FMA latency), then the next groups.
//
// Dequant per 8 rows x 1 code byte: vpmovzxbd of 8 bytes, vpand/vpsrld to peel nibbles, vpsubd of the
// zero point (8 by default), vcvtdq2ps: exact float(q - z). AVX2 has no 16-entry vpermps, hence the
// explicit mask. The arithmetic per lane is the contract of cpu_kernels.h, so the results equal the
// portable and AVX-512 kernels bit for bit.
#include <immintrin.h>

#include <algorithm>
#include <string>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_layout.h"
#include "qmoe/error.h"

namespace qmoe::cpu {

namespace {

inline __m256 load_scales8(DType t, const void* p, int64_t i) {
  switch (t) {
    case DType::f16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
    case DType::bf16: {
      const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    }
    default: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  }
}

inline __m256i load_codes8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// Group g of a pair: tile g/2, rows (g%2)*8 .. +8 of that tile, lanes g*8 .. g*8+8 of the pair.
template <int MT, int G, int BITS>
void groups(const PairJob& jb, int g0, int64_t b, int64_t j0, int64_t j1, float* acc) {
  const uint8_t* c[G];
  __m256i z[G];
  const __m256i mid = _mm256_set1_epi32(1 << (BITS - 1));
  for (int gi = 0; gi < G; ++gi) {
    const int g = g0 + gi, tile = g / 2, half = g % 2;
    c[gi] = jb.codes[tile] + half * 8;
    z[gi] = jb.zero_points[tile] ? load_codes8(jb.zero_points[tile] + b * kTileRows + half * 8) : mid;
  }
  __m256 ev[MT][G], od[MT][G];
  for (int t = 0; t < MT; ++t)
    for (int gi = 0; gi < G; ++gi) ev[t][gi] = od[t][gi] = _mm256_setzero_ps();
  if constexpr (BITS == 4) {
    const __m256i low4 = _mm256_set1_epi32(15);
    for (int64_t j = j0; j < j1; ++j) {
      for (int gi = 0; gi < G; ++gi) {
        const __m256i v = load_codes8(c[gi] + j * kTileRows);
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, low4), z[gi]));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), z[gi]));
        for (int t = 0; t < MT; ++t) {
          ev[t][gi] = _mm256_fmadd_ps(lo, _mm256_set1_ps(jb.x[t][2 * j]), ev[t][gi]);
          od[t][gi] = _mm256_fmadd_ps(hi, _mm256_set1_ps(jb.x[t][2 * j + 1]), od[t][gi]);
        }
      }
    }
  } else {
    for (int64_t j = j0; j < j1; j += 2) {
      for (int gi = 0; gi < G; ++gi) {
        const __m256 we = _mm256_cvtepi32_ps(_mm256_sub_epi32(load_codes8(c[gi] + j * kTileRows), z[gi]));
        const __m256 wo = _mm256_cvtepi32_ps(_mm256_sub_epi32(load_codes8(c[gi] + (j + 1) * kTileRows), z[gi]));
        for (int t = 0; t < MT; ++t) {
          ev[t][gi] = _mm256_fmadd_ps(we, _mm256_set1_ps(jb.x[t][j]), ev[t][gi]);
          od[t][gi] = _mm256_fmadd_ps(wo, _mm256_set1_ps(jb.x[t][j + 1]), od[t][gi]);
        }
      }
    }
  }
  for (int gi = 0; gi < G; ++gi) {
    const int g = g0 + gi, tile = g / 2, half = g % 2;
    const __m256 s = load_scales8(jb.scale_dtype, jb.scales[tile], b * kTileRows + half * 8);
    for (int t = 0; t < MT; ++t) {
      float* a = acc + t * kPairRows + g * 8;
      _mm256_storeu_ps(a, _mm256_fmadd_ps(s, _mm256_add_ps(ev[t][gi], od[t][gi]), _mm256_loadu_ps(a)));
    }
  }
}

template <int MT, int BITS>
void pair(const PairJob& jb) {
  constexpr int G = MT == 1 ? 4 : MT == 2 ? 2 : 1;
  float acc[MT * kPairRows] = {};
  for (int64_t b = 0; b < jb.nb; ++b) {
    const int64_t j0 = b * jb.block_bytes, j1 = std::min(j0 + jb.block_bytes, jb.jbytes);
    for (int g0 = 0; g0 < 4; g0 += G) groups<MT, G, BITS>(jb, g0, b, j0, j1, acc);
  }
  std::copy(acc, acc + MT * kPairRows, jb.acc);
}

// Whether any scale of the pair is +-Inf: such pairs go to the portable kernel, which handles those
// blocks the reference's way (cpu_kernels.h); scanning once keeps the check out of the block loop.
bool any_inf_scale(const PairJob& jb) {
  __m256 m = _mm256_setzero_ps();
  const __m256 inf = _mm256_set1_ps(__builtin_inff()), sign = _mm256_set1_ps(-0.f);
  for (int tile = 0; tile < 2; ++tile)
    for (int64_t i = 0; i < jb.nb * kTileRows; i += 8)
      m = _mm256_or_ps(m, _mm256_cmp_ps(_mm256_andnot_ps(sign, load_scales8(jb.scale_dtype, jb.scales[tile], i)), inf, _CMP_EQ_OQ));
  return _mm256_movemask_ps(m) != 0;
}

template <int BITS>
void avx2_pair(const PairJob& jb) {
  if (!jb.scales_finite && __builtin_expect(any_inf_scale(jb), 0))
    return BITS == 4 ? portable_kernels().w4(jb) : portable_kernels().w8(jb);
  switch (jb.tokens) {
    case 1: return pair<1, BITS>(jb);
    case 2: return pair<2, BITS>(jb);
    case 3: return pair<3, BITS>(jb);
    case 4: return pair<4, BITS>(jb);
  }
  throw Error("avx2 kernel: tokens per call must be 1..4, got " + std::to_string(jb.tokens));
}

}  // namespace

const KernelSet& avx2_kernels() {
  // 2-bit weights take the portable kernel (same arithmetic, so results still agree bit for bit).
  static const KernelSet k{"avx2", portable_kernels().w2, avx2_pair<4>, avx2_pair<8>, 4};
  return k;
}

}  // namespace qmoe::cpu
