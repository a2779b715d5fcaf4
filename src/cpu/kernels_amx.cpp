// AMX pair kernels for the "int8" and "int8x3" compute modes (CpuBackendOptions::compute): the integer
// group sums of kernels_avx512_vnni.cpp computed by tile multiplies. Built with -mamx-tile -mamx-int8 and
// -mavx512vbmi on top of the AVX-512 VNNI flags; the backend selects them only where amx_available() (cpu_kernels.h)
// says the CPU has AMX-TILE, AMX-INT8, AVX512_VNNI and AVX512_VBMI and the OS gave this process the tile
// state. Same packed format, same PairJob, same activation rows (int8_rows.h).
//
// Why: vpdpbusd does 64 multiply-adds per instruction; one tile multiply (tdpbssd) does tokens x 16 x 64.
// At prefill an expert's 16 tokens share every weight, so the VNNI kernel spends most of its
// instructions on vpdpbusd (docs/PERF.md: mixtral int4 block 32 at T = 64 needs 350 million of them).
//
// The same integers, so the same results, bit for bit, as the VNNI kernels (tested). Per tile of 16
// rows, integer group g (int8_rows.h) and token t:
//   B = the group's weight codes minus the default zero point zd = 2^(bits-1), as signed bytes (int4:
//       q - 8 in [-8, 7]; int8: q - 128 in [-128, 127]), in the VNNI operand layout (load_transposed:
//       dword l = row l's 4 columns); A = the tokens' int8 codes of the group's columns (one tile row
//       per token); C = A x B by tdpbssd (signed x signed), 64 columns per multiply, so
//   C[t][l] = sum (q - zd) * xq                          exactly, in int32 (|C| < 2^24, int8_rows.h)
//   isum    = C[t][l] + (z - zd) * nsum_g                (zero points only; nsum_g = -(sum of xq))
//           = sum (q - z) * xq                           the VNNI kernel's isum_g
//   acc     = fma(scale_b, float(isum), acc)             groups in increasing column order
//   y       = acc * sx
// Tiles are computed one after the other so that the MT fp32 sums live in registers across the row.
//
// Token rows: a tile multiply loads its A rows at a fixed stride. The backend hands the int8 mode's rows
// of one expert as consecutive rows of one array (cpu_backend.cpp), and the kernel then loads them in
// place; other callers' rows are copied, 64 columns at a time, into a contiguous block first.
//
// Below kAmxMinTokens tokens a call goes to the VNNI kernel: a tile multiply costs the same for one row
// as for 16, while vpdpbusd costs per token.
//
// The "int8x3" mode (D = kInt8Digits) runs the same loop on rows of three int8 digits (int8_rows.h): each B
// is multiplied with each digit's A tile into that digit's C, and the fold combines the digits' exact
// sums, i0 + i1 / 254 + i2 / 254^2 (digits_group_sum), before the scale's fma: fp32-level accuracy for
// three tile multiplies per weight tile instead of fp32 FMAs per token. Its calls of 1 or 2 tokens go to
// the VNNI kernel's digit form, which computes the same integers and folds them the same way (tested
// bitwise), as the int8 mode's small calls do. 4-bit weights in blocks of 16 and 32 take the digit pairs
// instead (pair_amx_pairs below).
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

inline constexpr int kAmxTokens = 16;  // rows of an A tile: tokens per tile multiply (32 per call: amx_pair)
static_assert(2 * kAmxTokens <= kMaxTokens, "PairJob carries kMaxTokens rows");
// Calls of fewer tokens go to the VNNI kernel. 2-vCPU Xeon (AMX), mixtral, int8 mode, 2 threads: with
// the tile multiplies from 4 tokens, T = 16 (4 per expert) 15-20% and T = 32 3-10% slower than VNNI
// alone; from 8, 10, 12 or 14 (two alternating runs each, T = 48 and 64) within the runs' 5% spread of
// each other and all faster than VNNI alone (docs/PERF.md, "AMX tile multiplies").
inline constexpr int kAmxMinTokens = 10;
// Calls of 17..kAmxTwoTiles tokens run as one call on two A tiles (each B loaded once for both); more go
// as 16 + the rest.
inline constexpr int kAmxTwoTiles = 24;

// The tile configuration (palette 1): bytes per row and rows of tiles 0..15, as ldtilecfg reads it.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
// Tile registers: A 0 (the first 16 tokens) and 1 (the rest, calls of 17..kAmxTwoTiles tokens), B 2, C 3
// and 4 (the same split); the row's last multiply, when shorter, A 5 and 6, B 7. (Alternating two
// register sets between multiplies and groups, so that a group's C could be stored after the next
// group's first multiply, measured no faster on the 2-vCPU Xeon of docs/PERF.md; the build-ahead and
// fold lag below did.)
//
// One multiply's tile instructions with B in register B_ and A (its first 16 rows) in A_, the rest of A
// (TWO) in AHI_; the digits' with digit d's A loaded into A_ in turn. Macros: the register numbers must
// be literals in GCC's tile intrinsics, and the row's last multiply takes other registers (its shape).
#define QMOE_AMX_MULTIPLY(A_, AHI_, B_)      \
  _tile_loadd(B_, b, 64);                    \
  _tile_loadd(A_, a, a_stride);              \
  _tile_dpbssd(3, A_, B_);                   \
  if constexpr (TWO) {                       \
    _tile_loadd(AHI_, a_hi, a_stride);       \
    _tile_dpbssd(4, AHI_, B_);               \
  }
#define QMOE_AMX_MULTIPLY_DIGITS(A_, B_)            \
  _tile_loadd(B_, b, 64);                           \
  _tile_loadd(A_, a, a_stride);                     \
  _tile_dpbssd(3, A_, B_);                          \
  _tile_loadd(A_, a + d_stride, a_stride);          \
  _tile_dpbssd(4, A_, B_);                          \
  _tile_loadd(A_, a + 2 * d_stride, a_stride);      \
  _tile_dpbssd(1, A_, B_)
template <bool TWO>
inline void tile_multiply(bool last, const int8_t* a, int64_t a_stride, const void* b) {
  const int8_t* a_hi = a + kAmxTokens * a_stride;
  if (last) {
    QMOE_AMX_MULTIPLY(5, 6, 7);
  } else {
    QMOE_AMX_MULTIPLY(0, 1, 2);
  }
}
// The int8x3 mode (D digits, one A tile of up to 16 tokens): digit d's A rows at a + d * d_stride, its C
// in tile 3, 4, 1 (d = 0, 1, 2); A 0, B 2, and for the row's last multiply, when shorter, A 5, B 7. (A
// second A register, so that a load need not wait for the multiply reading the first, measured the
// same: a loop of loads and multiplies takes ~8.3 ns per A tile either way on the Xeon of docs/PERF.md.)
template <int D>
inline void tile_multiply_digits(bool last, const int8_t* a, int64_t a_stride, int64_t d_stride, const void* b) {
  static_assert(D == 3, "tile registers for three digits");
  if (last) {
    QMOE_AMX_MULTIPLY_DIGITS(5, 7);
  } else {
    QMOE_AMX_MULTIPLY_DIGITS(0, 2);
  }
}
#undef QMOE_AMX_MULTIPLY
#undef QMOE_AMX_MULTIPLY_DIGITS

// C tiles: 3 (and 4 with two A tiles, or per digit 3, 4, 1); c[i] is C tile i's first row.
template <int NC>
inline void tile_zero_c() {
  _tile_zero(3);
  if constexpr (NC > 1) _tile_zero(4);
  if constexpr (NC > 2) _tile_zero(1);
}
template <int NC>
inline void tile_store_c(int32_t (*c)[16], int64_t c_stride) {
  _tile_stored(3, c[0], 64);
  if constexpr (NC > 1) _tile_stored(4, c[c_stride], 64);
  if constexpr (NC > 2) _tile_stored(1, c[2 * c_stride], 64);
}

// The tokens' int8 rows as one strided block: in place when the rows are evenly spaced, else copied.
// D digit planes (int8x3 mode): each plane's rows at the same stride, plane d at d * digit_stride.
template <int MT, int D>
struct ARows {
  const int8_t* base;
  int64_t stride, digit_stride;
  bool copy;
  int64_t row_plane_stride;  // the rows' own (digit_stride is the copy's where copied)
  alignas(64) int8_t buf[D][MT][64];

  // plane_stride: bytes from one digit plane of a row to the next (int8_rows.h).
  ARows(const PairJob& jb, int64_t plane_stride)
      : base(jb.xq[0]), stride(MT > 1 ? jb.xq[1] - jb.xq[0] : 64), digit_stride(plane_stride), copy(stride <= 0),
        row_plane_stride(plane_stride) {
    for (int t = 1; t < MT; ++t) copy = copy || jb.xq[t] != base + t * stride;
    if (copy) base = buf[0][0], stride = 64, digit_stride = MT * 64;
  }
  // The block's start for columns (slots) [slot, slot + width), width <= 64.
  const int8_t* at(const PairJob& jb, int64_t slot, int width) {
    if (!copy) return base + slot;
    const __mmask64 m = width >= 64 ? ~__mmask64(0) : (__mmask64(1) << width) - 1;
    for (int d = 0; d < D; ++d)
      for (int t = 0; t < MT; ++t)
        _mm512_store_si512(buf[d][t], _mm512_maskz_loadu_epi8(m, jb.xq[t] + d * row_plane_stride + slot));
    return buf[0][0];
  }
};

// Multiplies ahead whose B rows are built (vector stores) before the multiply loads them, and groups a
// fold lags behind its C's store: a tile load does not take data from vector stores still in flight,
// nor a vector load from a tile store, so each waits until the stores reach the cache. Building each
// multiply's B right before it and folding each group right after its store left the kernel waiting
// there (perf: a third of its samples on the fold's first load); with the lags, mixtral int4 block 32
// T = 64, 2 threads: 86-87 -> 65 ms (VNNI 67).
inline constexpr int kBuildAhead = 2, kFoldLag = 2;

// D = 1: the int8 mode (one or two A tiles); D = kInt8Digits: the int8x3 mode (one A tile, loaded per digit).
template <int BITS, int MT, bool ZP, int D = 1>
void pair_amx(const PairJob& jb) {
  constexpr int kPack = 8 / BITS;
  const int64_t gcols = std::min<int64_t>(jb.block_bytes * kPack, kInt8GroupCols), gbytes = gcols / kPack;
  // A multiply takes S columns (sbytes code bytes): 64, or the whole group where groups are smaller
  // (blocks of 16 and 32). Groups are powers of two >= 16, so only the row's last multiply can be
  // shorter: it takes whole 4-byte steps of codes (the last step may hold 2 bytes, the rest read as 0).
  // Row-wise groups of a short row (gcols = K rounded to the codes, under 64) keep S = 64 unless they
  // are a block's size (16 or 32): their one multiply is the row's last. (S = gcols under 16 would give
  // B tiles of no rows at 2 int8 columns, an invalid tile configuration, and 4-bit multiplies of half a
  // 4-byte step.)
  const int S = gcols == 16 || gcols == 32 ? int(gcols) : 64, sbytes = S / kPack;
  const int64_t multiplies = (jb.jbytes + sbytes - 1) / sbytes;
  const int64_t tail_bytes = jb.jbytes % sbytes;
  const int tail_rows = int((tail_bytes + 3) / 4) * kPack;  // B rows of the last multiply (0: none)
  constexpr bool kTwo = MT > kAmxTokens;  // two A tiles (tile_multiply)
  static_assert(D == 1 || !kTwo, "digits take one A tile");
  constexpr int kLo = kTwo ? kAmxTokens : MT, kHi = MT - kLo;
  constexpr int kC = D > 1 ? D : kTwo ? 2 : 1;  // C tiles
  TileConfig cfg;
  if constexpr (D == 1) {
    cfg.rows[0] = cfg.rows[3] = cfg.rows[5] = kLo, cfg.rows[1] = cfg.rows[4] = cfg.rows[6] = kHi;  // A, C, last A
    cfg.colsb[0] = cfg.colsb[1] = uint16_t(S), cfg.colsb[3] = cfg.colsb[4] = 64;
  } else {
    cfg.rows[0] = cfg.rows[5] = MT, cfg.colsb[0] = uint16_t(S);  // A, last A
    cfg.rows[3] = cfg.rows[4] = cfg.rows[1] = MT, cfg.colsb[3] = cfg.colsb[4] = cfg.colsb[1] = 64;  // C
  }
  cfg.rows[2] = uint8_t(S / 4), cfg.colsb[2] = 64;  // B
  if (tail_rows) {
    cfg.colsb[5] = uint16_t(4 * tail_rows);
    if constexpr (D == 1) cfg.colsb[6] = uint16_t(4 * tail_rows);
    cfg.rows[7] = uint8_t(tail_rows), cfg.colsb[7] = 64;
  } else {
    cfg.rows[5] = 0;
    if constexpr (D == 1) cfg.rows[6] = 0;
  }
  if constexpr (D == 1 && !kTwo) cfg.colsb[1] = cfg.colsb[4] = cfg.colsb[6] = 0;  // unused tiles: 0 rows and 0 bytes
  _tile_loadconfig(&cfg);

  const __m512i low4 = _mm512_set1_epi8(0x0f), zd8 = _mm512_set1_epi8(int8_t(1 << (BITS - 1)));
  alignas(64) int8_t b[kBuildAhead + 1][16][64];  // B rings: 16 rows of 4 code bytes x 16 weight rows
  alignas(64) int32_t c[kFoldLag + 1][kC * kLo][16];  // C ring, read back by the folds (C tile i at row i * kLo)
  ARows<MT, D> a(jb, jb.xq_digit_stride);
  for (int tile = 0; tile < 2; ++tile) {
    const uint8_t* codes = jb.codes[tile];
    const bool zp = ZP && jb.zero_points[tile];
    // Multiply m's B rows (code bytes [m sbytes, (m + 1) sbytes) of the tile's 16 rows) into its ring slot.
    auto build = [&](int64_t m) __attribute__((always_inline)) {
      int8_t(*bm)[64] = b[m % (kBuildAhead + 1)];
      const int64_t js = m * sbytes, je = std::min<int64_t>(js + sbytes, jb.jbytes);
      int r = 0;
      for (int64_t j = js; j < je; j += 4) {
        _mm_prefetch(reinterpret_cast<const char*>(codes + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
        const __m512i v = load_transposed<true>(codes + j * kTileRows, j + 4 <= je);
        if constexpr (BITS == 4) {
          _mm512_store_si512(bm[r++], _mm512_sub_epi8(_mm512_and_si512(v, low4), zd8));
          _mm512_store_si512(bm[r++], _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), zd8));
        } else {
          _mm512_store_si512(bm[r++], _mm512_xor_si512(v, zd8));  // q - 128 as a signed byte
        }
      }
    };
    __m512 acc[MT];
    for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
    // Group g's C into the fp32 sums: its block's scales (and zero points), then one fma per token.
    auto fold = [&](int64_t g) __attribute__((always_inline)) {
      const int64_t blk = g * gbytes / jb.block_bytes;
      prefetch_tile_scales(jb, tile, blk);
      const __m512 s = load_scales16(jb.scale_dtype, jb.scales[tile], blk * kTileRows);
      // z - zd per row in the low 16-bit word of each dword (vpdpwssd's operand; the high word 0).
      const __m512i dz = zp ? _mm512_and_si512(_mm512_sub_epi32(load_codes16(jb.zero_points[tile] + blk * kTileRows),
                                                                _mm512_set1_epi32(1 << (BITS - 1))),
                                               _mm512_set1_epi32(0xffff))
                            : _mm512_setzero_si512();
      const int32_t(*cg)[16] = c[g % (kFoldLag + 1)];
      // Token t's sums: row t of the C ring (two A tiles: tile 4 stored from row 16 on; digit d at row d * kLo + t).
      for (int t = 0; t < MT; ++t) {
        if constexpr (D == 1) {
          __m512i isum = _mm512_load_si512(cg[t]);
          if (zp) isum = _mm512_dpwssd_epi32(isum, dz, _mm512_set1_epi32(jb.xneg_sum[t][g]));
          acc[t] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(isum), acc[t]);
        } else {
          __m512i i[D];
          for (int d = 0; d < D; ++d) {
            i[d] = _mm512_load_si512(cg[d * kLo + t]);
            if (zp) i[d] = _mm512_dpwssd_epi32(i[d], dz, _mm512_set1_epi32(jb.xneg_sum[t][d * jb.xneg_digit_stride + g]));
          }
          const __m512 sum = digits_group_sum(i[0], i[1], i[2]);
          acc[t] = _mm512_fmadd_ps(s, sum, acc[t]);
        }
      }
    };
    for (int64_t m = 0; m < std::min<int64_t>(kBuildAhead, multiplies); ++m) build(m);
    int64_t g = 0;
    for (int64_t m = 0; m < multiplies; ++m) {
      if (m + kBuildAhead < multiplies) build(m + kBuildAhead);
      const int64_t js = m * sbytes;
      g = js / gbytes;
      if (js % gbytes == 0) tile_zero_c<kC>();
      const bool short_last = m == multiplies - 1 && tail_rows;
      const int8_t* am = a.at(jb, js * kPack, short_last ? 4 * tail_rows : S);
      if constexpr (D == 1) tile_multiply<kTwo>(short_last, am, a.stride, b[m % (kBuildAhead + 1)]);
      else tile_multiply_digits<D>(short_last, am, a.stride, a.digit_stride, b[m % (kBuildAhead + 1)]);
      if ((js + sbytes) % gbytes == 0 || m == multiplies - 1) {  // the group's last multiply
        tile_store_c<kC>(c[g % (kFoldLag + 1)], kLo);
        if (g >= kFoldLag) fold(g - kFoldLag);
      }
    }
    for (int64_t f = std::max<int64_t>(0, g + 1 - kFoldLag); f <= g; ++f) fold(f);
    for (int t = 0; t < MT; ++t)
      _mm512_storeu_ps(jb.acc + t * kPairRows + tile * kTileRows, _mm512_mul_ps(acc[t], _mm512_set1_ps(jb.xscale[t])));
  }
}

// The int8x3 mode's digit pairs (int8_rows.h, kInt8PairDigits: 4-bit weights in blocks of G = 16 or 32
// columns): per group one B tile for 2G columns of K, 16 (q - 8) against the a-codes, then q - 8 against
// the b-codes, and two multiplies of 2G columns, the h-plane's A into C 3 and the l-plane's into C 4:
//   C3[t][l] = sum (q - 8) * h,   C4[t][l] = sum (q - 8) * l        exactly (|C| <= 32 * 8 * 2048)
//   e        = C + (z - 8) * nsum(h or l)                              (zero points only)
//   acc      = fma(scale_b, pair_digits_group_sum(eh, el), acc)
// Every group is one multiply pair of full tiles: columns past K have a-, b-codes 0 (whatever B's rows
// there hold), and a row's group of 2G codes never passes its plane (W is a multiple of 64). A 0, B 2,
// C 3 and 4.
template <int MT, bool ZP>
void pair_amx_pairs(const PairJob& jb) {
  const int64_t G = jb.block_bytes * 2, gbytes = jb.block_bytes, groups = (jb.jbytes + gbytes - 1) / gbytes;
  const int brows = int(G / 2);  // B rows: 2G columns of K, 4 a row
  TileConfig cfg;
  cfg.rows[0] = MT, cfg.colsb[0] = uint16_t(2 * G);
  cfg.rows[2] = uint8_t(brows), cfg.colsb[2] = 64;
  cfg.rows[3] = cfg.rows[4] = MT, cfg.colsb[3] = cfg.colsb[4] = 64;
  _tile_loadconfig(&cfg);

  const __m512i low4 = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8), sign = _mm512_set1_epi8(int8_t(0x80));
  // B ring, zeroed once so that no tile load reads unset bytes: the rows past a short group's codes keep an
  // earlier group's, and meet a- and b-codes 0 (columns past K).
  alignas(64) int8_t b[kBuildAhead + 1][16][64] = {};
  alignas(64) int32_t c[kFoldLag + 1][2 * MT][16];      // C ring: C 3 at rows 0.., C 4 at rows MT..
  ARows<MT, 2> a(jb, 2 * jb.xq_digit_stride);
  for (int tile = 0; tile < 2; ++tile) {
    const uint8_t* codes = jb.codes[tile];
    const bool zp = ZP && jb.zero_points[tile];
    // Group m's B: per 4 code bytes (8 columns: low nibbles the even, high the odd, as the rows' slots),
    // 16 (q - 8) = (q << 4) ^ 0x80 in the a half (rows 0..), q - 8 in the b half (rows brows / 2..).
    auto build = [&](int64_t m) __attribute__((always_inline)) {
      int8_t(*bm)[64] = b[m % (kBuildAhead + 1)];
      const int64_t js = m * gbytes, je = std::min<int64_t>(js + gbytes, jb.jbytes);
      for (int64_t j = js, r = 0; j < je; j += 4, r += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(codes + j * kTileRows + kPrefetchAhead), _MM_HINT_T0);
        const __m512i v = load_transposed<true>(codes + j * kTileRows, j + 4 <= je);
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        _mm512_store_si512(bm[r], _mm512_xor_si512(_mm512_slli_epi16(lo, 4), sign));
        _mm512_store_si512(bm[r + 1], _mm512_xor_si512(_mm512_slli_epi16(hi, 4), sign));
        _mm512_store_si512(bm[brows / 2 + r], _mm512_sub_epi8(lo, eight));
        _mm512_store_si512(bm[brows / 2 + r + 1], _mm512_sub_epi8(hi, eight));
      }
    };
    __m512 acc[MT];
    for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
    auto fold = [&](int64_t g) __attribute__((always_inline)) {
      prefetch_tile_scales(jb, tile, g);
      const __m512 s = load_scales16(jb.scale_dtype, jb.scales[tile], g * kTileRows);
      const __m512i dz = zp ? _mm512_sub_epi32(load_codes16(jb.zero_points[tile] + g * kTileRows), _mm512_set1_epi32(8))
                            : _mm512_setzero_si512();
      const int32_t(*cg)[16] = c[g % (kFoldLag + 1)];
      for (int t = 0; t < MT; ++t) {
        __m512i eh = _mm512_load_si512(cg[t]), el = _mm512_load_si512(cg[MT + t]);
        if (zp) {  // nsum of h = 16 nsum(a) + nsum(b): |.| <= 32 * 2048, beyond vpdpwssd's int16
          const int32_t* ns = jb.xneg_sum[t] + g;
          const int64_t st = jb.xneg_digit_stride;
          eh = _mm512_add_epi32(eh, _mm512_mullo_epi32(dz, _mm512_set1_epi32(16 * ns[0] + ns[st])));
          el = _mm512_add_epi32(el, _mm512_mullo_epi32(dz, _mm512_set1_epi32(16 * ns[2 * st] + ns[3 * st])));
        }
        acc[t] = _mm512_fmadd_ps(s, pair_digits_group_sum(eh, el), acc[t]);
      }
    };
    for (int64_t m = 0; m < std::min<int64_t>(kBuildAhead, groups); ++m) build(m);
    for (int64_t m = 0; m < groups; ++m) {
      if (m + kBuildAhead < groups) build(m + kBuildAhead);
      const int8_t* am = a.at(jb, m * 2 * G, int(2 * G));
      _tile_zero(3);
      _tile_zero(4);
      _tile_loadd(2, b[m % (kBuildAhead + 1)], 64);
      _tile_loadd(0, am, a.stride);
      _tile_dpbssd(3, 0, 2);
      _tile_loadd(0, am + a.digit_stride, a.stride);
      _tile_dpbssd(4, 0, 2);
      _tile_stored(3, c[m % (kFoldLag + 1)][0], 64);
      _tile_stored(4, c[m % (kFoldLag + 1)][MT], 64);
      if (m >= kFoldLag) fold(m - kFoldLag);
    }
    for (int64_t f = std::max<int64_t>(0, groups - kFoldLag); f < groups; ++f) fold(f);
    for (int t = 0; t < MT; ++t)
      _mm512_storeu_ps(jb.acc + t * kPairRows + tile * kTileRows, _mm512_mul_ps(acc[t], _mm512_set1_ps(jb.xscale[t])));
  }
}

// Runs tokens [t0, t0 + n) of jb through `kernel`.
inline void run_part(const PairJob& jb, int t0, int n, PairKernel kernel) {
  PairJob part = jb;
  part.tokens = n;
  for (int i = 0; i < n; ++i)
    part.x[i] = jb.x[t0 + i], part.xb[i] = jb.xb[t0 + i], part.xq[i] = jb.xq[t0 + i],
    part.xneg_sum[i] = jb.xneg_sum[t0 + i], part.xscale[i] = jb.xscale[t0 + i];
  part.acc = jb.acc + t0 * kPairRows;
  kernel(part);
}

// MIN: calls of fewer tokens go to `small` (the VNNI kernel); 1 takes every call.
template <int BITS, int MIN>
void amx_pair16(const PairJob& jb) {
  if (jb.tokens < MIN) {  // in calls the VNNI kernel takes, sizes as equal as possible (9: 5 + 4)
    const KernelSet& small = avx512_vnni_kernels(true);
    const PairKernel vnni = BITS == 4 ? small.w4 : small.w8;
    const int most = small.tokens_per_call(BITS), calls = (jb.tokens + most - 1) / most;
    if (calls == 1) return vnni(jb);  // decode: no copy of the job
    for (int call = 0, t0 = 0, n; call < calls; ++call, t0 += n) {
      n = jb.tokens / calls + (call < jb.tokens % calls);
      run_part(jb, t0, n, vnni);
    }
    return;
  }
  dispatch_pair<kAmxTokens>(jb, portable_kernels().w4, "avx512-amx",
                            [&]<int MT, bool ZP>() { pair_amx<BITS, MT, ZP>(jb); });
}

// Up to 2 x kAmxTokens tokens: 17..kAmxTwoTiles as one call on two A tiles, more as a full tile's 16 and
// then the rest (tile multiplies from MIN, else VNNI).
// Why the set takes 32 per call: at T = 64 an expert's 17..32 tokens were split by the backend into two
// equal calls (17: 9 + 8), both below kAmxMinTokens and so both on VNNI. 16 + rest against equal halves
// and against calls of at most 16, two alternating runs each (2-vCPU Xeon, mixtral, 2 threads, T = 64, ms):
// int4 b32 58.4 / 57.0 against 63.0 / 63.3 and 62.1 / 63.0; int4 b128 46.2 / 47.1 against 50.5 / 50.2
// and 49.2 / 49.6; int8 72.0 / 72.2 against 73.7 / 76.8 and 73.8 / 74.5. Then 17..24 tokens on two A tiles
// instead of 16 + a VNNI call for the rest, three alternating runs: int4 b32 63.5 / 62.5 / 60.1 -> 60.8 /
// 60.5 / 58.2, int4 b128 50.5 / 49.0 / 48.6 -> 46.2 / 45.1 / 44.6, int8 75.1 / 74.5 / 73.6 -> 68.0 / 72.3 /
// 66.0 (T = 48 1-3% faster).
template <int BITS, int MIN>
void amx_pair(const PairJob& jb) {
  if (jb.tokens <= kAmxTokens) return amx_pair16<BITS, MIN>(jb);
  if (jb.tokens <= kAmxTwoTiles)
    return dispatch_pair<kAmxTwoTiles, kAmxTokens + 1>(jb, portable_kernels().w4, "avx512-amx",
                                                      [&]<int MT, bool ZP>() { pair_amx<BITS, MT, ZP>(jb); });
  run_part(jb, 0, kAmxTokens, amx_pair16<BITS, MIN>);
  run_part(jb, kAmxTokens, jb.tokens - kAmxTokens, amx_pair16<BITS, MIN>);
}

// The int8x3 mode: 16 tokens per tile multiply, more as 16 + the rest; with VNNI_SMALL, calls of at most
// kVnniDigitTokens tokens by vpdpbusd (avx512_vnni_digits: the same bits). Why only those: 2-vCPU Xeon,
// 2 threads, int8x3, ms, tile multiplies for every call -> 1 and 2 tokens on vpdpbusd: mixtral int4 b128 T = 1
// 8.8-8.9 -> 6.4-6.5, T = 8 33.5-33.7 -> 28.4-28.5; qwen3 T = 8 6.8-6.9 -> 5.6-5.7; but qwen3 T = 64 (about 4
// tokens an expert) as 2-token vpdpbusd calls 19.9-20.7 -> 23.9-24.0 (docs/PERF.md, "The int8x3 option").
template <int BITS, bool VNNI_SMALL>
void amx_digits_pair(const PairJob& jb) {
  if (jb.tokens > kAmxTokens) {
    run_part(jb, 0, kAmxTokens, amx_digits_pair<BITS, VNNI_SMALL>);
    run_part(jb, kAmxTokens, jb.tokens - kAmxTokens, amx_digits_pair<BITS, VNNI_SMALL>);
    return;
  }
  if (VNNI_SMALL && jb.tokens <= kVnniDigitTokens) return avx512_vnni_digits(jb);
  if (jb.xq_pairs)
    return dispatch_pair<kAmxTokens>(jb, portable_kernels().w4, "avx512-amx-int8x3",
                                     [&]<int MT, bool ZP>() { pair_amx_pairs<MT, ZP>(jb); });
  dispatch_pair<kAmxTokens>(jb, portable_kernels().w4, "avx512-amx-int8x3",
                            [&]<int MT, bool ZP>() { pair_amx<BITS, MT, ZP, kInt8Digits>(jb); });
}

}  // namespace

const KernelSet& avx512_amx_digits_kernels(bool every_call) {
  const PairKernel w2 = portable_kernels().w2;
  static const KernelSet dispatching{"avx512-amx-int8x3", w2, amx_digits_pair<4, true>, amx_digits_pair<8, true>,
                                     2 * kAmxTokens, 2 * kAmxTokens, swiglu16, kAmxTokens};
  static const KernelSet always{"avx512-amx-int8x3", w2, amx_digits_pair<4, false>, amx_digits_pair<8, false>,
                                2 * kAmxTokens, 2 * kAmxTokens, swiglu16, kAmxTokens};
  return every_call ? always : dispatching;
}

const KernelSet& avx512_amx_kernels(bool every_call) {
  const PairKernel w2 = portable_kernels().w2;
  static const KernelSet dispatching{"avx512-amx", w2, amx_pair<4, kAmxMinTokens>, amx_pair<8, kAmxMinTokens>,
                                     2 * kAmxTokens, 2 * kAmxTokens, swiglu16, kAmxTokens};
  static const KernelSet always{"avx512-amx", w2, amx_pair<4, 1>, amx_pair<8, 1>, 2 * kAmxTokens, 2 * kAmxTokens, swiglu16, kAmxTokens};
  return every_call ? always : dispatching;
}

}  // namespace qmoe::cpu

