// ORT's CUDA SM80 fpA_intB weight layout (contract §7): the forward transform step by step, the
// closed-form position map, and the line-wise inverse used on load.
//
// How it fits: the ONNX loader calls ort_cuda_to_raw on fc1/fc2 of models made for ORT's CUDA EP, and
// from then on every backend sees only raw bytes. The forward transform follows the contract's five
// steps literally (each step is its own function with its own inverse) so that a reader can check it
// against the contract line by line; it is the reference. The inverse used on load instead walks the
// file one 128-byte line at a time with a gather table derived from ort_cuda_locate(), which composes
// the steps' position maps analytically. The tests check the two derivations (data movement vs. index
// algebra) against each other on random data, and the forward transform against byte-exact goldens
// from ORT's own packer (tests/cpp/ort_cuda_layout_test.cpp, docs/FORMAT.md §2.5).
#include "qmoe/ort_cuda_layout.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <vector>

#include "qmoe/error.h"
#include "core/str_builder.h"

namespace qmoe {

namespace {

// Contract §7 step 2: output row i of each R-row group = input row P[i].
constexpr std::array<int, 16> kPerm8 = {0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15};
constexpr std::array<int, 32> kPerm4 = {0, 1, 8,  9,  16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27,
                                        4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15, 22, 23, 30, 31};
// Contract §7 step 5: slot s of a 32-bit word takes element kOrder[s].
constexpr std::array<int, 8> kOrder4 = {0, 2, 4, 6, 1, 3, 5, 7};
constexpr std::array<int, 4> kOrder8 = {0, 2, 1, 3};

const int* perm_table(int bits) { return bits == 4 ? kPerm4.data() : kPerm8.data(); }
const int* order_table(int bits) { return bits == 4 ? kOrder4.data() : kOrder8.data(); }

// Inverse of P: the output row within the group that input row r goes to.
int perm_inverse(int bits, int r) {
  const int R = bits == 4 ? 32 : 16;
  const int* P = perm_table(bits);
  for (int i = 0; i < R; ++i)
    if (P[i] == r) return i;
  return -1;  // unreachable: P is a permutation (else StepsAgreeWithPositionMap fails)
}

// Element access on a buffer packed `8/bits` codes per byte, low bits = lower index.
inline int get_code(const uint8_t* p, int64_t i, int bits) {
  if (bits == 8) return p[i];
  return (p[i >> 1] >> ((i & 1) * 4)) & 0xF;
}
inline void set_code(uint8_t* p, int64_t i, int bits, int v) {
  if (bits == 8) {
    p[i] = uint8_t(v);
    return;
  }
  const int sh = int(i & 1) * 4;
  p[i >> 1] = uint8_t((p[i >> 1] & ~(0xF << sh)) | ((v & 0xF) << sh));
}

// [rows][cols] packed along cols -> [cols][rows] packed along rows. 64x64 element tiles keep both
// sides in L1; nibble work is per element, which is fine for a reference path.
void transpose_packed(const uint8_t* in, uint8_t* out, int64_t rows, int64_t cols, int bits) {
  constexpr int64_t T = 64;
  for (int64_t r0 = 0; r0 < rows; r0 += T)
    for (int64_t c0 = 0; c0 < cols; c0 += T) {
      const int64_t r1 = std::min(rows, r0 + T), c1 = std::min(cols, c0 + T);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) set_code(out, c * rows + r, bits, get_code(in, r * cols + c, bits));
    }
}

// Subtracting or adding 2^(bits-1) modulo 2^bits flips the code's top bit, so both biases are one XOR
// per byte (0x88 covers both nibbles). Two's complement of (q - 8) in 4 bits is exactly q ^ 8.
inline uint8_t bias_mask(int bits) { return bits == 4 ? 0x88 : 0x80; }
void flip_bias(uint8_t* p, int64_t nbytes, int bits) {
  const uint8_t m = bias_mask(bits);
  for (int64_t i = 0; i < nbytes; ++i) p[i] ^= m;
}

[[noreturn]] void shape_error(const std::string& who, int64_t N, int64_t K, int bits, const std::string& rule) {
  throw Error(who + ": ORT's CUDA SM80 layout cannot hold an int" + std::to_string(bits) + " matrix with N=" +
              std::to_string(N) + ", K=" + std::to_string(K) + ": " + rule);
}

// Step-local shape checks: each step states what it needs, so a tiny hand-made case fails clearly.
void need(bool ok, const char* step, int64_t N, int64_t K, int bits, const std::string& rule) {
  if (!ok) shape_error(std::string("ort_cuda_steps::") + step, N, K, bits, rule);
}

}  // namespace

OrtCudaGeometry ort_cuda_geometry(int bits) {
  if (bits == 4) return OrtCudaGeometry{4, 32, 4, 8, 8, 16};
  if (bits == 8) return OrtCudaGeometry{8, 16, 2, 4, 16, 8};
  if (bits == 2)
    throw Error(
        "ORT CUDA layout: 2-bit weights have no ORT CUDA prepacked layout (ORT's fpA_intB kernels take int4 and "
        "int8 only); a 2-bit model must hold raw weights (weights_prepacked = 0)");
  throw Error("ORT CUDA layout: expert_weight_bits must be 4 or 8, got " + std::to_string(bits));
}

void check_ort_cuda_shape(int64_t N, int64_t K, int bits) {
  const OrtCudaGeometry g = ort_cuda_geometry(bits);
  const std::string who = "ORT CUDA layout";
  if (N <= 0 || K <= 0) shape_error(who, N, K, bits, "N and K must be positive");
  if (K % OrtCudaGeometry::kTileK != 0)
    shape_error(who, N, K, bits,
                "K must be a multiple of 64 (the layout stores whole 64-row K tiles, one 128-byte line per tile and "
                "column group)");
  if (N % g.n_multiple != 0)
    shape_error(who, N, K, bits,
                "N must be a multiple of " + std::to_string(g.n_multiple) + " at " + std::to_string(bits) +
                    " bits (whole 32-bit words and interleave groups along N; ORT's packer accepts no other N)");
}

OrtCudaPos ort_cuda_locate(int64_t n, int64_t k, int64_t N, int64_t K, int bits) {
  const OrtCudaGeometry g = ort_cuda_geometry(bits);
  (void)N;
  // Step 2: row k of its R-group moves to the row that P maps onto it.
  const int64_t R = g.perm_rows;
  const int64_t kp = (k / R) * R + perm_inverse(bits, int(k % R));
  // Step 3: column-major, so column n's codes are contiguous in k'; 32-bit word v of column n.
  const int64_t Ew = g.codes_per_word, VT = g.words_per_column, CI = g.interleave;
  const int64_t v = kp / Ew;
  const int e = int(kp % Ew);
  // Step 4: the word moves to the interleaved position.
  const int64_t w = (n / CI) * (CI * K / Ew) + CI * (v - v % VT) + VT * (n % CI) + v % VT;
  // Step 5: element e goes to the slot s with order[s] == e.
  const int* order = order_table(bits);
  int s = 0;
  while (order[s] != e) ++s;
  const int64_t bit = int64_t(s) * bits;
  return OrtCudaPos{w * 4 + bit / 8, int(bit % 8)};
}

namespace ort_cuda_steps {

void transpose_to_signed_kn(const uint8_t* raw, uint8_t* out, int64_t N, int64_t K, int bits) {
  ort_cuda_geometry(bits);
  need(N > 0 && K > 0 && N % (8 / bits) == 0 && K % (8 / bits) == 0, "transpose_to_signed_kn", N, K, bits,
       "N and K must be positive multiples of the codes per byte");
  transpose_packed(raw, out, N, K, bits);
  flip_bias(out, N * K * bits / 8, bits);  // q - 2^(bits-1) in two's complement
}

void signed_kn_to_raw(const uint8_t* in, uint8_t* raw, int64_t N, int64_t K, int bits) {
  ort_cuda_geometry(bits);
  need(N > 0 && K > 0 && N % (8 / bits) == 0 && K % (8 / bits) == 0, "signed_kn_to_raw", N, K, bits,
       "N and K must be positive multiples of the codes per byte");
  const int64_t nbytes = N * K * bits / 8;
  std::vector<uint8_t> tmp(in, in + nbytes);
  flip_bias(tmp.data(), nbytes, bits);
  transpose_packed(tmp.data(), raw, K, N, bits);
}

namespace {
// Shared by step 2 and its inverse: rows of the [K][N] matrix are N*bits/32 words long.
void move_k_rows(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits, bool forward, const char* who) {
  const OrtCudaGeometry g = ort_cuda_geometry(bits);
  need(N > 0 && K > 0 && K % g.perm_rows == 0, who, N, K, bits,
       "K must be a multiple of " + std::to_string(g.perm_rows) + " (the permuted row group R)");
  need(N % g.codes_per_word == 0, who, N, K, bits,
       "N must be a multiple of " + std::to_string(g.codes_per_word) + " (rows move as whole 32-bit words)");
  const int64_t row_bytes = N * bits / 8;
  const int* P = perm_table(bits);
  for (int64_t base = 0; base < K; base += g.perm_rows)
    for (int i = 0; i < g.perm_rows; ++i) {
      const int64_t dst = base + (forward ? i : P[i]);
      const int64_t src = base + (forward ? P[i] : i);
      std::memcpy(out + dst * row_bytes, in + src * row_bytes, size_t(row_bytes));
    }
}
}  // namespace

void permute_k_rows(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits) {
  move_k_rows(in, out, N, K, bits, true, "permute_k_rows");
}
void unpermute_k_rows(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits) {
  move_k_rows(in, out, N, K, bits, false, "unpermute_k_rows");
}

void transpose_to_column_major(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits) {
  ort_cuda_geometry(bits);
  need(N > 0 && K > 0 && N % (8 / bits) == 0 && K % (8 / bits) == 0, "transpose_to_column_major", N, K, bits,
       "N and K must be positive multiples of the codes per byte");
  transpose_packed(in, out, K, N, bits);
}
void transpose_to_row_major(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits) {
  ort_cuda_geometry(bits);
  need(N > 0 && K > 0 && N % (8 / bits) == 0 && K % (8 / bits) == 0, "transpose_to_row_major", N, K, bits,
       "N and K must be positive multiples of the codes per byte");
  transpose_packed(in, out, N, K, bits);
}

namespace {
void move_words_interleaved(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits, bool forward,
                            const char* who) {
  const OrtCudaGeometry g = ort_cuda_geometry(bits);
  need(N > 0 && K > 0 && K % OrtCudaGeometry::kTileK == 0, who, N, K, bits,
       "K must be a multiple of 64 (rows per interleaved column tile)");
  need(N % g.interleave == 0, who, N, K, bits,
       "N must be a multiple of " + std::to_string(g.interleave) + " (columns interleaved together)");
  const int64_t Ew = g.codes_per_word, VT = g.words_per_column, CI = g.interleave;
  const int64_t words_per_col = K / Ew;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < words_per_col; ++v) {
      const int64_t src = n * words_per_col + v;
      const int64_t dst = (n / CI) * (CI * K / Ew) + CI * (v - v % VT) + VT * (n % CI) + v % VT;
      if (forward)
        std::memcpy(out + dst * 4, in + src * 4, 4);
      else
        std::memcpy(out + src * 4, in + dst * 4, 4);
    }
}
}  // namespace

void interleave_columns(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits) {
  move_words_interleaved(in, out, N, K, bits, true, "interleave_columns");
}
void deinterleave_columns(const uint8_t* in, uint8_t* out, int64_t N, int64_t K, int bits) {
  move_words_interleaved(in, out, N, K, bits, false, "deinterleave_columns");
}

namespace {
// Reorders the codes of each 32-bit word (bytes read in little-endian order, as ORT's x86 and GPU
// code see them): forward, slot s takes element order[s]; backward, element order[s] comes back from s.
void reorder_words(uint8_t* data, int64_t nbytes, int bits, bool forward) {
  const int* order = order_table(bits);
  const int ew = 32 / bits;
  for (int64_t w = 0; w + 4 <= nbytes; w += 4) {
    uint8_t src[4], dst[4] = {0, 0, 0, 0};
    std::memcpy(src, data + w, 4);
    for (int s = 0; s < ew; ++s) {
      const int from = forward ? order[s] : s;
      const int to = forward ? s : order[s];
      set_code(dst, to, bits, get_code(src, from, bits));
    }
    std::memcpy(data + w, dst, 4);
  }
}
}  // namespace

void add_bias_and_reorder(uint8_t* data, int64_t nbytes, int bits) {
  ort_cuda_geometry(bits);
  if (nbytes % 4 != 0)
    throw Error("ort_cuda_steps::add_bias_and_reorder: " + std::to_string(nbytes) +
                " bytes is not a whole number of 32-bit words");
  flip_bias(data, nbytes, bits);  // + 2^(bits-1): back to unsigned codes
  reorder_words(data, nbytes, bits, true);
}

void unreorder_and_sub_bias(uint8_t* data, int64_t nbytes, int bits) {
  ort_cuda_geometry(bits);
  if (nbytes % 4 != 0)
    throw Error("ort_cuda_steps::unreorder_and_sub_bias: " + std::to_string(nbytes) +
                " bytes is not a whole number of 32-bit words");
  reorder_words(data, nbytes, bits, false);
  flip_bias(data, nbytes, bits);
}

}  // namespace ort_cuda_steps

namespace {

// Checks a [E, d1, d2] uint8 tensor; returns E.
int64_t check_tensor(const std::string& who, const Tensor& t, int64_t d1, int64_t d2, const char* what) {
  if (t.empty()) throw Error(who + ": " + what + " tensor is missing");
  if (t.dtype() != DType::u8)
    throw Error(who + ": " + what + " weights must be uint8, got " + std::string(dtype_name(t.dtype())));
  if (t.rank() != 3 || t.dim(1) != d1 || t.dim(2) != d2)
    throw Error(who + ": expected " + what + " shape [E, " + std::to_string(d1) + ", " + std::to_string(d2) +
                "], got " + shape_str(t.shape()));
  return t.dim(0);
}

}  // namespace

Tensor raw_to_ort_cuda(const Tensor& raw, int64_t N, int64_t K, int bits) {
  check_ort_cuda_shape(N, K, bits);
  const int pack = 8 / bits;
  const int64_t E = check_tensor("raw_to_ort_cuda", raw, N, K / pack, "raw");
  Tensor out(DType::u8, {E, K, N / pack});
  const int64_t nbytes = N * K / pack;
  // Two scratch buffers of one expert: the transient extra stays one expert's worth.
  std::vector<uint8_t> a(static_cast<size_t>(nbytes)), b(static_cast<size_t>(nbytes));
  for (int64_t e = 0; e < E; ++e) {
    const uint8_t* src = raw.data_as<uint8_t>() + e * nbytes;
    uint8_t* dst = out.data_as<uint8_t>() + e * nbytes;
    ort_cuda_steps::transpose_to_signed_kn(src, a.data(), N, K, bits);  // 1
    ort_cuda_steps::permute_k_rows(a.data(), b.data(), N, K, bits);     // 2
    ort_cuda_steps::transpose_to_column_major(b.data(), a.data(), N, K, bits);  // 3
    ort_cuda_steps::interleave_columns(a.data(), dst, N, K, bits);      // 4
    ort_cuda_steps::add_bias_and_reorder(dst, nbytes, bits);            // 5
  }
  return out;
}

Tensor ort_cuda_to_raw(const Tensor& packed, int64_t N, int64_t K, int bits) {
  check_ort_cuda_shape(N, K, bits);
  const OrtCudaGeometry g = ort_cuda_geometry(bits);
  const int pack = 8 / bits;
  const int64_t E = check_tensor("ort_cuda_to_raw", packed, K, N / pack, "ORT CUDA");
  Tensor out(DType::u8, {E, N, K / pack});
  const int64_t nbytes = N * K / pack;

  // Line (group of CI columns, 64-row K tile) holds every code of those columns in that tile, and the
  // placement inside a line is the same for every line: line (cg, t) is line (0, 0) shifted by
  // 128 * (cg * K/64 + t) bytes and by (CI*cg, 64*t) in (n, k). Inside a line, column c owns the
  // contiguous block of VT words starting at word VT*c, with the same placement for every c. So one
  // 64-entry table, "slot of k inside a column block", drives the whole import.
  const int CI = g.interleave, TK = OrtCudaGeometry::kTileK;
  const int block_bytes = OrtCudaGeometry::kLineBytes / CI;  // 32 (4-bit) or 64 (8-bit)
  uint8_t slot_of[OrtCudaGeometry::kTileK];
  for (int k = 0; k < TK; ++k) {
    const OrtCudaPos p = ort_cuda_locate(0, k, N, K, bits);
    slot_of[k] = uint8_t((p.byte * 8 + p.shift) / bits);  // < 64: column 0's block of line (0, 0)
  }
  const int64_t tiles = K / TK, groups = N / CI;
  const int64_t raw_row = K / pack;      // bytes per raw row
  const int64_t tile_bytes = TK / pack;  // bytes of one raw row inside one tile
  for (int64_t e = 0; e < E; ++e) {
    const uint8_t* src = packed.data_as<uint8_t>() + e * nbytes;
    uint8_t* dst = out.data_as<uint8_t>() + e * nbytes;
    for (int64_t cg = 0; cg < groups; ++cg)
      for (int64_t t = 0; t < tiles; ++t) {
        const uint8_t* line = src + (cg * tiles + t) * OrtCudaGeometry::kLineBytes;
        for (int c = 0; c < CI; ++c) {
          const uint8_t* block = line + c * block_bytes;
          uint8_t* row = dst + (cg * CI + c) * raw_row + t * tile_bytes;
          if (bits == 8) {
            for (int k = 0; k < TK; ++k) row[k] = block[slot_of[k]];
          } else {
            // Spread the block's 64 nibbles to bytes (slot order = nibble order in memory), then
            // gather them in k order and repack two per byte.
            uint8_t nib[64];
            for (int i = 0; i < 32; ++i) {
              nib[2 * i] = block[i] & 0xF;
              nib[2 * i + 1] = block[i] >> 4;
            }
            for (int j = 0; j < 32; ++j) row[j] = uint8_t(nib[slot_of[2 * j]] | (nib[slot_of[2 * j + 1]] << 4));
          }
        }
      }
  }
  return out;
}

std::string ort_cuda_dump_layout(int bits, int64_t N, int64_t K, int64_t max_words) {
  check_ort_cuda_shape(N, K, bits);
  const OrtCudaGeometry g = ort_cuda_geometry(bits);
  const int64_t words = N * K * bits / 32;
  if (max_words > words) max_words = words;
  // Invert the map once: which (n, k) sits in each slot of the first max_words words.
  const int ew = g.codes_per_word;
  std::vector<std::pair<int64_t, int64_t>> slot(size_t(max_words * ew), {-1, -1});
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const OrtCudaPos p = ort_cuda_locate(n, k, N, K, bits);
      const int64_t s = (p.byte * 8 + p.shift) / bits;
      if (s < max_words * ew) slot[size_t(s)] = {n, k};
    }
  StrBuilder os;
  os << "ORT CUDA SM80 layout, int" << bits << ", N=" << N << " K=" << K << " (one expert; slot 0 = lowest "
     << bits << " bits of the little-endian 32-bit word)\n";
  os << " word  bytes    ";
  for (int s = 0; s < ew; ++s) os << " slot" << s << (bits == 4 ? "  " : "   ");
  os << "\n";
  for (int64_t w = 0; w < max_words; ++w) {
    char head[80];
    std::snprintf(head, sizeof head, "%5lld  %4lld-%-4lld", (long long)w, (long long)(w * 4), (long long)(w * 4 + 3));
    os << head;
    for (int s = 0; s < ew; ++s) {
      const auto [n, k] = slot[size_t(w * ew + s)];
      char cell[64];
      std::snprintf(cell, sizeof cell, " n%lld,k%-4lld", (long long)n, (long long)k);
      os << cell;
    }
    os << "\n";
  }
  return os.str();
}

}  // namespace qmoe
