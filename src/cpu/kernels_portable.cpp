// Portable pair kernel: plain C++ for any CPU, built with the library's baseline flags. It is the
// reference implementation of the arithmetic contract in cpu_kernels.h (the SIMD kernels must match it
// bit for bit) and the only kernel for 2-bit weights. std::fma is a true fused multiply-add everywhere
// (glibc dispatches to the FMA instruction where the CPU has it), which is what keeps it identical to
// the SIMD paths; it costs a call per element, so this path is ~10x slower than AVX2.
#include <algorithm>
#include <cmath>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_layout.h"

namespace qmoe::cpu {

namespace {

void pair_portable(const PairJob& jb) {
  const int pack = 8 / jb.bits, mask = (1 << jb.bits) - 1, mid = 1 << (jb.bits - 1);
  const int T = jb.tokens;
  float acc[kMaxTokens][kPairRows] = {};
  float ev[kMaxTokens][kPairRows], od[kMaxTokens][kPairRows];
  for (int64_t b = 0; b < jb.nb; ++b) {
    const int64_t j0 = b * jb.block_bytes;
    const int64_t j1 = std::min(j0 + jb.block_bytes, jb.jbytes);
    for (int t = 0; t < T; ++t)
      for (int l = 0; l < kPairRows; ++l) ev[t][l] = od[t][l] = 0.f;
    for (int tile = 0; tile < 2; ++tile) {
      const uint8_t* codes = jb.codes[tile];
      for (int l = 0; l < kTileRows; ++l) {
        const int z = jb.zero_points[tile] ? jb.zero_points[tile][b * kTileRows + l] : mid;
        const int lane = tile * kTileRows + l;
        for (int64_t j = j0; j < j1; ++j) {
          const int byte = codes[j * kTileRows + l];
          for (int p = 0; p < pack; ++p) {
            const float w = float(((byte >> (p * jb.bits)) & mask) - z);
            const int64_t k = j * pack + p;
            for (int t = 0; t < T; ++t) {
              float& chain = (k & 1) ? od[t][lane] : ev[t][lane];
              chain = std::fma(w, jb.x[t][k], chain);
            }
          }
        }
      }
    }
    for (int tile = 0; tile < 2; ++tile)
      for (int l = 0; l < kTileRows; ++l) {
        const float s = scale_at(jb.scale_dtype, jb.scales[tile], b * kTileRows + l);
        const int lane = tile * kTileRows + l;
        for (int t = 0; t < T; ++t)
          acc[t][lane] = std::isinf(s) ? acc[t][lane] + reference_block_term(jb, tile, l, t, b)
                                       : std::fma(s, ev[t][lane] + od[t][lane], acc[t][lane]);
      }
  }
  for (int t = 0; t < T; ++t)
    for (int l = 0; l < kPairRows; ++l) jb.acc[t * kPairRows + l] = acc[t][l];
}

}  // namespace

float reference_block_term(const PairJob& jb, int tile, int l, int t, int64_t b) {
  const int pack = 8 / jb.bits, mask = (1 << jb.bits) - 1;
  const int z = jb.zero_points[tile] ? jb.zero_points[tile][b * kTileRows + l] : 1 << (jb.bits - 1);
  const float s = scale_at(jb.scale_dtype, jb.scales[tile], b * kTileRows + l);
  const int64_t j0 = b * jb.block_bytes, j1 = std::min(j0 + jb.block_bytes, jb.jbytes);
  float sum = 0.f;
  for (int64_t j = j0; j < j1; ++j) {
    const int byte = jb.codes[tile][j * kTileRows + l];
    for (int p = 0; p < pack; ++p) {
      const int64_t k = j * pack + p;
      if (k >= jb.K) return sum;
      const float w = s * float(((byte >> (p * jb.bits)) & mask) - z);
      sum += w * jb.x[t][k];
    }
  }
  return sum;
}

const KernelSet& portable_kernels() {
  // 8 tokens per call by choice (it takes up to kMaxTokens, as the SIMD sets' fallback for pairs with an
  // infinite scale and for 2-bit weights): the calls it was measured with before kMaxTokens grew.
  static const KernelSet k{"portable", pair_portable, pair_portable, pair_portable, 8};
  return k;
}

}  // namespace qmoe::cpu
