// AVX-512 VNNI pair kernels: the "int8" compute mode (CpuBackendOptions::compute), an accuracy option
// for prefill. Built with -mavx512vnni on top of the AVX-512 flags; the backend selects it only after
// checking AVX512_VNNI (cpu_backend.cpp). Same packed format (cpu_layout.h), same PairJob interface;
// the activations come quantized to int8 (int8_rows.h), one fp32 scale per row.
//
// Why: at T >= 64 the exact kernels are bound by fp32 FMAs and the bf16 ones by vdpbf16ps (32 MACs per
// instruction, docs/PERF.md run 4). vpdpbusd multiplies 64 unsigned bytes by 64 signed bytes and adds
// each group of 4 products into one of 16 int32 lanes: 64 MACs per instruction, and the int4/int8
// weight codes are already small unsigned integers, so "dequant" is only a byte shuffle.
//
// Numerics. Per output lane (row), token t and integer group g (int8_rows.h: min(block, 256) columns,
// so a group never straddles a scale block), with the weight codes q (unsigned), the zero point z
// (2^(bits-1) by default) and the token's codes xq and nsum_g = -(sum of xq over the group):
//   isum_g = sum over the group of q * xq  +  z * nsum_g    = sum (q - z) * xq, exactly, in int32
//   acc    = fma(scale_b, float(isum_g), acc)               groups in increasing column order
//   y      = acc * sx                                        (sx: the token's activation scale)
// |isum_g| <= 256 * 255 * 127 < 2^24, so the int32 sums never overflow and float(isum_g) is exact;
// all error comes from the activation rounding (|x - sx * xq| <= sx / 2) and fp32 rounding of acc:
//   |y_int8 - y_exact| <= (sx / 2) * sum_c |s (q - z)|  + fp32 terms
// (tested in cpu_int8_kernel_test.cpp). A token's arithmetic never depends on which tokens share the
// call, so results are bitwise the same for every chunk size and thread count. Pairs with an infinite
// scale go to the exact portable kernel (on the fp32 rows, PairJob::x), as in the other AVX-512 kernels;
// 2-bit weights always take that kernel.
//
// The codes. load_transposed (kernels_int8_codes.h) turns a 64-byte line of code bytes j..j+3 of a
// tile's 16 rows into dword l = row l's bytes j..j+3:
//   int8: those are columns j..j+3, against the x dword at column j.
//   int4: byte j+m holds columns 2(j+m) (low nibble) and 2(j+m)+1 (high). "& 0x0f" gives columns 2j,
//         2j+2, 2j+4, 2j+6; "(>> 4) & 0x0f" gives 2j+1, .., 2j+7. The activation rows are stored with
//         each 8-column group as its even columns, then its odd ones (int8_column_slot), so the
//         matching x dwords sit at slots 2j and 2j+4. One transpose and three bit operations per
//         64 code bytes feed 2 x 16 rows x 4 columns, against 2 x MT vpdpbusd.
// Where the CPU has AVX512_VBMI the transpose is one vpermb instead of two shuffles: 2-vCPU Xeon, mixtral,
// three alternating runs, ms: T = 64 int4 block 32 70.0-71.1 -> 67.5-70.1, block 128 56.1-56.9 ->
// 53.9-54.2, int8 81.4-86.5 -> 77.7-79.1 (docs/PERF.md).
// A row's last step may have only 2 code bytes left (J is even, not a multiple of 4): a masked load
// reads those and zeros for the rest (codes 0, against x columns past K, which are 0).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_layout.h"
#include "cpu/int8_rows.h"
#include "cpu/kernels_avx512_common.h"
#include "cpu/kernels_int8_codes.h"

namespace qmoe::cpu {

namespace {

// Tokens per call, by measurement (mixtral, 1 thread, T = 512, CPU ms of one layer on a machine shared
// with a CI run, load ~4.5 on 2 cores, so +-5%): int4 block 32 / int4 block 128 / int8 row-wise
// 4 -> 837 / 640 / 737, 6 -> 902 / 622 / 721, 8 -> 987 / 662 / 834, with the fp32 sums in registers.
// They now live in jb.acc (2 zmm per token instead of 4); 8 tokens then gained 3% at int4 block 128
// and lost 11% at int8 (2 threads, idle machine, mixtral T = 512: 320 vs 330 ms, 423 vs 382 ms). On a
// 2-vCPU Intel Xeon (AVX-512 VNNI), 8 tokens for 4-bit weights: mixtral T = 64 block 32 79.3 -> 72.8 ms,
// block 128 63.7 -> 59.3, T = 8 and T = 512 block 32 the same, block 128 T = 512 412 -> 394 (three
// alternating runs each; docs/PERF.md, "A second machine"). An expert's 16 tokens at T = 64 then take two
// calls instead of three, each decoding the 4-bit weights once.
constexpr int kTokensW4 = 8, kTokensW8 = 6;

// Broadcast of the 4 int8 codes at slot i of a row.
inline __m512i x_dword(const int8_t* xq, int64_t i) {
  int32_t w;
  std::memcpy(&w, xq + i, 4);
  return _mm512_set1_epi32(w);
}

// The pair kernel for both widths: BITS 4 or 8; VBMI: the transpose by vpermb (load_transposed). D = 1: the
// int8 mode; D = kInt8Digits: the int8x3 mode's small calls (the digits' sums side by side, combined as
// kernels_amx.cpp combines them, so both give the same bits); D = kInt8PairDigits: the same for the rows of digit
// pairs (4-bit weights only).
template <int BITS, int MT, bool ZP, bool VBMI, int D = 1>
void pair_vnni(const PairJob& jb) {
  constexpr int kPack = 8 / BITS;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  // The fp32 sums live in jb.acc (L1), touched once per integer group, so the registers hold only
  // the int32 group sums, the codes and the constants (2 threads, idle machine, T = 512, int4 block
  // 32, three alternating runs: qwen3 73.7 -> 68.5 ms, mixtral 459 -> 419 ms; other cases within noise).
  float* const acc = jb.acc;
  for (int i = 0; i < MT * kPairRows; i += 16) _mm512_storeu_ps(acc + i, _mm512_setzero_ps());
  const uint8_t* c[2] = {jb.codes[0], jb.codes[1]};
  const int64_t gcols = std::min<int64_t>(jb.block_bytes * kPack, kInt8GroupCols), gbytes = gcols / kPack;
  // Integer group (int8_rows.h) of the fold: groups run in column order and never straddle a block,
  // so a counter, not a 64-bit division per group (2 threads, mixtral int4 b32 T=64, three
  // alternating runs: 44.2-44.8 -> 41.8-44.7 ms, and 43.6-47.5 -> 41.5-44.6 in a second round).
  int64_t g = 0;
  for (int64_t b = 0; b < jb.nb; ++b) {
    const int64_t jb0 = b * jb.block_bytes, jb1 = std::min(jb0 + jb.block_bytes, jb.jbytes);
    // z per row, as the low 16-bit word of each dword (vpdpwssd's operand); the default where a tile has none.
    __m512i z[2];
    for (int tile = 0; tile < 2; ++tile)
      z[tile] = ZP && jb.zero_points[tile] ? load_codes16(jb.zero_points[tile] + b * kTileRows)
                                           : _mm512_set1_epi32(1 << (BITS - 1));
    prefetch_scales(jb, b);
    __m512 s[2];
    for (int tile = 0; tile < 2; ++tile) s[tile] = load_scales16(jb.scale_dtype, jb.scales[tile], b * kTileRows);
    for (int64_t jg = jb0; jg < jb1; jg += gbytes, ++g) {
      const int64_t je = std::min(jg + gbytes, jb1);
      // Without zero points z is the same for every row, so z * nsum_g is one int32 per token: the
      // sums start there instead of taking a vpdpwssd per tile at the fold (the same integers).
      __m512i isum[MT][2][D];
      for (int t = 0; t < MT; ++t)
        for (int d = 0; d < D; ++d)
          isum[t][0][d] = isum[t][1][d] =
              ZP ? _mm512_setzero_si512()
                 : _mm512_set1_epi32(jb.xneg_sum[t][d * jb.xneg_digit_stride + g] * (1 << (BITS - 1)));
      auto step = [&](int64_t j, bool full) __attribute__((always_inline)) {
        __m512i w[2][2];  // [tile][0: low nibbles or int8 codes, 1: high nibbles]
        for (int tile = 0; tile < 2; ++tile) {
          const __m512i v = load_transposed<VBMI>(c[tile] + j * kTileRows, full);
          if constexpr (BITS == 4) {
            w[tile][0] = _mm512_and_si512(v, low4);
            w[tile][1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          } else {
            w[tile][0] = v;
          }
        }
        for (int t = 0; t < MT; ++t)
          for (int d = 0; d < D; ++d) {
            // Digit d's codes, placed so that slot 2j (4-bit) or j of this group is at xq + that (int8_rows.h).
            const int8_t* xq = jb.xq[t] + (D == kInt8PairDigits ? (d >> 1) * 2 * jb.xq_digit_stride + (g + (d & 1)) * gcols
                                                                : d * jb.xq_digit_stride);
            if constexpr (BITS == 4) {
              const __m512i x0 = x_dword(xq, 2 * j), x1 = x_dword(xq, 2 * j + 4);
              for (int tile = 0; tile < 2; ++tile)
                isum[t][tile][d] =
                    _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(isum[t][tile][d], w[tile][0], x0), w[tile][1], x1);
            } else {
              const __m512i x0 = x_dword(xq, j);
              for (int tile = 0; tile < 2; ++tile) isum[t][tile][d] = _mm512_dpbusd_epi32(isum[t][tile][d], w[tile][0], x0);
            }
          }
      };
      int64_t j = jg;
      // 4-bit weights in blocks of 32: each group is 4 steps, run unrolled whole rather than as two turns
      // of the loop below, whose back-edge GCC 12 pays with register copies (2 threads, three alternating
      // runs, ms: mixtral T=64 41.3-41.7 -> 40.3-40.9, T=512 312-315 -> 300-310; qwen3 T=64 10.2-10.4 ->
      // 9.4-9.6). 8-bit weights never take it (compiled out: their kernels stay as they were).
      if constexpr (BITS == 4) {
        if (je - jg == 16) {
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u, j += 4) {
            _mm_prefetch(reinterpret_cast<const char*>(c[0] + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(c[1] + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
            step(j, true);
          }
        }
      }
      // Two steps per iteration: GCC 12 otherwise copies every accumulator to another register and
      // back each step (20 vmovdqa per 24 vpdpbusd at 6 tokens; 21 per 48 unrolled). 2 threads, quiet
      // machine, three interleaved runs, ms: mixtral 8-bit weights T=512 339 -> 285, T=64 51.9 -> 46.5,
      // qwen3 8-bit T=512 58.3 -> 52.0; mixtral int4 block 128 T=512 297 -> 286, T=64 41.0 -> 39.7.
#pragma GCC unroll 2
      for (; j + 4 <= je; j += 4) {  // one 64-byte line per tile per step, one prefetch each
        _mm_prefetch(reinterpret_cast<const char*>(c[0] + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c[1] + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
        step(j, true);
      }
      if (j < je) step(j, false);  // 2 bytes left: only at the end of a row
      // A compiler barrier before the fold: without it GCC 12 forwards each sum it stored into
      // jb.acc to the next group's fold through a stack slot, so every fold stored twice (jb.acc
      // and the slot) and block-32 weights, folding every 32 columns, stalled on stores (perf: 13%
      // of the kernel's samples on the instruction after a fold's last store). 2 threads, mixtral
      // int4 block 32 T=64, four alternating runs: 50.6-52.0 -> 42.2-44.9 ms (docs/PERF.md).
      asm volatile("" ::: "memory");
      for (int t = 0; t < MT; ++t)
        for (int tile = 0; tile < 2; ++tile) {
          // Digit d's sum + z * -(sum of its xq), which the start value does not hold with zero points.
          const auto exact = [&](int d) __attribute__((always_inline)) {
            if constexpr (!ZP) return isum[t][tile][d];
            return _mm512_dpwssd_epi32(isum[t][tile][d], z[tile], _mm512_set1_epi32(jb.xneg_sum[t][d * jb.xneg_digit_stride + g]));
          };
          __m512 sum;
          if constexpr (D == 1) sum = _mm512_cvtepi32_ps(exact(0));
          else if constexpr (D == kInt8PairDigits)  // h = 16 a + b, l = 16 c + d
            sum = pair_digits_group_sum(_mm512_add_epi32(_mm512_slli_epi32(exact(0), 4), exact(1)),
                                        _mm512_add_epi32(_mm512_slli_epi32(exact(2), 4), exact(3)));
          else sum = digits_group_sum(exact(0), exact(1), exact(2));
          float* a = acc + t * kPairRows + tile * kTileRows;
          _mm512_storeu_ps(a, _mm512_fmadd_ps(s[tile], sum, _mm512_loadu_ps(a)));
        }
    }
  }
  for (int t = 0; t < MT; ++t) {
    const __m512 sx = _mm512_set1_ps(jb.xscale[t]);
    for (float* a = acc + t * kPairRows; a < acc + (t + 1) * kPairRows; a += 16)
      _mm512_storeu_ps(a, _mm512_mul_ps(_mm512_loadu_ps(a), sx));
  }
}

template <bool VBMI>
void vnni_w4(const PairJob& jb) {
  dispatch_pair<kTokensW4>(jb, portable_kernels().w4, "avx512-vnni",
                           [&]<int MT, bool ZP>() { pair_vnni<4, MT, ZP, VBMI>(jb); });
}
template <bool VBMI>
void vnni_w8(const PairJob& jb) {
  dispatch_pair<kTokensW8>(jb, portable_kernels().w8, "avx512-vnni",
                           [&]<int MT, bool ZP>() { pair_vnni<8, MT, ZP, VBMI>(jb); });
}

}  // namespace

// 2 tokens: their 2 x 2 x 3 (or 4) digit sums and the codes fit the 32 registers.
void avx512_vnni_digits(const PairJob& jb) {
  if (jb.xq_pairs)
    return dispatch_pair<kVnniDigitTokens>(jb, portable_kernels().w4, "avx512-vnni-int8x3",
                                           [&]<int MT, bool ZP>() { pair_vnni<4, MT, ZP, true, kInt8PairDigits>(jb); });
  const auto run = [&]<int BITS>() {
    dispatch_pair<kVnniDigitTokens>(jb, portable_kernels().w4, "avx512-vnni-int8x3",
                                    [&]<int MT, bool ZP>() { pair_vnni<BITS, MT, ZP, true, kInt8Digits>(jb); });
  };
  jb.bits == 4 ? run.template operator()<4>() : run.template operator()<8>();
}

const KernelSet& avx512_vnni_kernels(bool vbmi) {
  // 2-bit weights take the exact portable kernel on the fp32 rows (max_tokens is within its kMaxTokens).
  const PairKernel w2 = portable_kernels().w2;
  static const KernelSet plain{"avx512-vnni", w2, vnni_w4<false>, vnni_w8<false>, kTokensW4, kTokensW8, swiglu16};
  static const KernelSet with_vbmi{"avx512-vnni-vbmi", w2, vnni_w4<true>, vnni_w8<true>, kTokensW4, kTokensW8, swiglu16};
  return vbmi ? with_vbmi : plain;
}

const KernelSet& avx512_vnni_kernels() {
  static const bool vbmi = __builtin_cpu_supports("avx512vbmi");
  return avx512_vnni_kernels(vbmi);
}

}  // namespace qmoe::cpu
