// AVX-512 BF16 pair kernels: the "bf16" compute mode (CpuBackendOptions::compute), an accuracy option
// for prefill. Built with -mavx512bf16 on top of the AVX-512 flags; the backend selects it only after
// checking AVX512_BF16 (cpu_backend.cpp). Same packed format (cpu_layout.h), same PairJob interface.
//
// Why: at T >= 64 the exact kernels are bound by fp32 FMAs (docs/PERF.md). vdpbf16ps does 16 rows x 2
// columns per instruction (32 multiply-adds into fp32, twice an FMA's 16) and needs a dequantized
// weight only once per 2 columns, so a code byte of a tile costs one dot-product instruction per token
// instead of two FMAs, plus half the dequant work per weight.
//
// Numerics. The weights stay exact: q - z is an integer in [-15, 15] (int4) or [-255, 255] (int8),
// and every such integer has at most 8 significant bits, so bf16(q - z) == q - z. The products of two
// bf16 numbers are exact in fp32; only the activations lose precision, once, when the backend rounds
// a chunk's fp32 rows to bf16 (nearest even, 8 significant bits: at most 2^-8 relative per element).
// Hence for one output of one GEMM
//   |y_bf16 - y_exact| <= 2^-8 * sum_c |s * (q - z) * x[c]|  + fp32 accumulation terms
// (tested in cpu_bf16_kernel_test.cpp). vdpbf16ps also treats bf16 denormal inputs as zero and flushes
// denormal results (|x| < 2^-126: an absolute error below 2^-126 * sum |s (q - z)|).
// Per output lane and token, block b in order (the exact contract's shape with bf16 pairs):
//   ev = the dot-product chain over the block's even steps, od = over its odd steps (a step = one
//        32-bit x word = columns 2i, 2i+1), each step ev = vdpbf16ps(ev, w, x word)
//   acc = fma(scale_b, ev + od, acc)
// The chain split never depends on how many tokens share a call, so a token's result is the same
// for every chunk size and thread count. Pairs with an infinite scale go to the exact portable kernel
// (on the fp32 rows), as in the exact AVX-512 kernels; 2-bit weights always take that kernel.
//
// int4 dequant, per code byte j of a tile (16 rows; low nibble = column 2j, high = 2j+1): vpmovzxbd
// widens the bytes to dwords d; d | (d << 12) puts the high nibble in the dword's high word and leaves
// the low nibble in bits 0..3 of the low word (bit 4 holds the high nibble's bit 0). vpermw then looks
// both words up in one 32-entry table at once, giving bf16(lo - 8) | bf16(hi - 8) << 16: exactly the
// pair layout vdpbf16ps wants. The table holds bf16((i & 15) - 8), so the stray bit 4 is harmless.
// With zero points the index is (nibble & 15) + 16 - z (1..31) into a table of bf16(i - 16).
// int8: code bytes j and j+1 are columns j and j+1; each is widened, has z subtracted and is
// converted to fp32 (exact), and a word blend keeps the top half (the bf16) of each.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_layout.h"
#include "cpu/kernels_avx512_common.h"

namespace qmoe::cpu {

namespace {

// Tokens per call, by measurement (mixtral, 1 thread, T = 512, CPU s; docs/PERF.md run 4). Each token
// holds 4 zmm chains (ev/od x 2 tiles), so past 6 tokens some chains spill; the dequant work per call
// is fixed, so more tokens amortize it. int4 (cheap dequant): 6 -> 0.90 / 1.00 s (block 128 / 32),
// 7 -> 0.87 / 0.98, 8 -> 1.19 / 1.34 (the spills cost more). int8 (two widen+convert per word): 4 -> 1.44,
// 6 -> 1.17, 7 -> 1.07, 8 -> 1.05.
constexpr int kTokensW4 = 7, kTokensW8 = 8;

// bf16 bits of a small integer (|v| <= 255: exact).
constexpr uint16_t bf16_of_int(int v) {
  if (v == 0) return 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  const int a = v < 0 ? -v : v;
  int e = 0;
  while ((a >> (e + 1)) != 0) ++e;
  return uint16_t(sign | uint16_t((127 + e) << 7) | uint16_t((a << (7 - e)) & 0x7f));
}
static_assert(bf16_of_int(1) == 0x3f80 && bf16_of_int(-8) == 0xc100 && bf16_of_int(255) == 0x437f, "bf16 encoding");

struct Tables {
  alignas(64) uint16_t sym[32];  // [i] = bf16((i & 15) - 8): default zero point
  alignas(64) uint16_t zp[32];   // [i] = bf16(i - 16): index (q & 15) + 16 - z
  constexpr Tables() : sym{}, zp{} {
    for (int i = 0; i < 32; ++i) sym[i] = bf16_of_int((i & 15) - 8), zp[i] = bf16_of_int(i - 16);
  }
};
constexpr Tables kTables;

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

// Broadcast of the 32-bit x word at bf16 index i (columns i, i+1).
inline __m512i x_word(const uint16_t* xb, int64_t i) {
  uint32_t w;
  std::memcpy(&w, xb + i, 4);
  return _mm512_set1_epi32(int(w));
}

template <int MT, bool ZP>
void pair_w4(const PairJob& jb) {
  const __m512i tbl = _mm512_load_si512(ZP ? kTables.zp : kTables.sym);
  const __m512i low4 = _mm512_set1_epi32(0x000f000f);
  __m512 acc[MT][2];
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  const uint8_t* c0 = jb.codes[0];
  const uint8_t* c1 = jb.codes[1];
  for (int64_t b = 0; b < jb.nb; ++b) {
    const int64_t j0 = b * jb.block_bytes, j1 = std::min(j0 + jb.block_bytes, jb.jbytes);
    // 16 - z in both words of each row's dword; the default zero point 8 where a tile has none.
    __m512i za0 = _mm512_set1_epi16(8), za1 = za0;
    if constexpr (ZP) {
      auto adj = [&](const uint8_t* zp) {
        const __m512i v = _mm512_sub_epi32(_mm512_set1_epi32(16), load_codes16(zp + b * kTileRows));
        return _mm512_or_si512(v, _mm512_slli_epi32(v, 16));
      };
      if (jb.zero_points[0]) za0 = adj(jb.zero_points[0]);
      if (jb.zero_points[1]) za1 = adj(jb.zero_points[1]);
    }
    auto dequant = [&](const uint8_t* p, __m512i za) __attribute__((always_inline)) {
      const __m512i d = load_codes16(p);
      const __m512i s = _mm512_slli_epi32(d, 12);
      if constexpr (ZP) {
        // (d | s) & 0x000f000f, then + (16 - z): index 1..31.
        return _mm512_permutexvar_epi16(_mm512_add_epi16(_mm512_ternarylogic_epi32(d, s, low4, 0xa8), za), tbl);
      } else {
        (void)za;
        return _mm512_permutexvar_epi16(_mm512_or_si512(d, s), tbl);
      }
    };
    __m512 ev[MT][2], od[MT][2];
    for (int t = 0; t < MT; ++t) ev[t][0] = ev[t][1] = od[t][0] = od[t][1] = _mm512_setzero_ps();
    // Code byte j of both tiles (32 rows x columns 2j, 2j+1) into chain ch.
    auto step = [&](int64_t j, __m512 (&ch)[MT][2]) __attribute__((always_inline)) {
      const __m512bh w0 = as_bh(dequant(c0 + j * kTileRows, za0));
      const __m512bh w1 = as_bh(dequant(c1 + j * kTileRows, za1));
      for (int t = 0; t < MT; ++t) {
        const __m512bh xw = as_bh(x_word(jb.xb[t], 2 * j));
        ch[t][0] = _mm512_dpbf16_ps(ch[t][0], w0, xw);
        ch[t][1] = _mm512_dpbf16_ps(ch[t][1], w1, xw);
      }
    };
    // j0 is even (block_bytes is even), so step j goes to ev when j is even. Unrolled by 4: one 64-byte
    // line per tile, one prefetch each (as the exact kernel).
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(c0 + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c1 + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
      step(j, ev), step(j + 1, od), step(j + 2, ev), step(j + 3, od);
    }
    for (; j < j1; ++j) (j & 1) ? step(j, od) : step(j, ev);
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
    // Code bytes j, j+1 of a tile -> dwords bf16(q_j - z) | bf16(q_j+1 - z) << 16. The fp32 values are
    // exact integers, so their top 16 bits are their bf16.
    auto dequant = [&](const uint8_t* p, __m512i z) __attribute__((always_inline)) {
      const __m512i e = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_sub_epi32(load_codes16(p), z)));
      const __m512i o = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_sub_epi32(load_codes16(p + kTileRows), z)));
      return _mm512_mask_blend_epi16(__mmask32(0xaaaaaaaau), _mm512_srli_epi32(e, 16), o);
    };
    __m512 ev[MT][2], od[MT][2];
    for (int t = 0; t < MT; ++t) ev[t][0] = ev[t][1] = od[t][0] = od[t][1] = _mm512_setzero_ps();
    auto step = [&](int64_t j, __m512 (&ch)[MT][2]) __attribute__((always_inline)) {
      const __m512bh w0 = as_bh(dequant(c0 + j * kTileRows, z0));
      const __m512bh w1 = as_bh(dequant(c1 + j * kTileRows, z1));
      for (int t = 0; t < MT; ++t) {
        const __m512bh xw = as_bh(x_word(jb.xb[t], j));
        ch[t][0] = _mm512_dpbf16_ps(ch[t][0], w0, xw);
        ch[t][1] = _mm512_dpbf16_ps(ch[t][1], w1, xw);
      }
    };
    // j0 is a multiple of 4 (block_bytes = block size >= 16, or 0 row-wise): step j (even) goes to ev
    // when j % 4 == 0.
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {  // one 64-byte line per tile per iteration, one prefetch each
      _mm_prefetch(reinterpret_cast<const char*>(c0 + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c1 + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
      step(j, ev), step(j + 2, od);
    }
    for (; j < j1; j += 2) (j & 2) ? step(j, od) : step(j, ev);
    finish_block<MT>(jb, b, ev, od, acc);
  }
  store_acc<MT>(jb, acc);
}

void bf16_w4(const PairJob& jb) {
  dispatch_pair<kTokensW4>(jb, portable_kernels().w4, "avx512-bf16", [&]<int MT, bool ZP>() { pair_w4<MT, ZP>(jb); });
}
void bf16_w8(const PairJob& jb) {
  dispatch_pair<kTokensW8>(jb, portable_kernels().w8, "avx512-bf16", [&]<int MT, bool ZP>() { pair_w8<MT, ZP>(jb); });
}

}  // namespace

const KernelSet& avx512_bf16_kernels() {
  // 2-bit weights take the exact portable kernel on the fp32 rows (max_tokens 7 is within its kMaxTokens).
  static const KernelSet k{"avx512-bf16", portable_kernels().w2, bf16_w4, bf16_w8, kTokensW4, kTokensW8, swiglu16};
  return k;
}

}  // namespace qmoe::cpu
