// Activation rows for the int8 compute mode (CpuBackendOptions::compute = "int8", kernels_avx512_vnni.cpp):
// what the backend writes once per chunk for each fp32 row the VNNI kernels read, and what they expect.
//
// One row of K columns becomes
//   sx      fp32 scale, max|x| / 127 (0 for a row of zeros: every code is then 0)
//   q[W]    int8 codes, q = round_nearest_even(x * 127 / max|x|) in [-127, 127]; columns >= K are 0
//   nsum[]  one int32 per group of kInt8GroupCols columns (from column 0): -(sum of the group's q)
// so that x ~= sx * q with |x - sx * q| <= sx / 2 (+ the rounding of sx itself, 2^-24 relative).
// vpdpbusd takes 4 consecutive bytes per 32-bit lane, so the codes are stored in the order the kernel
// walks the packed weights (int8_column_slot): int8 weights in column order; int4 weights with each
// group of 8 columns stored as its 4 even columns, then its 4 odd ones (the kernel's low and high
// nibbles of 4 code bytes; kernels_avx512_vnni.cpp explains why).
// The code of each column is computed in double from x and max|x| alone, so a row's codes never
// depend on which other rows share the chunk (the determinism the backend promises).
#pragma once

#include <cstdint>

namespace qmoe::cpu {

// Columns of one integer group: the kernel sums q_w * q_x exactly in int32 over at most this many
// columns, then converts to fp32. 256 * 255 * 127 < 2^24, so that conversion is exact too, and a group's
// sum of codes (<= 256 * 127) fits int16 (the kernel multiplies it by the zero point with vpdpwssd).
// Scale blocks are powers of two >= 16, so a group is min(block, 256) columns and never straddles two
// blocks; row-wise scales use groups of 256.
inline constexpr int64_t kInt8GroupCols = 256;
inline int64_t int8_group_cols(int64_t block_size) {
  return block_size > 0 && block_size < kInt8GroupCols ? block_size : kInt8GroupCols;
}

// Where column c of a row lives in its int8 codes for weights of `bits` (4 or 8).
inline int64_t int8_column_slot(int bits, int64_t c) {
  if (bits != 4) return c;
  const int64_t r = c & 7;
  return (c & ~int64_t(7)) + (r & 1) * 4 + (r >> 1);
}

// Quantizes x[0..K) into q[0..W) (W >= K, a multiple of 8; zero past K), nsum[0..ceil(W / G)) for
// groups of G = int8_group_cols(block_size) columns, and *sx. A row holding Inf or NaN gets sx = NaN
// (every output of that token is then NaN), codes 0.
void quantize_row_int8(const float* x, int64_t K, int64_t W, int bits, int64_t block_size, int8_t* q, int32_t* nsum,
                       float* sx);

// The int8x3 compute mode (compute = "int8x3", kernels_amx.cpp): each row as int8 digits that keep 24 bits of
// the row's largest value, where fp32 keeps 24 of each element. Two forms, by the weights:
//
// Three digits (kInt8Digits) of base kInt8DigitBase under the scale above,
//   x ~= sx * (q0 + q1 / 254 + q2 / 254^2),   |x - that| <= sx / (2 * 254^2) = max|x| * 6.1e-8 (+ 2^-50 relative),
// q0 = round(x / sx) in [-127, 127] (quantize_row_int8's codes up to sx's own rounding), q1, q2 in
// [-127, 127]. (Base 254 keeps the digits of a residual in [-0.5, 0.5] inside int8; base 256 would need
// 128.) Digit plane d of the codes is q + d * W and of the group sums nsum + d * nsum_stride, each laid
// out as above.
//
// Four digits in two 12-bit pairs (kInt8PairDigits; 4-bit weights in blocks of 16 or 32, int8_pair_digits):
//   sx = max|x| / 2^23,   v = round(x / sx) = 4096 h + l,   h = 16 a + b,   l = 16 c + d,
// |h|, |l| <= 2048, a, c in [-127, 127], b, d the rest (|b|, |d| <= 16): |x - sx * v| <= sx / 2 = max|x| * 6.0e-8. Why:
// a tile multiply of 64 columns then takes one block's a and b together against a B tile of 16 (q - 8) and
// (q - 8), 16 (q - 8) fitting int8 for 4-bit weights only, so a block costs two full multiplies (h, l) where
// the three digits cost three of half a tile's columns, and its fold two sums instead of three (docs/PERF.md,
// "Twelve-bit digit pairs"). Layout: the pairs' planes h (a, b) at q and l (c, d) at q + 2W; in a plane,
// group g's G a-codes at g * 2G, then its G b-codes, each in int8_column_slot order; the four digits' group
// sums at nsum + d * nsum_stride (d = a, b, c, d).
inline constexpr int kInt8Digits = 3;
inline constexpr int kInt8DigitBase = 254;
inline constexpr int kInt8PairDigits = 4;
inline bool int8_pair_digits(int bits, int64_t block_size) { return bits == 4 && (block_size == 16 || block_size == 32); }
inline int int8_digit_count(int bits, int64_t block_size) {
  return int8_pair_digits(bits, block_size) ? kInt8PairDigits : kInt8Digits;
}
// Digit d's code of column slot s (int8_column_slot) in a row of either form: its offset from q.
inline int64_t int8_digit_offset(bool pairs, int64_t W, int64_t G, int d, int64_t s) {
  if (!pairs) return d * W + s;
  return (d >> 1) * 2 * W + (s / G) * 2 * G + (d & 1) * G + s % G;
}
// Quantizes x[0..K) into int8_digit_count(bits, block_size) planes of W codes at q and their group sums (W >= K,
// a multiple of 64; zeros past K), and *sx.
void quantize_row_int8_digits(const float* x, int64_t K, int64_t W, int bits, int64_t block_size, int8_t* q,
                              int32_t* nsum, int64_t nsum_stride, float* sx);
// The same bytes for the digit pairs (int8_pair_digits(4, block_size)), 8 columns at a time
// (int8_rows_avx512.cpp): call only where the CPU has AVX-512 F/BW/VL.
void quantize_row_int8_pairs_avx512(const float* x, int64_t K, int64_t W, int64_t block_size, int8_t* q,
                                    int32_t* nsum, int64_t nsum_stride, float* sx);

}  // namespace qmoe::cpu
