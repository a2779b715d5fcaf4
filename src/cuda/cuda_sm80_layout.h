// The "cuda-sm80" packed weight layout: the one place that says where each quantized code lives.
//
// The FC kernels (cuda_kernels.cu) run mma.sync.m16n8k16 with the WEIGHTS as the A operand (16 output
// rows x 16 k) and up to 8 tokens as the B operand. One warp owns one 16-row tile of one expert and
// streams it along K. Everything here is shaped so that this warp does exactly one 16-byte, fully
// coalesced load per lane per "span" of K (512 bytes per warp), and so that the bytes a lane loads are
// already the A fragments it feeds to mma, in the nibble order that the lop3 magic-number conversion
// produces (no shuffles, no shared memory for weights).
//
// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type": lane = 4*g + t (g = groupID
// 0..7, t = threadID_in_group 0..3) holds A rows g and g+8 at columns {2t, 2t+1, 2t+8, 2t+9}, B rows
// {2t, 2t+1, 2t+8, 2t+9} of column g, and C rows g, g+8 at columns 2t, 2t+1. A dot product does not care
// in which order its k terms come, so we RENAME the k axis inside each 16-wide k-step: mma column
// {2t, 2t+1, 2t+8, 2t+9} is real k {4t, 4t+1, 4t+2, 4t+3}. A lane then needs four CONSECUTIVE x values
// per k-step (one 8-byte load of B), and every k-step still covers 16 consecutive real k, so a scale
// block (>= 16, a power of two) never splits a k-step.
//
// Index grid (stored_bits = 4: 2-bit codes are stored as 4-bit; span = 64 k):
//   vector (e, mt, s, lane) at byte ((e*MT + mt)*S + s)*512 + lane*16; lane = 4g + t
//   byte 4j + b (j = k-step 0..3 of the span, b = 0..3) holds nibble slots 2b (low) and 2b+1 (high)
//   of word j; slot = r + 2*(q>>1) + 4*(q&1) holds W[tile row g + 8r][s*64 + 16j + 4t + q]
//   i.e. word j nibbles 0..7 = (g,q0) (g+8,q0) (g,q2) (g+8,q2) (g,q1) (g+8,q1) (g,q3) (g+8,q3)
//   so (w & 0x000f000f) gives the half2 pair (g,q0),(g,q1) = A reg a0, (w>>4) gives a1 (row g+8),
//   (w>>8) a2 (row g, q2 q3), (w>>12) a3.
// Index grid (stored_bits = 8; span = 32 k):
//   same vector addressing; word 2j + h (j = k-step 0..1, h = 0..1) holds bytes
//   W[g][k+2h], W[g][k+2h+1], W[g+8][k+2h], W[g+8][k+2h+1] with k = s*32 + 16j + 4t,
//   so prmt(w, magic, 0x4140) is a0/a2 and prmt(w, magic, 0x4342) is a1/a3.
// Tile rows map to logical rows by RowMap (below): plain (row = 16*mt + f), or for SwiGLU gate rows
// in tile rows 0..7 and the matching linear rows in 8..15 (i = 8*mt + f%8), whatever the raw fusion
// mode, so gate and linear values of one i land in the same thread's accumulators (c0/c1 and c2/c3).
// Scales: T2 as given (f32/f16/bf16), [E][MT][NBP][16 tile rows]; zero points (optional): uint8 codes,
// [E][MT][NBP][16]. Padded rows have scale 0; padded k have code 0 and meet x = 0 in the kernel.
// Why: the decode path is a pure weight stream; this puts every weight byte exactly once on a
// 16-byte coalesced load, keeps scales/zeros out of the weight stream (2/bs bytes per weight), and
// lets the dequantizer be 2 ALU ops per 2 weights.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define QMOE_HD __host__ __device__ __forceinline__
#else
#define QMOE_HD inline
#endif

namespace qmoe::cuda {

constexpr int kTileRows = 16;       // rows of the mma A tile
constexpr int kLanes = 32;          // lanes per warp
constexpr int kVecBytes = 16;       // bytes one lane loads per span
constexpr int kSpanBytes = kLanes * kVecBytes;  // 512 bytes of codes per warp per span
static_assert(kSpanBytes == 512, "span vector is one 16-byte load per lane");

// 2-bit codes are stored in 4-bit nibbles (correct, not bandwidth-optimal; see FORMAT-cuda.md).
QMOE_HD int stored_bits(int bits) { return bits == 8 ? 8 : 4; }
// k values covered by one span (one 16-byte vector per lane).
QMOE_HD int span_k(int sbits) { return sbits == 8 ? 32 : 64; }
static_assert(kTileRows * 64 * 4 / 8 == kSpanBytes && kTileRows * 32 * 8 / 8 == kSpanBytes,
              "a span holds exactly 16 rows x span_k codes");

// Which (tile row f, k within span kk) a byte / nibble of a lane's vector holds.
// `hi` selects the high nibble (4-bit only; ignored for 8-bit).
QMOE_HD void element_of(int sbits, int lane, int byte, int hi, int& f, int& kk) {
  const int g = lane >> 2, t = lane & 3;
  if (sbits == 4) {
    const int j = byte >> 2;
    const int slot = 2 * (byte & 3) + hi;
    const int r = slot & 1;
    const int q = 2 * ((slot >> 1) & 1) + (slot >> 2);
    f = g + 8 * r;
    kk = 16 * j + 4 * t + q;
  } else {
    const int w = byte >> 2, bb = byte & 3;
    const int j = w >> 1, h = w & 1;
    const int r = bb >> 1;
    const int q = 2 * h + (bb & 1);
    f = g + 8 * r;
    kk = 16 * j + 4 * t + q;
  }
}

// The k renaming above as a position map: real k offset r (0..15) inside a k-step is mma column
// mma_col_of(r). A kernel that feeds B from shared memory through a wgmma descriptor (fc_sm90.cu)
// cannot rename per lane, so its activations are stored with column mma_col_of(r) holding real k r.
QMOE_HD int mma_col_of(int r) { return ((r & 3) >> 1) * 8 + 2 * (r >> 2) + (r & 1); }

// How tile rows map to logical rows of a matrix.
enum class RowMap : int {
  plain = 0,      // logical row = 16*mt + f
  swiglu = 1,     // gate i = 8*mt + f (f < 8), linear i = 8*mt + f - 8 (f >= 8)
};

// Geometry of one packed matrix (all experts alike).
struct MatrixGeom {
  int64_t N = 0, K = 0;   // logical rows (for swiglu: I, the number of gate/linear pairs) and columns
  int64_t MT = 0;         // 16-row tiles per expert
  int64_t S = 0;          // spans per row (K padded to span_k)
  int64_t NBP = 0;        // scale blocks per row in the packed arrays
  int sbits = 4;          // stored bits (4 or 8)
  int kpb = 0;            // 16-wide k-steps per scale block (bs/16, or all k-steps row-wise)
  RowMap map = RowMap::plain;

  int64_t k_pad() const { return S * span_k(sbits); }
  int64_t weight_bytes_per_expert() const { return MT * S * kSpanBytes; }
  int64_t scale_count_per_expert() const { return MT * NBP * kTileRows; }
};

// bs = spec block size (0 = row-wise). rows_pad: rows (or pairs for swiglu) the tiles must cover.
inline MatrixGeom make_geom(int64_t N, int64_t K, int64_t rows_pad, int bits, int64_t bs, RowMap map) {
  MatrixGeom g;
  g.N = N;
  g.K = K;
  g.sbits = stored_bits(bits);
  g.map = map;
  const int sk = span_k(g.sbits);
  g.S = (K + sk - 1) / sk;
  g.MT = map == RowMap::swiglu ? rows_pad / 8 : rows_pad / 16;
  const int64_t kp = g.k_pad();
  if (bs > 0) {
    g.kpb = int(bs / 16);
    g.NBP = (kp + bs - 1) / bs;
  } else {
    g.kpb = int(kp / 16);
    g.NBP = 1;
  }
  return g;
}

}  // namespace qmoe::cuda
