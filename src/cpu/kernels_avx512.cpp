// AVX-512 pair kernels (built with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c; called only after
// __builtin_cpu_supports says so). One tile = one zmm of 16 fp32 row accumulators.
//
// int4 dequant, per code byte j of a tile (16 rows x 2 columns): vpmovzxbd widens the 16 bytes to
// dwords; vpermps with a 16-entry table indexed by the dword's low 4 bits turns the low nibble
// straight into float(q - 8) (the table ignores the high bits, so no mask), and a 4-bit shift does
// the same for the high nibble. With explicit zero points the table holds float(q) and a vsubps of
// the block's zero points follows (one more op per 16 weights). int8: vpmovzxbd, vpsubd, vcvtdq2ps.
// The FMAs then broadcast x[k] from memory (embedded {1to16}), one per token. Everything follows the
// arithmetic contract in cpu_kernels.h, so results equal the portable kernel bit for bit.
//
// Tokens per call: up to 6. At 6, 24 block accumulators (6 tokens x 2 tiles x even/odd) + table + 4
// weight vectors fill the 32 zmm; the per-block totals spill to the stack, touched once per block.
// Each x broadcast feeds two FMAs (one per tile), so a step of 24 FMAs needs 14 loads (2 code + 12
// broadcast). A one-tile, 8-token variant (16 FMAs per 17 loads, half the dequant) was measured 8%
// slower at prefill (mixtral T=512, 1 thread: 1.74 s vs 1.60 s CPU): the loads, not the dequant, bind.
#include <immintrin.h>

#include <algorithm>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_layout.h"
#include "cpu/kernels_avx512_common.h"

namespace qmoe::cpu {

namespace {

constexpr int kTokensAvx512 = 6;

template <int MT, bool ZP>
void pair_w4(const PairJob& jb) {
  // Table for vpermps: lane i holds float(i - 8) without zero points, float(i) with them.
  const __m512 tbl = ZP ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                        : _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  const uint8_t* c0 = jb.codes[0];
  const uint8_t* c1 = jb.codes[1];
  for (int64_t b = 0; b < jb.nb; ++b) {
    const int64_t j0 = b * jb.block_bytes, j1 = std::min(j0 + jb.block_bytes, jb.jbytes);
    // With zero points on only one tile of the pair (SwiGLU gate from fc1, linear half from fc3),
    // the other tile subtracts the default 8.
    __m512 z0 = _mm512_set1_ps(8.f), z1 = _mm512_set1_ps(8.f);
    if constexpr (ZP) {
      if (jb.zero_points[0]) z0 = _mm512_cvtepi32_ps(load_codes16(jb.zero_points[0] + b * kTileRows));
      if (jb.zero_points[1]) z1 = _mm512_cvtepi32_ps(load_codes16(jb.zero_points[1] + b * kTileRows));
    }
    __m512 ev[MT][2], od[MT][2];
    for (int t = 0; t < MT; ++t) ev[t][0] = ev[t][1] = od[t][0] = od[t][1] = _mm512_setzero_ps();
    // One code byte j of both tiles: 32 rows x 2 columns.
    auto step = [&](int64_t j) __attribute__((always_inline)) {
      const __m512i v0 = load_codes16(c0 + j * kTileRows);
      const __m512i v1 = load_codes16(c1 + j * kTileRows);
      __m512 lo0 = _mm512_permutexvar_ps(v0, tbl);
      __m512 hi0 = _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), tbl);
      __m512 lo1 = _mm512_permutexvar_ps(v1, tbl);
      __m512 hi1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), tbl);
      if constexpr (ZP) {
        lo0 = _mm512_sub_ps(lo0, z0);
        hi0 = _mm512_sub_ps(hi0, z0);
        lo1 = _mm512_sub_ps(lo1, z1);
        hi1 = _mm512_sub_ps(hi1, z1);
      }
      for (int t = 0; t < MT; ++t) {
        const __m512 xe = _mm512_set1_ps(jb.x[t][2 * j]);
        const __m512 xo = _mm512_set1_ps(jb.x[t][2 * j + 1]);
        ev[t][0] = _mm512_fmadd_ps(lo0, xe, ev[t][0]);
        od[t][0] = _mm512_fmadd_ps(hi0, xo, od[t][0]);
        ev[t][1] = _mm512_fmadd_ps(lo1, xe, ev[t][1]);
        od[t][1] = _mm512_fmadd_ps(hi1, xo, od[t][1]);
      }
    };
    // Unrolled by 4 (one 64-byte line per tile): one prefetch per line (kPrefetchAhead ahead, covering the
    // block and tile boundaries where the hardware prefetcher restarts) instead of one per 16 bytes.
    // Measured: no change in time (mixtral int4 block 32, T=1, one thread: 12.4 ms either way);
    // kept since it issues a third fewer instructions.
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(c0 + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c1 + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
      step(j), step(j + 1), step(j + 2), step(j + 3);
    }
    for (; j < j1; ++j) step(j);
    finish_block<MT>(jb, b, ev, od, acc);
  }
  store_acc<MT>(jb, acc);
}

template <int MT, bool ZP>
void pair_w8(const PairJob& jb) {
  __m512 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  const uint8_t* c0 = jb.codes[0];
  const uint8_t* c1 = jb.codes[1];
  const __m512i mid = _mm512_set1_epi32(128);
  for (int64_t b = 0; b < jb.nb; ++b) {
    const int64_t j0 = b * jb.block_bytes, j1 = std::min(j0 + jb.block_bytes, jb.jbytes);
    __m512i z0 = mid, z1 = mid;
    if constexpr (ZP) {
      if (jb.zero_points[0]) z0 = load_codes16(jb.zero_points[0] + b * kTileRows);
      if (jb.zero_points[1]) z1 = load_codes16(jb.zero_points[1] + b * kTileRows);
    }
    __m512 ev[MT][2], od[MT][2];
    for (int t = 0; t < MT; ++t) ev[t][0] = ev[t][1] = od[t][0] = od[t][1] = _mm512_setzero_ps();
    // Two code bytes (columns j, j+1) of both tiles.
    auto step = [&](int64_t j) __attribute__((always_inline)) {
      const __m512 e0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(load_codes16(c0 + j * kTileRows), z0));
      const __m512 o0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(load_codes16(c0 + (j + 1) * kTileRows), z0));
      const __m512 e1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(load_codes16(c1 + j * kTileRows), z1));
      const __m512 o1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(load_codes16(c1 + (j + 1) * kTileRows), z1));
      for (int t = 0; t < MT; ++t) {
        const __m512 xe = _mm512_set1_ps(jb.x[t][j]);
        const __m512 xo = _mm512_set1_ps(jb.x[t][j + 1]);
        ev[t][0] = _mm512_fmadd_ps(e0, xe, ev[t][0]);
        od[t][0] = _mm512_fmadd_ps(o0, xo, od[t][0]);
        ev[t][1] = _mm512_fmadd_ps(e1, xe, ev[t][1]);
        od[t][1] = _mm512_fmadd_ps(o1, xo, od[t][1]);
      }
    };
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {  // one 64-byte line per tile per iteration, one prefetch each
      _mm_prefetch(reinterpret_cast<const char*>(c0 + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c1 + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
      step(j), step(j + 2);
    }
    for (; j < j1; j += 2) step(j);
    finish_block<MT>(jb, b, ev, od, acc);
  }
  store_acc<MT>(jb, acc);
}

void avx512_w4(const PairJob& jb) {
  dispatch_pair<kTokensAvx512>(jb, portable_kernels().w4, "avx512", [&]<int MT, bool ZP>() { pair_w4<MT, ZP>(jb); });
}
void avx512_w8(const PairJob& jb) {
  dispatch_pair<kTokensAvx512>(jb, portable_kernels().w8, "avx512", [&]<int MT, bool ZP>() { pair_w8<MT, ZP>(jb); });
}

}  // namespace

const KernelSet& avx512_kernels() {
  // 2-bit weights take the portable kernel (same arithmetic, so results still agree bit for bit).
  static const KernelSet k{"avx512", portable_kernels().w2, avx512_w4, avx512_w8, kTokensAvx512};
  return k;
}

}  // namespace qmoe::cpu
