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

// The int8x3 compute mode (compute = "int8x3", kernels_amx.cpp): each row as kInt8Digits int8 digits of
// base kInt8DigitBase with the scale above,
//   x ~= sx * (q0 + q1 / 254 + q2 / 254^2),   |x - that| <= sx / (2 * 254^2) = max|x| * 6.1e-8 (+ 2^-50 relative),
// q0 = round(x / sx) in [-127, 127] (quantize_row_int8's codes up to sx's own rounding), q1, q2 in
// [-127, 127]: 24 bits of the row's largest value, where fp32 keeps 24 of each element. (Base 254 keeps
// the digits of a residual in [-0.5, 0.5] inside int8; base 256 would need 128.) Digit plane d of the
// codes is q + d * W and of the group sums nsum + d * nsum_stride, each laid out as above.
inline constexpr int kInt8Digits = 3;
inline constexpr int kInt8DigitBase = 254;
void quantize_row_int8_digits(const float* x, int64_t K, int64_t W, int bits, int64_t block_size, int8_t* q,
                              int32_t* nsum, int64_t nsum_stride, float* sx);

}  // namespace qmoe::cpu
