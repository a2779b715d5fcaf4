// ONNX Runtime's CUDA prepacked weight layout (CUTLASS fpA_intB for SM80; contract §7), for import.
//
// Files made for ORT's CUDA execution provider hold fc1/fc2 in this layout, declared as [E, K, N/pack].
// qmoe converts them to the raw layout on load (ort_cuda_to_raw); the forward transform
// (raw_to_ort_cuda) exists for tests and for writing such files. Only 4-bit and 8-bit exist: ORT's
// fpA_intB kernels have no 2-bit weights, so a 2-bit matrix is refused rather than guessed at.
//
// Shapes the layout holds (checked by check_ort_cuda_shape, refused with an error otherwise):
//   K (input columns) a multiple of 64: the layout stores whole 64-row K tiles (CUTLASS's ThreadblockK
//     for 16-bit activations: one 128-byte cache line of A per row);
//   N (output rows) a multiple of 16 (4-bit) or 8 (8-bit): whole 32-bit words along N in step 1/2, whole
//     groups of CI interleaved columns, and the minimum ORT's own packer accepts (its packed-column
//     count N/pack must be a multiple of the MMA's N = 8).
//
// Index grid, one expert, 4-bit (R = 32, CI = 4, 8 codes per 32-bit word). Bytes come in 128-byte
// lines; line (g, t) holds k in [64t, 64t + 64) of the CI = 4 columns n in [4g, 4g + 4) and starts at
// byte 128 * (g * K/64 + t). Inside line (0, 0), nibble slots of each little-endian word (slot 0 = low
// nibble of the word's first byte, slot 1 = its high nibble, ...):
//
//   word  n   slot: 0   1   2   3   4   5   6   7        bytes
//     0   0        k0  k8 k16 k24  k1  k9 k17 k25        0..3
//     1   0        k2 k10 k18 k26  k3 k11 k19 k27        4..7
//     2   0        k4 k12 k20 k28  k5 k13 k21 k29
//     3   0        k6 k14 k22 k30  k7 k15 k23 k31
//     4   0       k32 k40 k48 k56 k33 k41 k49 k57        (second group of R = 32 rows)
//    ...
//     7   0       k38 k46 k54 k62 k39 k47 k55 k63
//     8   1        k0  k8 k16 k24  k1  k9 k17 k25        (column n = 1, same k pattern)
//    ...
//    31   3       k38 k46 k54 k62 k39 k47 k55 k63        byte 124..127; line (0, 1) follows: k 64..127
//
// 8-bit (R = 16, CI = 2, 4 codes per word): line (g, t) holds k in [64t, 64t + 64) of columns 2g, 2g+1;
// word 0 (n = 2g) bytes 0..3 = k0 k8 k1 k9, word 1 = k2 k10 k3 k11, word 2 = k4 k12 k5 k13, word 3 =
// k6 k14 k7 k15, word 4 = k16 k24 k17 k25, ..., words 16..31 the same for column 2g + 1.
// Every nibble/byte holds the unsigned raw code q: step 1's "- 2^(b-1)" and step 5's "+ 2^(b-1)" cancel.
//
// Why it looks like that: a threadblock steps K by 64 and loads B with whole 128-byte lines, so 64 k of
// CI columns share a line (CI = 128 bytes / (64 k * bits / 8)). Tensor cores read B through ldmatrix,
// which moves 16-bit elements; narrower codes would land in the wrong threads, so step 2 pre-permutes
// the k rows so each thread of mma.m16n8k16 receives its k = 2*(lane%4) + {0, 1, 8, 9} pairs. Step 5
// orders codes inside a word so that even/odd elements sit 16 bits apart: one mask/shift plus the fp16
// "magic number" trick (0x6400 | code = 1024 + code) yields a half2 of two codes, which is also why the
// codes are stored biased (unsigned).
#pragma once

#include <cstdint>
#include <string>

#include "qmoe/tensor.h"

namespace qmoe {

// The layout's constants for one bit width (contract §7). Throws qmoe::Error for bits other than 4, 8.
struct OrtCudaGeometry {
  int bits;
  int perm_rows;         // R: k rows permuted together (32 for 4-bit, 16 for 8-bit)
  int interleave;        // CI: columns sharing a 128-byte line (4 for 4-bit, 2 for 8-bit)
  int codes_per_word;    // Ew: codes in a 32-bit word (8 or 4)
  int words_per_column;  // VT: words of one column in a line, 64 / Ew
  static constexpr int kTileK = 64;            // k rows per line (CUTLASS ThreadblockK, fp16/bf16 A)
  static constexpr int kLineBytes = 128;       // bytes per line
  int n_multiple;        // N must be a multiple of this (16 for 4-bit, 8 for 8-bit)
};
OrtCudaGeometry ort_cuda_geometry(int bits);

// Throws qmoe::Error naming N, K and the rule when the layout cannot hold an [N, K] matrix.
void check_ort_cuda_shape(int64_t N, int64_t K, int bits);

// Where the code of logical element (n, k) of one expert lands: byte offset inside that expert's
// N*K*bits/8 bytes and bit shift inside the byte. Derived by composing the position maps of §7's
// steps; the transforms below move data and are tested against this map.
struct OrtCudaPos {
  int64_t byte;
  int shift;
};
OrtCudaPos ort_cuda_locate(int64_t n, int64_t k, int64_t N, int64_t K, int bits);

// Raw [E, N, K/pack] uint8 -> ORT CUDA layout, declared shape [E, K, N/pack]. Written step by step
// from contract §7 (see ort_cuda_steps below). Throws qmoe::Error on 2-bit, bad shapes or dtypes.
Tensor raw_to_ort_cuda(const Tensor& raw, int64_t N, int64_t K, int bits);
// ORT CUDA layout [E, K, N/pack] -> raw [E, N, K/pack]: the exact inverse. Works line by line with a
// gather table built from ort_cuda_locate (one pass, cache friendly). Throws qmoe::Error on shapes the
// layout cannot hold (N and K must be in whole tiles, see above), on 2-bit and on a wrong dtype/shape.
Tensor ort_cuda_to_raw(const Tensor& packed, int64_t N, int64_t K, int bits);

// Text grid of the first `max_words` 32-bit words of one expert: which (n, k) each slot holds.
std::string ort_cuda_dump_layout(int bits, int64_t N, int64_t K, int64_t max_words = 32);

// The individual steps of contract §7 and their inverses, on one expert's bytes (in and out must not
// overlap; each buffer holds N*K*bits/8 bytes). Public so tests can check each step on a tiny case.
// Each checks only the shape rules of its own step.
namespace ort_cuda_steps {
// 1. Raw [N][K] unsigned codes (packed along K) -> [K][N] row-major, packed along N (4-bit: low nibble
//    = even n), each code minus 2^(bits-1) in two's complement.
void transpose_to_signed_kn(const uint8_t* raw, uint8_t* out, int64_t N, int64_t K, int bits);
void signed_kn_to_raw(const uint8_t* in, uint8_t* raw, int64_t N, int64_t K, int bits);
// 2. Inside each group of R k-rows of the [K][N] matrix, output row i = input row P[i]; rows move as
//    whole 32-bit words.
void permute_k_rows(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits);
void unpermute_k_rows(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits);
// 3. [K][N] row-major -> column-major: element (k, n) to linear position n*K + k (packed along k).
void transpose_to_column_major(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits);
void transpose_to_row_major(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits);
// 4. Column interleave of 32-bit words: word (n, v) to
//    (n/CI)*(CI*K/Ew) + CI*(v - v%VT) + VT*(n%CI) + v%VT.
void interleave_columns(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits);
void deinterleave_columns(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits);
// 5. Add 2^(bits-1) to every code, then reorder inside each 32-bit word: 4-bit nibble slots 0..7 take
//    elements 0 2 4 6 1 3 5 7; 8-bit byte slots 0..3 take bytes 0 2 1 3. In place.
void add_bias_and_reorder(uint8_t* data, int64_t nbytes, int bits);
void unreorder_and_sub_bias(uint8_t* data, int64_t nbytes, int bits);
}  // namespace ort_cuda_steps

}  // namespace qmoe
