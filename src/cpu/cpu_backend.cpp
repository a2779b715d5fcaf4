// The CPU backend: prepack into cpu-t16 (cpu_layout.h), then per layer call, for each chunk of at most
// R token rows (cpu_backend.h: the scratch is sized for one chunk, so it does not grow with T)
//   route every token (route_token, the contract's scalar routing) -> group (token, route) pairs by
//   expert (counting sort; idle experts get no work) -> FC1 + activation -> FC2 + bias -> combine each
//   token's k routes in selection order, round to T once.
// FC1 and FC2 are each one parallel_for over (active expert x chunk of 32-row pairs), so at decode two
// threads split one expert's rows; a task takes its pairs in blocks (kPairBlock), and per block each call of
// tokens_per_call tokens goes through all the block's pairs, so at prefill the block's weights (L2
// resident) are reused across all the expert's tokens and a call's activation rows across the block. Every
// output element is computed by exactly one task in a fixed order, so results are bitwise identical
// for any thread count, and the prepack-off path (which packs each pair into scratch with the same
// pack_tile right before the same kernel) is bitwise identical to the prepacked one. Chunking changes
// only which tokens share a kernel call, and a kernel's arithmetic per token does not depend on that
// (cpu_kernels.h), so results are also bitwise identical for any chunk size.
// The bf16 compute mode (CpuBackendOptions::compute) changes two things only: each chunk's fp32 input
// rows and FC1 outputs are also rounded once to bf16 rows (what its kernels read), and the kernels are
// kernels_avx512_bf16.cpp's. The same arguments make it bitwise deterministic.
// The int8 compute mode likewise: each chunk's input rows and FC1 outputs are also quantized once to int8
// rows (int8_rows.h: a row's codes depend on that row alone), and the kernels are kernels_avx512_vnni.cpp's
// or kernels_amx.cpp's. Its input rows are kept in grouped order (one copy per route, like the FC1
// activations), so an expert's rows are consecutive: the AMX kernels load a tile of them in place.
// The int8x3 mode keeps three int8 digit planes per row instead of one (four, as two pairs, for 4-bit weights
// in blocks of 16 or 32: quantize_row_int8_digits) and runs kernels_amx.cpp's digit kernels.
#include "cpu/cpu_backend.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <mutex>
#include <thread>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_layout.h"
#include "cpu/int8_rows.h"
#include "cpu/thread_pool.h"
#include "qmoe/backend.h"
#include "qmoe/error.h"
#include "qmoe/reference.h"
#include "qmoe/routing.h"

namespace qmoe {

namespace cpu {
namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}
// F16C (CPUID leaf 1, ECX bit 29) is read directly: clang 14 rejects __builtin_cpu_supports("f16c").
bool cpu_has_f16c() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29)) != 0;
}
bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c(); }
bool cpu_has_avx512_bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
bool cpu_has_avx512_vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }

}  // namespace

bool amx_available() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (d & (3u << 24)) != (3u << 24)) return false;
    if (!cpu_has_avx512_vnni() || !__builtin_cpu_supports("avx512vbmi")) return false;
    // Linux (5.16 and later) hands out the 8 KB tile data state only on request, once per process:
    // arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18). Elsewhere the call fails.
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

namespace {

// Which activation rows the kernels read besides the fp32 ones (CpuBackendOptions::compute).
enum class Compute { exact, bf16, int8, int8x3 };

// int8 digit planes per activation row the mode's kernels read for layer s (0: no int8 rows; int8x3: three
// digits, or two pairs of digits for 4-bit weights in blocks of 16 or 32, int8_rows.h).
int int8_digits(Compute c, const MoeSpec& s) {
  return c == Compute::int8 ? 1 : c == Compute::int8x3 ? int8_digit_count(s.bits, s.block_size) : 0;
}

// The exact kernels for `isa` ("amx" names the int8 mode's tile multiplies; its exact kernels are AVX-512's).
const KernelSet& select_kernels(const std::string& isa) {
  if (isa == "auto" || isa == "amx") {
    if (cpu_has_avx512()) return avx512_kernels();
    if (cpu_has_avx2()) return avx2_kernels();
    return portable_kernels();
  }
  if (isa == "portable") return portable_kernels();
  if (isa == "avx2") {
    if (!cpu_has_avx2()) throw Error("cpu backend: isa 'avx2' requested, but this CPU lacks AVX2, FMA or F16C");
    return avx2_kernels();
  }
  if (isa == "avx512") {
    if (!cpu_has_avx512()) throw Error("cpu backend: isa 'avx512' requested, but this CPU lacks AVX-512 F/BW/VL");
    return avx512_kernels();
  }
  throw Error("cpu backend: isa: expected auto, portable, avx2, avx512 or amx, got '" + isa + "'");
}

Compute parse_compute(const std::string& compute) {
  if (compute == "exact") return Compute::exact;
  if (compute == "bf16") return Compute::bf16;
  if (compute == "int8") return Compute::int8;
  if (compute == "int8x3") return Compute::int8x3;
  throw Error("cpu backend: compute: expected exact, bf16, int8 or int8x3, got '" + compute + "'");
}

// The kernels for (isa, compute). compute "bf16" exists only as AVX-512 BF16 kernels, "int8" as AVX-512
// VNNI kernels and, where the CPU has AMX (isa "auto" or "amx"), as AMX kernels, "int8x3" as AMX kernels.
const KernelSet& select_kernels(const std::string& isa, const std::string& compute) {
  if (isa == "amx" && compute != "int8" && compute != "int8x3")
    throw Error("cpu backend: isa 'amx' serves only compute 'int8' and 'int8x3' (its tile multiplies take int8 "
                "activations), got compute '" + compute + "'");
  const KernelSet& exact = select_kernels(isa);  // validates isa first
  const Compute c = parse_compute(compute);
  if (c == Compute::exact) return exact;
  if (c == Compute::int8x3) {
    if (isa != "auto" && isa != "amx")
      throw Error("cpu backend: compute 'int8x3' runs only on the AMX kernels, but isa '" + isa +
                  "' was requested (use isa auto or amx)");
    if (!amx_available())
      throw Error("cpu backend: compute 'int8x3' requested, but this CPU lacks AMX-TILE, AMX-INT8, AVX512_VNNI or "
                  "AVX512_VBMI, or the OS did not grant the tile state; use compute 'exact'");
    return avx512_amx_digits_kernels();
  }
  const char* kernels = c == Compute::bf16 ? "AVX-512 BF16" : "AVX-512 VNNI";
  if (isa != "auto" && isa != "avx512" && isa != "amx")
    throw Error("cpu backend: compute '" + compute + "' runs only on the " + kernels + " kernels, but isa '" + isa +
                "' was requested (use isa auto or avx512, or compute exact)");
  if (c == Compute::bf16) {
    if (!cpu_has_avx512_bf16())
      throw Error("cpu backend: compute 'bf16' requested, but this CPU lacks AVX512_BF16 (or AVX-512 F/BW/VL); "
                  "use compute 'exact'");
    return avx512_bf16_kernels();
  }
  if (isa == "amx" && !amx_available())
    throw Error("cpu backend: isa 'amx' requested, but this CPU lacks AMX-TILE, AMX-INT8, AVX512_VNNI or AVX512_VBMI, "
                "or the OS did not grant the tile state; use isa 'auto' or 'avx512'");
  if (!cpu_has_avx512_vnni())
    throw Error("cpu backend: compute 'int8' requested, but this CPU lacks AVX512_VNNI (or AVX-512 F/BW/VL); "
                "use compute 'exact' (or 'bf16' where the CPU has AVX512_BF16)");
  return isa != "avx512" && amx_available() ? avx512_amx_kernels() : avx512_vnni_kernels();
}

// Prepack off: the raw tensors, validated, plus the plan that says how to pack a tile on the fly.
class CpuRawExperts final : public PackedExperts {
 public:
  CpuRawExperts(const MoeSpec& spec, RawExperts raw) : PackedExperts(raw_path_tag(), spec), raw_(std::move(raw)), plan_(make_plan(spec)) {}
  size_t resident_bytes() const override { return raw_.nbytes(); }
  std::vector<NamedTensor> to_blobs() const override { return raw_to_blobs(raw_); }
  const RawExperts& raw() const { return raw_; }
  const LayerPlan& plan() const { return plan_; }

 private:
  RawExperts raw_;
  LayerPlan plan_;
};

// One packed tile as the kernel sees it.
struct TileRef {
  const uint8_t* codes;
  const void* scales;
  const uint8_t* zero_points;
  const float* bias;
  bool scales_finite = false;  // known: no scale of the tile's expert is +-Inf (PackedMat::finite)
};

// Per-task scratch for the prepack-off path: two packed tiles.
struct Scratch {
  std::vector<uint8_t> codes[2], zp[2], scales[2];
  std::vector<float> bias[2];
};

// Pairs whose tiles a task reads together: for each token call in turn, the block's pairs one after another,
// so that one call's activation rows stay in L2 across the block (at prefill an expert's rows are megabytes:
// taken pair by pair, every call re-read them from L3) while the block's weights stay there across the calls.
inline constexpr int64_t kPairBlock = 16;
using PairBlock = std::array<std::pair<TileRef, TileRef>, kPairBlock>;

struct PackedSource {
  const CpuPackedExperts& p;
  static int64_t pair_block() { return kPairBlock; }
  TileRef tile(const PartPlan& part, int64_t e, int64_t t, Scratch&, int) const {
    const MatGeom& g = part.geom;
    const PackedMat& m = p.mat(g.part);
    const size_t ssz = dtype_size(g.scale_dtype);
    const int64_t mo = e * g.meta_per_expert() + g.meta_offset(t, 0, 0);
    return {m.codes.data_as<uint8_t>() + e * g.codes_per_expert() + g.code_offset(t, 0, 0),
            static_cast<const uint8_t*>(m.scales.data()) + size_t(mo) * ssz,
            g.zero_points ? m.zero_points.data_as<uint8_t>() + mo : nullptr,
            g.bias ? m.bias.data_as<float>() + e * g.rows() + t * kTileRows : nullptr,
            m.finite[size_t(e)] != 0};
  }
};

struct RawSource {
  const CpuRawExperts& r;
  static int64_t pair_block() { return 1; }  // the tiles are packed into a task's scratch of two, pair by pair
  TileRef tile(const PartPlan& part, int64_t e, int64_t t, Scratch& sc, int slot) const {
    const MatGeom& g = part.geom;
    const RawExperts& raw = r.raw();
    const RawMatrix& src = part.source == Fc::fc1 ? raw.fc1 : part.source == Fc::fc2 ? raw.fc2 : *raw.fc3;
    sc.codes[slot].resize(size_t(g.jbytes * kTileRows));
    sc.scales[slot].resize(size_t(g.nb * kTileRows) * dtype_size(g.scale_dtype));
    sc.zp[slot].resize(g.zero_points ? size_t(g.nb * kTileRows) : 0);
    sc.bias[slot].resize(g.bias ? size_t(kTileRows) : 0);
    TileDst d{sc.codes[slot].data(), sc.scales[slot].data(), g.zero_points ? sc.zp[slot].data() : nullptr,
              g.bias ? sc.bias[slot].data() : nullptr};
    pack_tile(r.spec(), part, src, e, t, d);
    return {d.codes, d.scales, d.zero_points, d.bias};
  }
};

// One input row to fp32. Through memcpy, because user buffers need not be aligned to their element
// type (a misaligned float* load is undefined behaviour; numpy slices can be misaligned).
void convert_row(DType dt, const uint8_t* src, int64_t n, float* dst) {
  switch (dt) {
    case DType::f32: std::memcpy(dst, src, size_t(n) * 4); return;
    case DType::f16:
    case DType::bf16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = dt == DType::f16 ? half_to_float(h) : bf16_to_float(h);
      }
      return;
    case DType::u8: break;
  }
  throw Error("cpu backend: input dtype must be float32, float16 or bfloat16, got " + std::string(dtype_name(dt)));
}

PairKernel kernel_for(const KernelSet& ks, int bits) {
  switch (bits) {
    case 2: return ks.w2;
    case 4: return ks.w4;
    case 8: return ks.w8;
  }
  throw Error("cpu backend: expert_weight_bits: expected 2, 4 or 8, got " + std::to_string(bits));
}

PairJob job_for(const MatGeom& g, const TileRef& a, const TileRef& b) {
  PairJob jb;
  jb.codes[0] = a.codes, jb.codes[1] = b.codes;
  jb.scales[0] = a.scales, jb.scales[1] = b.scales;
  jb.zero_points[0] = a.zero_points, jb.zero_points[1] = b.zero_points;
  jb.jbytes = g.jbytes;
  jb.nb = g.nb;
  jb.block_bytes = g.block_bytes;
  jb.K = g.K;
  jb.bits = g.bits;
  jb.scale_dtype = g.scale_dtype;
  jb.scales_finite = a.scales_finite && b.scales_finite;
  return jb;
}

// Token rows of call c when an expert's m tokens go through the kernel in calls of at most mt.
// Without tile rows: the fewest calls, sizes as equal as possible (m = 13, mt = 6: 5, 4, 4 rather than 6, 6,
// 1). A vector kernel's cost per call falls less than in proportion to its tokens (its weight shuffles are
// per call, and few tokens leave the vpdpbusd/FMA chains latency-bound), so a 1-token tail costs nearly a
// full call. With tile rows (KernelSet::tile_rows): full calls and the rest in the last (m = 130, mt = 32:
// 32, 32, 32, 32, 2), because a tile multiply costs the same for any number of rows: equal calls of 26
// would take 10 tile multiplies of 16 and 10 rows per weight tile where 8 full ones and a 2-token
// vpdpbusd call do.
struct CallSplit {
  int64_t m, mt, calls;
  bool full;  // tile rows: full calls, then the rest
  CallSplit(int64_t m_, int64_t mt_, bool tiles) : m(m_), mt(mt_), calls((m_ + mt_ - 1) / mt_), full(tiles) {}
  int tokens(int64_t c) const { return int(full ? std::min(mt, m - c * mt) : m / calls + (c < m % calls)); }
};

struct Task {
  int32_t e;
  int64_t p0, p1;  // pair range
};

// Splits each active expert's pairs into chunks: ~8 tasks per thread over the whole stage, so dynamic
// scheduling balances experts with different token counts; a chunk is at least one pair.
std::vector<Task> make_tasks(const std::vector<int32_t>& active, int64_t pairs, int threads) {
  const int64_t total = int64_t(active.size()) * pairs;
  const int64_t chunk = std::max<int64_t>(1, total / (int64_t(threads) * 8));
  std::vector<Task> tasks;
  for (int32_t e : active)
    for (int64_t p = 0; p < pairs; p += chunk) tasks.push_back({e, p, std::min(p + chunk, pairs)});
  return tasks;
}

// Scratch storage aligned to 64 bytes: with rows of a multiple of 64 elements (run_chunk's XW, AW) every row
// of every copy starts on a cache line, so the AMX kernels' tile loads of A rows take whole lines (tile loads
// of rows that straddle lines took about twice as long: docs/PERF.md, "Rows on cache lines and pair blocks").
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Aligned64<U>&) const { return true; }
};
template <class T>
using ScratchVec = std::vector<T, Aligned64<T>>;

// Run scratch for one chunk of rows, kept across calls: a fresh 50 MB allocation per call (T=512)
// costs a page fault per 4 KB, measured at ~20% of the layer on this VM. Sized by the largest chunk
// run so far (at most the chunk size), never by T. Every element a chunk reads is written by it.
struct RunScratch {
  ScratchVec<float> X, A, Y;   // fp32 inputs, FC1 activations per grouped position, FC2 output per slot
  ScratchVec<uint16_t> Xb, Ab;  // compute bf16 only: X and A rounded to bf16 (what its kernels read)
  // compute int8 only: X and A as int8 rows (int8_rows.h): codes, -(sum) per group (stride width / 16,
  // enough for groups of >= 16 columns), one scale per row; both per grouped position, and the position
  // of each slot (X's rows are quantized once per token, then copied to the token's other positions)
  ScratchVec<int8_t> Xq, Aq;
  ScratchVec<int32_t> Xn, An;
  std::vector<float> Xs, As;
  std::vector<int64_t> position;
  std::vector<Route> routes;    // slot t*k+j of the chunk
  std::vector<int64_t> order;   // slots grouped by expert

  size_t bytes() const {
    return (X.capacity() + A.capacity() + Y.capacity() + Xs.capacity() + As.capacity()) * sizeof(float) +
           (Xb.capacity() + Ab.capacity()) * sizeof(uint16_t) + Xq.capacity() + Aq.capacity() +
           (Xn.capacity() + An.capacity()) * sizeof(int32_t) + routes.capacity() * sizeof(Route) +
           (order.capacity() + position.capacity()) * sizeof(int64_t);
  }
};

// Grows v to n elements, allocating exactly n (resize alone may double the capacity, which would
// break the documented bound).
template <class V>
typename V::value_type* grow(V& v, int64_t n) {
  if (int64_t(v.size()) < n) {
    v.reserve(size_t(n));
    v.resize(size_t(n));
  }
  return v.data();
}

// One matrix's activation rows as the kernels read them: fp32, plus the compute mode's copies (bf16
// rows, or int8 codes, group sums and row scales; null where the mode keeps none).
struct KernelRows {
  const float* f;
  const uint16_t* b;
  int8_t* q;
  int32_t* nsum;
  float* scale;
  int64_t width, groups;  // elements per row; int32 group sums per row
  int digits;             // int8 digit planes per row, each `width` codes and `groups` sums (int8_rows.h)

  // Row `row` of the fp32 and bf16 rows, row `qrow` of the int8 ones.
  void put(PairJob& jb, int i, int64_t row, int64_t qrow) const {
    jb.x[i] = f + row * width;
    jb.xb[i] = b ? b + row * width : nullptr;
    jb.xq[i] = q ? q + qrow * digits * width : nullptr;
    jb.xneg_sum[i] = nsum ? nsum + qrow * digits * groups : nullptr;
    jb.xscale[i] = scale ? scale[qrow] : 0.f;
    jb.xq_digit_stride = width, jb.xneg_digit_stride = groups;
    jb.xq_pairs = digits == kInt8PairDigits;
  }
  // Quantizes fp32 row `row` (K columns) into int8 row `qrow`.
  void quantize(const MoeSpec& s, int64_t K, int64_t row, int64_t qrow) const {
    const float* x = f + row * width;
    const int64_t qo = qrow * digits * width, no = qrow * digits * groups;
    if (digits == 1)
      quantize_row_int8(x, K, width, s.bits, s.block_size, q + qo, nsum + no, scale + qrow);
    else if (digits == kInt8PairDigits)  // the int8x3 mode, which runs only where amx_available(): AVX-512 too
      quantize_row_int8_pairs_avx512(x, K, width, s.block_size, q + qo, nsum + no, groups, scale + qrow);
    else
      quantize_row_int8_digits(x, K, width, s.bits, s.block_size, q + qo, nsum + no, groups, scale + qrow);
  }
  // Copies int8 row `from` to `to`.
  void copy(int64_t from, int64_t to) const {
    std::memcpy(q + to * digits * width, q + from * digits * width, size_t(digits * width));
    std::memcpy(nsum + to * digits * groups, nsum + from * digits * groups, size_t(digits * groups) * sizeof(int32_t));
    scale[to] = scale[from];
  }
};

// A task's pairs through `kernel`: in blocks of src.pair_block() pairs, each token call of the expert's rows
// (`split`) through all of a block's pairs before the next call (kPairBlock says why).
// tiles_of(p, sc): pair p's two tiles; put(jb, i, r): the call's row i is the expert's row r; done(p, ta, tb,
// r0, jb): the call's sums (rows r0.. of the expert) are in jb.acc.
template <class Source, class TilesOf, class Put, class Done>
void run_pairs(const Source& src, const Task& task, const MatGeom& geom, const CallSplit& split, PairKernel kernel,
               TilesOf&& tiles_of, Put&& put, Done&& done) {
  Scratch sc;
  alignas(64) float acc[kMaxTokens * kPairRows];
  PairBlock tiles;
  for (int64_t p0 = task.p0; p0 < task.p1; p0 += src.pair_block()) {
    const int64_t np = std::min(task.p1 - p0, src.pair_block());
    for (int64_t i = 0; i < np; ++i) tiles[i] = tiles_of(p0 + i, sc);
    for (int64_t c = 0, r0 = 0; c < split.calls; r0 += split.tokens(c), ++c)
      for (int64_t p = p0; p < p0 + np; ++p) {
        const TileRef &ta = tiles[p - p0].first, &tb = tiles[p - p0].second;
        PairJob jb = job_for(geom, ta, tb);
        jb.acc = acc;
        jb.tokens = split.tokens(c);
        for (int i = 0; i < jb.tokens; ++i) put(jb, i, r0 + i);
        kernel(jb);
        done(p, ta, tb, r0, jb);
      }
  }
}

// Rows [r0, r1) of the layer: reads those rows of the inputs, writes those rows of `out`.
template <class Source>
void run_chunk(const MoeSpec& s, const LayerPlan& plan, const Source& src, const KernelSet& ks, Compute mode, ThreadPool& pool,
               const MoeInputs& in, Tensor& out, RunScratch& scratch, int64_t r0, int64_t r1) {
  const int digits = int8_digits(mode, s);
  const bool bf16 = mode == Compute::bf16, int8 = digits > 0;
  const int64_t rows = r1 - r0, H = s.hidden, I = s.inter, k = s.k, E = s.num_experts;
  const PairKernel kernel = kernel_for(ks, s.bits);

  // Routing (as route_all does it, row by row) and grouping: slots t*k+j sorted by expert (stable, so
  // by token within an expert). t is the row within the chunk.
  Route* routes = grow(scratch.routes, rows * k);
  {
    std::vector<float> logits(static_cast<size_t>(E)), rw(in.router_weights ? static_cast<size_t>(E) : 0);
    for (int64_t t = 0; t < rows; ++t) {
      for (int64_t e = 0; e < E; ++e)
        logits[size_t(e)] = load_as_float(in.router_probs.dtype, in.router_probs.data, (r0 + t) * E + e);
      if (in.router_weights)
        for (int64_t e = 0; e < E; ++e)
          rw[size_t(e)] = load_as_float(in.router_weights->dtype, in.router_weights->data, (r0 + t) * E + e);
      route_token(s, logits.data(), in.router_weights ? rw.data() : nullptr, routes + t * k);
    }
  }
  std::vector<int64_t> off(size_t(E + 1), 0);
  for (int64_t slot = 0; slot < rows * k; ++slot) ++off[size_t(routes[slot].expert) + 1];
  for (int64_t e = 0; e < E; ++e) off[size_t(e + 1)] += off[size_t(e)];
  int64_t* order = grow(scratch.order, rows * k);
  int64_t* position = int8 ? grow(scratch.position, rows * k) : nullptr;
  {
    std::vector<int64_t> fill(off.begin(), off.end() - 1);
    for (int64_t slot = 0; slot < rows * k; ++slot) {
      const int64_t pos = fill[size_t(routes[slot].expert)]++;
      order[pos] = slot;
      if (position) position[slot] = pos;
    }
  }
  std::vector<int32_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (off[size_t(e + 1)] > off[size_t(e)]) active.push_back(int32_t(e));

  // fp32 activations, zero-padded: the kernels read up to jbytes*pack (<= K + 8) columns; rows of a multiple
  // of 64 elements (ScratchVec).
  const int64_t XW = round_up(H + 8, 64), AW = round_up(I + 8, 64);
  float* X = grow(scratch.X, rows * XW);
  float* A = grow(scratch.A, rows * k * AW);  // FC1 activations per grouped position
  float* Y = grow(scratch.Y, rows * k * H);   // FC2 output per slot (every slot written)
  // bf16 mode: the same rows rounded to bf16 once per chunk (float_to_bf16: nearest even), padding 0.
  uint16_t* Xb = bf16 ? grow(scratch.Xb, rows * XW) : nullptr;
  uint16_t* Ab = bf16 ? grow(scratch.Ab, rows * k * AW) : nullptr;
  // int8 modes: the same rows quantized (int8_rows.h; int8x3: three or four digit planes), per grouped position;
  // X's once here, A's after FC1 (a row's scale needs all its columns).
  const int64_t XN = XW / 16, AN = AW / 16;
  int8_t* Xq = int8 ? grow(scratch.Xq, rows * k * digits * XW) : nullptr;
  int8_t* Aq = int8 ? grow(scratch.Aq, rows * k * digits * AW) : nullptr;
  int32_t* Xn = int8 ? grow(scratch.Xn, rows * k * digits * XN) : nullptr;
  int32_t* An = int8 ? grow(scratch.An, rows * k * digits * AN) : nullptr;
  float* Xs = int8 ? grow(scratch.Xs, rows * k) : nullptr;
  float* As = int8 ? grow(scratch.As, rows * k) : nullptr;
  const KernelRows xrows{X, Xb, Xq, Xn, Xs, XW, XN, digits}, arows{A, Ab, Aq, An, As, AW, AN, digits};
  const int threads = pool.threads();
  const int64_t row_chunk = std::max<int64_t>(1, rows / (threads * 4));
  pool.parallel_for((rows + row_chunk - 1) / row_chunk, [&](int64_t c) {
    for (int64_t t = c * row_chunk; t < std::min(rows, (c + 1) * row_chunk); ++t) {
      convert_row(in.input.dtype,
                  static_cast<const uint8_t*>(in.input.data) + size_t((r0 + t) * H) * dtype_size(in.input.dtype), H,
                  X + t * XW);
      std::fill(X + t * XW + H, X + (t + 1) * XW, 0.f);  // the kernels read these columns
      for (int64_t j = 0; j < k; ++j) std::fill(A + (t * k + j) * AW + I, A + (t * k + j + 1) * AW, 0.f);
      if (bf16) {
        for (int64_t i = 0; i < XW; ++i) Xb[t * XW + i] = float_to_bf16(X[t * XW + i]);
        for (int64_t j = 0; j < k; ++j) std::fill(Ab + (t * k + j) * AW + I, Ab + (t * k + j + 1) * AW, uint16_t(0));
      }
      if (int8) {
        const int64_t p0 = position[t * k];
        xrows.quantize(s, H, t, p0);
        for (int64_t j = 1; j < k; ++j) xrows.copy(p0, position[t * k + j]);
      }
    }
  });

  // FC1 + bias + activation -> A.
  const bool swiglu = plan.swiglu;
  const PartPlan& pa = swiglu ? plan.fc1_gate : plan.fc1;
  const PartPlan& pb = swiglu ? plan.fc1_linear : plan.fc1;
  // The accuracy options' vector SwiGLU; 2-bit layers run exact in every mode (their kernel is the
  // portable one), so they keep the scalar formula too.
  const SwigluFn vswiglu = s.bits == 2 ? nullptr : ks.swiglu;
  const std::vector<Task> t1 = make_tasks(active, plan.fc1_pairs(), threads);
  pool.parallel_for(int64_t(t1.size()), [&](int64_t ti) {
    const Task& task = t1[size_t(ti)];
    const int64_t o = off[size_t(task.e)], m = off[size_t(task.e) + 1] - o;
    auto tiles_of = [&](int64_t p, Scratch& sc) {
      return std::pair{src.tile(pa, task.e, swiglu ? p : 2 * p, sc, 0),
                       src.tile(pb, task.e, swiglu ? p : 2 * p + 1, sc, 1)};
    };
    auto put = [&](PairJob& jb, int i, int64_t r) { xrows.put(jb, i, order[o + r] / k, o + r); };
    auto done = [&](int64_t p, const TileRef& ta, const TileRef& tb, int64_t r0, const PairJob& jb) {
      for (int i = 0; i < jb.tokens; ++i) {
        float* a = A + (o + r0 + i) * AW;
        uint16_t* ab = bf16 ? Ab + (o + r0 + i) * AW : nullptr;
        const float* h = jb.acc + i * kPairRows;
        if (swiglu) {
          const int n = int(std::min<int64_t>(kTileRows, I - p * kTileRows));
          float* ar = a + p * kTileRows;
          if (vswiglu) {
            vswiglu(h, h + kTileRows, ta.bias, tb.bias, ar, n, s.swiglu_limit, s.activation_alpha, s.activation_beta);
          } else {
            for (int l = 0; l < n; ++l) {
              float g = h[l], u = h[kTileRows + l];  // no "+ 0.f" without a bias: it would turn -0 into +0
              if (ta.bias) g += ta.bias[l];
              if (tb.bias) u += tb.bias[l];
              ar[l] = swiglu_scalar(s, g, u);
            }
          }
          if (ab)
            for (int l = 0; l < n; ++l) ab[p * kTileRows + l] = float_to_bf16(ar[l]);
        } else {
          for (int l = 0; l < kPairRows; ++l) {
            const int64_t r = p * kPairRows + l;
            if (r >= I) break;
            const TileRef& tr = l < kTileRows ? ta : tb;
            float v = h[l];
            if (tr.bias) v += tr.bias[l % kTileRows];
            a[r] = activation_scalar(s.activation, v);
            if (ab) ab[r] = float_to_bf16(a[r]);
          }
        }
      }
    };
    run_pairs(src, task, pa.geom, CallSplit(m, ks.tokens_per_call(s.bits), ks.tile_rows > 0), kernel, tiles_of, put, done);
  });

  if (int8) {
    const int64_t positions = rows * k, pos_chunk = std::max<int64_t>(1, positions / (threads * 4));
    pool.parallel_for((positions + pos_chunk - 1) / pos_chunk, [&](int64_t c) {
      for (int64_t i = c * pos_chunk; i < std::min(positions, (c + 1) * pos_chunk); ++i) arows.quantize(s, I, i, i);
    });
  }

  // FC2 + bias -> Y[slot].
  const PartPlan& p2 = plan.fc2;
  const std::vector<Task> t2 = make_tasks(active, plan.fc2_pairs(), threads);
  pool.parallel_for(int64_t(t2.size()), [&](int64_t ti) {
    const Task& task = t2[size_t(ti)];
    const int64_t o = off[size_t(task.e)], m = off[size_t(task.e) + 1] - o;
    auto tiles_of = [&](int64_t p, Scratch& sc) {
      return std::pair{src.tile(p2, task.e, 2 * p, sc, 0), src.tile(p2, task.e, 2 * p + 1, sc, 1)};
    };
    auto put = [&](PairJob& jb, int i, int64_t r) { arows.put(jb, i, o + r, o + r); };
    auto done = [&](int64_t p, const TileRef& ta, const TileRef& tb, int64_t r0, const PairJob& jb) {
      for (int i = 0; i < jb.tokens; ++i) {
        float* y = Y + order[o + r0 + i] * H;
        const float* h = jb.acc + i * kPairRows;
        for (int l = 0; l < kPairRows; ++l) {
          const int64_t r = p * kPairRows + l;
          if (r >= H) break;
          const TileRef& tr = l < kTileRows ? ta : tb;
          y[r] = tr.bias ? h[l] + tr.bias[l % kTileRows] : h[l];
        }
      }
    };
    run_pairs(src, task, p2.geom, CallSplit(m, ks.tokens_per_call(s.bits), ks.tile_rows > 0), kernel, tiles_of, put, done);
  });

  // Combine in selection order (as the reference does), round to T once.
  pool.parallel_for((rows + row_chunk - 1) / row_chunk, [&](int64_t c) {
    for (int64_t t = c * row_chunk; t < std::min(rows, (c + 1) * row_chunk); ++t)
      for (int64_t i = 0; i < H; ++i) {
        float acc = 0.f;
        for (int64_t j = 0; j < k; ++j) acc += routes[t * k + j].weight * Y[(t * k + j) * H + i];
        store_from_float(out.dtype(), out.data(), (r0 + t) * H + i, acc);
      }
  });
}

template <class Source>
void run_layer(const MoeSpec& s, const LayerPlan& plan, const Source& src, const KernelSet& ks, Compute mode, ThreadPool& pool,
               const MoeInputs& in, Tensor& out, RunScratch& scratch, int64_t chunk) {
  const int64_t rows = input_rows(in);
  for (int64_t r0 = 0, r1; r0 < rows; r0 = r1) {
    r1 = r0 + std::min(rows - r0, chunk);
    run_chunk(s, plan, src, ks, mode, pool, in, out, scratch, r0, r1);
  }
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(const CpuBackendOptions& opt)
      : opt_(opt), kernels_(&select_kernels(opt.isa, opt.compute)), mode_(parse_compute(opt.compute)) {
    if (opt.threads < 0) throw Error("cpu backend: threads: expected >= 0 (0 = all cores), got " + std::to_string(opt.threads));
    if (opt.max_chunk_rows < 0)
      throw Error("cpu backend: max_chunk_rows: expected >= 0 (0 = as many rows as fit in 256 MiB of scratch), got " +
                  std::to_string(opt.max_chunk_rows));
    const int n = opt.threads > 0 ? opt.threads : std::max(1, int(std::thread::hardware_concurrency()));
    pool_ = std::make_unique<ThreadPool>(n);
  }

  std::string name() const override { return "cpu"; }

  std::unique_ptr<PackedExperts> prepack(const MoeSpec& spec, RawExperts raw) override {
    spec.validate();
    validate_raw(spec, raw);
    if (!opt_.prepack) return std::make_unique<CpuRawExperts>(spec, std::move(raw));
    std::lock_guard<std::mutex> lk(mu_);
    return pack_experts(spec, std::move(raw), pool_.get());
  }

  LayoutTag layout_for(const MoeSpec& spec) const override { return opt_.prepack ? packed_tag(spec) : raw_path_tag(); }

  std::unique_ptr<PackedExperts> from_blobs(const MoeSpec& spec, std::vector<NamedTensor> blobs) override {
    spec.validate();
    if (opt_.prepack) return packed_from_blobs(spec, blobs);
    RawExperts raw = raw_from_blobs(spec, std::move(blobs), raw_path_tag().name);
    return std::make_unique<CpuRawExperts>(spec, std::move(raw));
  }

  void run(const PackedExperts& packed, const MoeInputs& inputs, Tensor& output) override {
    const MoeSpec& s = packed.spec();
    require_layout(packed, layout_for(s), "cpu backend");
    validate_inputs(s, inputs);
    if (output.dtype() != inputs.input.dtype || output.shape() != inputs.input.shape)
      throw Error("output: expected " + std::string(dtype_name(inputs.input.dtype)) + " " + shape_str(inputs.input.shape) +
                  ", got " + std::string(dtype_name(output.dtype())) + " " + shape_str(output.shape()));
    const int64_t chunk = chunk_rows(s, opt_);
    std::lock_guard<std::mutex> lk(mu_);  // the pool runs one layer at a time
    if (opt_.prepack) {
      const auto& p = static_cast<const CpuPackedExperts&>(packed);
      run_layer(s, p.plan(), PackedSource{p}, *kernels_, mode_, *pool_, inputs, output, scratch_, chunk);
    } else {
      const auto& r = static_cast<const CpuRawExperts&>(packed);
      run_layer(s, r.plan(), RawSource{r}, *kernels_, mode_, *pool_, inputs, output, scratch_, chunk);
    }
  }

  const KernelSet& kernels() const { return *kernels_; }
  size_t held_scratch_bytes() const {
    std::lock_guard<std::mutex> lk(mu_);
    return scratch_.bytes();
  }

 private:
  CpuBackendOptions opt_;
  const KernelSet* kernels_;
  Compute mode_;  // bf16 / int8 / int8x3: keep bf16 / int8 copies of the activation rows for the kernels
  std::unique_ptr<ThreadPool> pool_;
  mutable std::mutex mu_;  // one run or prepack at a time: the pool and scratch_ are shared
  RunScratch scratch_;
};

}  // namespace

static_assert(sizeof(Route) == 8, "cpu_backend.h and backend.h state 16 bytes per route (a Route and an int64)");

int64_t scratch_bytes_per_row(const MoeSpec& s, const std::string& compute) {
  // H, I <= 2^24 and k <= 2^16 (MoeSpec::validate), so this stays below 2^44.
  const int64_t XW = round_up(s.hidden + 8, 64), AW = round_up(s.inter + 8, 64);
  const int64_t bf16_rows = compute == "bf16" ? 2 * (XW + s.k * AW) : 0;
  // int8 (D = 1 digit plane) and int8x3 (D = 3, or 4 for 4-bit weights in blocks of 16 or 32): k rows of
  // each (grouped positions): per plane 1 byte per code and 4 per group sum (XW / 16 and AW / 16 per row); 4
  // per row scale; 8 per slot for its position.
  const int64_t D = int8_digits(parse_compute(compute), s);
  const int64_t int8_rows = D ? s.k * (D * ((XW + AW) + 4 * (XW / 16 + AW / 16)) + 8 + 8) : 0;
  return 4 * (XW + s.k * (AW + s.hidden)) + s.k * int64_t(sizeof(Route) + sizeof(int64_t)) + bf16_rows + int8_rows;
}

int64_t chunk_rows(const MoeSpec& spec, const CpuBackendOptions& opt) {
  if (opt.max_chunk_rows > 0) return opt.max_chunk_rows;
  return std::max<int64_t>(1, kAutoChunkScratchBytes / scratch_bytes_per_row(spec, opt.compute));
}

size_t held_scratch_bytes(const Backend& backend) {
  auto* b = dynamic_cast<const CpuBackend*>(&backend);
  if (!b) throw Error("held_scratch_bytes: expected the cpu backend, got '" + backend.name() + "'");
  return b->held_scratch_bytes();
}

}  // namespace cpu

std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& opt) { return std::make_unique<cpu::CpuBackend>(opt); }

}  // namespace qmoe
