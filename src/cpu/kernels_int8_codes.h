// The int8 compute modes' view of the packed weight codes, shared by their two kernel sets
// (kernels_avx512_vnni.cpp: vpdpbusd; kernels_amx.cpp: AMX tile multiplies), and the int8x3 mode's digit
// combination, which both compute the same way so that their results agree bit for bit. Include only from files
// built with the AVX-512 flags; like kernels_avx512_common.h, everything is in an unnamed namespace so
// each translation unit compiles its own copy with its own flags.
//
// One 64-byte line of a packed tile (cpu_layout.h) holds code bytes j..j+3 of the tile's 16 rows:
// 128-bit lane m holds byte j+m of rows 0..15. Both kernels want dword l to hold row l's 4 bytes (the
// operand layout of vpdpbusd, and one row of an AMX B tile), so this is a 4x16 byte transpose: vpermd
// moves dword d of lane m to dword m of lane d (rows 4d..4d+3 of byte j+m), then vpshufb transposes the
// 4x4 bytes inside each lane. Where the CPU has AVX512_VBMI, one vpermb (any byte of the 64 to any
// place) does it instead; both shuffles issue on the same port as half of the vpdpbusd on Intel cores
// (docs/PERF.md, "The int8 option's transpose by vpermb"). vpermb is inline assembly so that a file
// needs no -mavx512vbmi, which would let the compiler emit VBMI anywhere in it; the VBMI variants run
// only where the CPU reports AVX512_VBMI.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "cpu/int8_rows.h"

namespace qmoe::cpu {
namespace {

// vpermb's index for the transpose: output byte 4 l + m (row l's byte j+m) is input byte 16 m + l.
alignas(64) constexpr uint8_t kTransposeBytes[64] = {
    0,  16, 32, 48, 1,  17, 33, 49, 2,  18, 34, 50, 3,  19, 35, 51, 4,  20, 36, 52, 5,  21,
    37, 53, 6,  22, 38, 54, 7,  23, 39, 55, 8,  24, 40, 56, 9,  25, 41, 57, 10, 26, 42, 58,
    11, 27, 43, 59, 12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};

// Code bytes j..j+3 (or j..j+1 where `full` is false: a row's last step, J being even but not always a
// multiple of 4; the missing bytes read as 0) of a tile's 16 rows, transposed so that dword l holds row
// l's 4 bytes in increasing j.
template <bool VBMI>
inline __m512i load_transposed(const uint8_t* p, bool full) {
  const __m512i v = full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(__mmask64(0xffffffffu), p);
  if constexpr (VBMI) {
    __m512i t;
    asm("vpermb %2, %1, %0" : "=v"(t) : "v"(_mm512_load_si512(kTransposeBytes)), "v"(v));
    return t;
  } else {
    const __m512i perm = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i shuf = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    return _mm512_shuffle_epi8(_mm512_permutexvar_epi32(perm, v), shuf);
  }
}

// The int8x3 mode's group sum from its three digits' exact sums i0, i1, i2 (int8_rows.h): i0 + i1 / 254 + i2 /
// 254^2. 254 i0 + i1 is exact in int32 (|i_d| <= 256 * 255 * 127, so |254 i0 + i1| <= 2^31 - 2^25), leaving
// its conversion, the fma and the constants' rounding (2^-25 relative each): fp32-level.
inline __m512 digits_group_sum(__m512i i0, __m512i i1, __m512i i2) {
  static_assert(kInt8Digits == 3 && kInt8DigitBase == 254, "the combination below");
  const __m512i i01 = _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(i0, 8), _mm512_slli_epi32(i0, 1)), i1);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(i01), _mm512_set1_ps(1.f / kInt8DigitBase),
                         _mm512_mul_ps(_mm512_cvtepi32_ps(i2), _mm512_set1_ps(1.f / (kInt8DigitBase * kInt8DigitBase))));
}

// The digit pairs' group sum (int8_rows.h, kInt8PairDigits) from the exact sums eh = sum (q - z) h and
// el = sum (q - z) l: 4096 eh + el, rounded once. Both convert exactly (|eh|, |el| <= 32 * 15 * 2048 < 2^24).
inline __m512 pair_digits_group_sum(__m512i eh, __m512i el) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(eh), _mm512_set1_ps(4096.f), _mm512_cvtepi32_ps(el));
}

}  // namespace
}  // namespace qmoe::cpu
