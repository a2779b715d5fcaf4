// Helpers shared by the AVX-512 kernel translation units (kernels_avx512.cpp, the exact fp32 kernels,
// and kernels_avx512_bf16.cpp, the bf16 compute mode). Include only from files built with the AVX-512
// flags. Everything here sits in an unnamed namespace, so each translation unit gets its own copy
// compiled with its own flags (no inline function is shared across TUs built for different ISAs).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <string>
#include <utility>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_layout.h"
#include "qmoe/error.h"

namespace qmoe::cpu {
namespace {

// How far ahead of the current code line the kernels prefetch each tile's stream: one 4 KB page.
// The hardware prefetcher stops at page boundaries and 1 KB ahead left too few lines in flight for
// two tiles per thread (2 threads, idle machine, 1024 vs 4096 interleaved twice, mixtral int4 block 32
// T = 8: exact 23.7 / 22.8 -> 20.2 / 19.7 ms, int8 mode 21.3 / 19.9 -> 14.9 / 14.7 ms; T = 1 exact
// 5.68 / 5.48 -> 4.91 / 4.16 ms; 8 KB measured within +-5% of 4 KB).
inline constexpr int kPrefetchAhead = 4096;

// 16 scales of one block and tile as fp32 (fp16 and bf16 widen exactly).
inline __m512 load_scales16(DType t, const void* p, int64_t i) {
  switch (t) {
    case DType::f16:
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
    case DType::bf16: {
      const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
      return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    }
    default: return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  }
}

// The scales of both tiles kScaleBlocksAhead blocks ahead of block b, into L1 (none past the tile's
// last block: the address would leave the array): a stream of its own that the code stream's prefetch
// does not cover (perf: the scale loads of blocks of 32 were the exact T = 1 kernel's second stall).
// Three interleaved runs, 2 threads, int4 block 32 T = 1: qwen3 600/573/592 -> 559/560/588 us, mixtral
// 3.53/3.56/3.62 -> 3.29/3.39/3.38 ms (docs/PERF.md, run 9's notes).
inline constexpr int kScaleBlocksAhead = 16;
inline void prefetch_tile_scales(const PairJob& jb, int tile, int64_t b) {
  if (b + kScaleBlocksAhead >= jb.nb) return;
  const size_t at = size_t((b + kScaleBlocksAhead) * kTileRows) * dtype_size(jb.scale_dtype);
  _mm_prefetch(static_cast<const char*>(jb.scales[tile]) + at, _MM_HINT_T0);
}
inline void prefetch_scales(const PairJob& jb, int64_t b) {
  prefetch_tile_scales(jb, 0, b);
  prefetch_tile_scales(jb, 1, b);
}

// 16 bytes (one code byte or zero point of each of a tile's 16 rows) widened to dwords.
inline __m512i load_codes16(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Whether any scale of the pair is +-Inf. Such pairs (pathological input) go to the portable kernel,
// which handles those blocks the reference's way (cpu_kernels.h). The scan keeps the check out of the
// per-block path (measured: the per-block check cost ~5% at block 32), but it runs once per kernel call
// and its loads miss the cache at block 32 (perf: ~12% of the int8 kernel's samples, mixtral T = 64),
// so prepacked weights skip it (PairJob::scales_finite).
inline bool any_inf_scale(const PairJob& jb) {
  __mmask16 m = 0;
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  for (int tile = 0; tile < 2; ++tile)
    for (int64_t b = 0; b < jb.nb; ++b)
      m |= _mm512_cmp_ps_mask(_mm512_abs_ps(load_scales16(jb.scale_dtype, jb.scales[tile], b * kTileRows)), inf, _CMP_EQ_OQ);
  return m != 0;
}

// Accumulates block results: acc[t][tile] = fma(scale, ev + od, acc[t][tile]) (cpu_kernels.h).
template <int MT>
inline void finish_block(const PairJob& jb, int64_t b, __m512 ev[MT][2], __m512 od[MT][2], __m512 acc[MT][2]) {
  prefetch_scales(jb, b);
  for (int tile = 0; tile < 2; ++tile) {
    const __m512 s = load_scales16(jb.scale_dtype, jb.scales[tile], b * kTileRows);
    for (int t = 0; t < MT; ++t) acc[t][tile] = _mm512_fmadd_ps(s, _mm512_add_ps(ev[t][tile], od[t][tile]), acc[t][tile]);
  }
}

template <int MT>
inline void store_acc(const PairJob& jb, __m512 acc[MT][2]) {
  for (int t = 0; t < MT; ++t) {
    _mm512_storeu_ps(jb.acc + t * kPairRows, acc[t][0]);
    _mm512_storeu_ps(jb.acc + t * kPairRows + kTileRows, acc[t][1]);
  }
}

// e^x to a few ulp (the SwiGLU below is tested within 8 ulp of the scalar formula, whose std::exp it
// replaces): x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two parts so n ln2 is exact), e^r by its
// Taylor series to r^6 (truncation < 1.2e-7 relative), times 2^n by vscalefps, which overflows to +inf
// and underflows through the subnormals to 0 like std::exp. x is first clamped to [-104, 89] (beyond,
// e^x is 0 or inf in fp32 already); NaN passes through (vminps / vmaxps return their second operand
// when either is NaN).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(89.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // 0.693359375: 9 bits, n * it exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// SwigluFn (cpu_kernels.h): swiglu_scalar's steps (reference.cpp), 16 lanes at a time: biases added,
// gate clamped above at limit, linear clamped to [-limit, limit] (NaN stays NaN as with std::min /
// std::clamp), then gate * 1 / (1 + e^(-alpha gate)) * (linear + beta).
inline void swiglu16(const float* gate, const float* lin, const float* gate_bias, const float* lin_bias, float* out,
                     int n, float limit, float alpha, float beta) {
  const __mmask16 m = __mmask16((1u << n) - 1);
  const __m512 lim = _mm512_set1_ps(limit), nlim = _mm512_set1_ps(-limit);
  __m512 g = _mm512_maskz_loadu_ps(m, gate), u = _mm512_maskz_loadu_ps(m, lin);
  if (gate_bias) g = _mm512_add_ps(g, _mm512_maskz_loadu_ps(m, gate_bias));
  if (lin_bias) u = _mm512_add_ps(u, _mm512_maskz_loadu_ps(m, lin_bias));
  g = _mm512_min_ps(lim, g);  // (limit < g) ? limit : g
  u = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, nlim, _CMP_LT_OQ), _mm512_min_ps(lim, u), nlim);
  const __m512 e = exp_ps(_mm512_mul_ps(_mm512_set1_ps(-alpha), g));
  const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
  _mm512_mask_storeu_ps(out, m, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_add_ps(u, _mm512_set1_ps(beta))));
}

// A pair kernel's entry point: pairs with an infinite scale go to the portable kernel `fallback`
// (see any_inf_scale); otherwise calls kernel.operator()<MT, ZP>() with MT = jb.tokens (MinTokens..MaxTokens,
// each a compile-time instance) and ZP = whether the pair has zero points.
template <int MaxTokens, int MinTokens = 1, class Kernel>
void dispatch_pair(const PairJob& jb, PairKernel fallback, const char* isa, Kernel&& kernel) {
  if (!jb.scales_finite && __builtin_expect(any_inf_scale(jb), 0)) return fallback(jb);
  const bool zp = jb.zero_points[0] || jb.zero_points[1];
  const bool done = [&]<int... I>(std::integer_sequence<int, I...>) {
    constexpr int M = MinTokens;
    return ((jb.tokens == I + M &&
             (zp ? kernel.template operator()<I + M, true>() : kernel.template operator()<I + M, false>(), true)) ||
            ...);
  }(std::make_integer_sequence<int, MaxTokens - MinTokens + 1>{});
  if (!done)
    throw Error(std::string(isa) + " kernel: tokens per call must be " + std::to_string(MinTokens) + ".." +
                std::to_string(MaxTokens) + ", got " + std::to_string(jb.tokens));
}

}  // namespace
}  // namespace qmoe::cpu
