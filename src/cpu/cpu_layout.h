// The CPU packed weight format "cpu-t16-w{2,4,8}" v1: what prepack() writes, what every CPU kernel
// (portable, AVX2, AVX-512) reads, and what unpack() turns back into raw bytes.
//
// Why it looks like this. Decode is a stream of weight bytes against a handful of token rows, so the
// kernel wants one load to feed many output rows: a tile of 16 output rows keeps 16 fp32 accumulators in
// one zmm (two ymm on AVX2). Raw weights are row-major ([N, K/pack] bytes), so a tile's 16 rows live
// 16 strides apart; the packed format transposes the raw *bytes* inside each tile so that byte j of the
// 16 rows is contiguous. One 16-byte load + vpmovzxbd then gives one dword per row holding `pack` codes
// (column c = j*pack + p sits at bit p*bits, exactly as in raw), and the kernel peels the codes off with
// shifts. Because the codes are not re-encoded, packing is a byte transpose (fast: > 1 GB/s) and
// unpacking is exact. The same bytes serve every ISA, so the target is "cpu" and a packed file moves
// between AVX2 and AVX-512 machines.
//
// Scales stay in the spec's scale dtype (fp16/bf16 are converted in registers, one vcvtph2ps per block
// and tile): widening them to fp32 would add 2/bs bytes per weight to a memory-bound stream (+11% at
// int4 block 32). Zero points stay integer codes and are subtracted before the fp32 FMA, so the kernel
// multiplies x by the exact integer (q - z) and applies the scale once per block. We do not fold the zero
// point into a (-scale*z)*sum(x) offset: that form subtracts two large, nearly equal sums when the
// activations have a non-zero mean (relu/silu outputs), which costs digits the reference keeps.
//
// Index grid of one packed matrix (per expert e; T = tiles, J = jbytes, B = blocks, L = 16 lanes):
//
//   codes  u8  [E][T][J][L]   codes[e][t][j][l] = raw byte (row n = t*16 + l, byte j) of the source
//                              matrix, i.e. columns c = j*pack .. j*pack+pack-1, column j*pack+p at
//                              bits [p*bits, p*bits+bits). Rows past the end and bytes j >= K/pack are 0.
//   scales T2  [E][T][B][L]   scale of (row t*16+l, block b); 0 in padded rows. Row-wise: B = 1.
//   zero   u8  [E][T][B][L]   zero point code of (row, block), unpacked from raw's packed bytes;
//                              present only when the source matrix has zero points.
//   bias   f32 [E][T*L]       bias of internal row r, converted from T (exact); present only with bias.
//
//   e.g. int4, row n = 37, column c = 11:  t = 2, l = 5, j = 5, p = 1 -> codes[e][2][5][5] bits 4..7.
//
// Internal rows. The layer packs three kinds of matrices; the kernel always works on a *pair* of tiles
// (32 rows: two zmm of accumulators, enough independent FMA chains even at one token):
//   - fc2 and non-SwiGLU fc1: one packed matrix with N rounded up to 32; pair p = tiles (2p, 2p+1).
//   - SwiGLU fc1 (all three swiglu_fusion modes): two packed matrices, "gate" and "linear", each with I
//     rounded up to 16; pair p = (gate tile p, linear tile p), so lane l of both tiles is the same
//     output i = 16p + l and the activation runs on the pair's accumulators without a shuffle. Gate row
//     i comes from fc1 row i (fusion 0, 2) or 2i (fusion 1); linear row i from fc3 row i (fusion 0),
//     fc1 row 2i+1 (fusion 1) or fc1 row I+i (fusion 2). Keeping the halves in two allocations lets
//     prepack free fc1 before packing fc3 (transient extra memory: one matrix).
//
// Padding: J = K/pack rounded up to even (the kernels take two bytes per step); activation rows handed
// to the kernels are zero beyond K, so padded codes multiply zeros. Padded rows have scale 0.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qmoe/backend.h"
#include "qmoe/raw_experts.h"
#include "qmoe/spec.h"

namespace qmoe::cpu {

inline constexpr int kTileRows = 16;           // rows per tile: fp32 lanes of one zmm
inline constexpr int kPairRows = 2 * kTileRows;  // rows the kernel computes per call
static_assert(kTileRows == 16, "the AVX-512 kernel maps one tile to one zmm of fp32 lanes");
static_assert(kPairRows % 8 == 0, "the AVX2 kernel splits a pair into ymm groups of 8 rows");

// Which internal packed matrix of a layer.
enum class Part : uint8_t { fc1 = 0, fc1_gate = 1, fc1_linear = 2, fc2 = 3 };
const char* part_name(Part p);  // "fc1", "fc1_gate", "fc1_linear", "fc2"

// Shape facts of one packed matrix, all derived from the spec (never stored separately).
struct MatGeom {
  Part part = Part::fc1;
  int64_t experts = 0;
  int64_t tiles = 0;        // per expert
  int64_t K = 0;            // logical input columns
  int64_t jbytes = 0;       // J: code bytes per row, K/pack rounded up to even
  int64_t nb = 1;           // B: scale blocks per row
  int64_t block_bytes = 0;  // code bytes of a row per block (bs/pack), = jbytes row-wise
  int bits = 4;
  DType scale_dtype = DType::f32;
  bool zero_points = false;
  bool bias = false;

  int64_t rows() const { return tiles * kTileRows; }
  int pack() const { return 8 / bits; }
  int64_t codes_per_expert() const { return tiles * jbytes * kTileRows; }
  int64_t meta_per_expert() const { return tiles * nb * kTileRows; }  // scales or zero points
  // Byte offset (within one expert's codes) of row lane l of tile t, code byte j.
  int64_t code_offset(int64_t t, int64_t l, int64_t j) const { return (t * jbytes + j) * kTileRows + l; }
  // Element offset (within one expert's scales / zero points) of (tile t, block b, lane l).
  int64_t meta_offset(int64_t t, int64_t b, int64_t l) const { return (t * nb + b) * kTileRows + l; }
};

// Where internal row r of a packed matrix comes from: a raw matrix (fc1/fc2/fc3) and its row, or
// padding (row < 0).
struct RowSource {
  Fc fc;
  int64_t row;
};
struct PartPlan {
  MatGeom geom;
  Fc source = Fc::fc1;  // the raw matrix the rows come from
  // internal row r -> source row: r * stride + offset if r < valid_rows, else padding
  int64_t valid_rows = 0, stride = 1, offset = 0;
  RowSource row_source(int64_t r) const { return {source, r < valid_rows ? r * stride + offset : -1}; }
};

// The packed matrices of a layer, in packing order: non-SwiGLU {fc1, fc2}; SwiGLU {fc1_gate,
// fc1_linear, fc2}.
struct LayerPlan {
  bool swiglu = false;
  PartPlan fc1, fc1_gate, fc1_linear, fc2;  // unused ones have tiles == 0
  int64_t fc1_pairs() const { return swiglu ? fc1_gate.geom.tiles : fc1.geom.tiles / 2; }
  int64_t fc2_pairs() const { return fc2.geom.tiles / 2; }
};
LayerPlan make_plan(const MoeSpec& spec);

// The layout tag prepack produces for a spec; the raw-path (prepack off) tag.
LayoutTag packed_tag(const MoeSpec& spec);
LayoutTag raw_path_tag();

// Destination of one packed tile (16 rows): codes [J][16], scales [B][16] (scale dtype), zero points
// [B][16] (null when none), bias [16] fp32 (null when none).
struct TileDst {
  uint8_t* codes;
  void* scales;
  uint8_t* zero_points;
  float* bias;
};
// Packs tile t of expert e of `part` from the raw matrix it names. Rows past the source are zero.
// Used both by prepack and, tile by tile into scratch, by the prepack-off path: one packer, so the two
// paths feed the kernels identical bytes.
void pack_tile(const MoeSpec& spec, const PartPlan& part, const RawMatrix& src, int64_t e, int64_t t,
               const TileDst& dst);

// A packed matrix: the four tensors of the grid above, and what the kernels want to know of its scales.
struct PackedMat {
  Tensor codes, scales, zero_points, bias;  // zero_points/bias empty when absent
  // Per expert: 1 where none of its scales is +-Inf (PairJob::scales_finite). Derived from `scales`
  // when packed or loaded, never stored in files.
  std::vector<uint8_t> finite;
  size_t nbytes() const;
};

// Packed CPU experts (layout packed_tag(spec)).
class CpuPackedExperts final : public PackedExperts {
 public:
  CpuPackedExperts(const MoeSpec& spec, LayerPlan plan);
  size_t resident_bytes() const override;
  std::vector<NamedTensor> to_blobs() const override;
  const LayerPlan& plan() const { return plan_; }
  PackedMat& mat(Part p) { return mats_[size_t(p)]; }
  const PackedMat& mat(Part p) const { return mats_[size_t(p)]; }

 private:
  LayerPlan plan_;
  PackedMat mats_[4];
};

// Prepack: packs every part with `threads` workers (0: caller only), releasing each raw matrix's
// tensors as soon as the last part reading it is packed.
std::unique_ptr<CpuPackedExperts> pack_experts(const MoeSpec& spec, RawExperts raw, class ThreadPool* pool);
// Rebuilds packed experts from blobs; checks every blob's presence, dtype and shape.
std::unique_ptr<CpuPackedExperts> packed_from_blobs(const MoeSpec& spec, const std::vector<NamedTensor>& blobs);
// The exact inverse of pack_experts (unused zero-point bits come back as 0; row-wise scales as [E, N]).
RawExperts unpack_experts(const CpuPackedExperts& packed);

// "cpu-t16-w4: fc2 row 37 col 11 -> codes[e][2][5][5] bits 4..7, scale [e][2][0][5]": for docs/tests.
std::string dump_layout(const MatGeom& g, int64_t row, int64_t col, int64_t block_size);

}  // namespace qmoe::cpu
