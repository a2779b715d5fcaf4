// Packing raw experts into the cpu-t16 format (cpu_layout.h), the inverse, and packed-file blobs.
// Every offset comes from MatGeom::code_offset / meta_offset, the one statement of the format.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include <emmintrin.h>  // SSE2: part of the x86-64 baseline, no extra flags needed

#include "cpu/cpu_layout.h"
#include "cpu/thread_pool.h"
#include "qmoe/error.h"
#include "core/str_builder.h"

namespace qmoe::cpu {

const char* part_name(Part p) {
  switch (p) {
    case Part::fc1: return "fc1";
    case Part::fc1_gate: return "fc1_gate";
    case Part::fc1_linear: return "fc1_linear";
    case Part::fc2: return "fc2";
  }
  return "?";
}

namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

MatGeom geom_for(const MoeSpec& s, Part part, int64_t rows, int64_t K, bool zp, bool bias) {
  MatGeom g;
  g.part = part;
  g.experts = s.num_experts;
  g.tiles = rows / kTileRows;
  g.K = K;
  g.bits = s.bits;
  g.jbytes = round_up(K / s.pack(), 2);
  g.nb = s.blocks(K);
  g.block_bytes = s.block_wise() ? s.block_size / s.pack() : g.jbytes;
  g.scale_dtype = s.scale_dtype;
  g.zero_points = zp;
  g.bias = bias;
  return g;
}

const RawMatrix& source_of(const RawExperts& raw, Fc fc) {
  return fc == Fc::fc1 ? raw.fc1 : fc == Fc::fc2 ? raw.fc2 : *raw.fc3;
}

bool has_zp(const MoeSpec& s, Fc fc) {
  return fc == Fc::fc1 ? s.fc1_zero_points : fc == Fc::fc2 ? s.fc2_zero_points : s.fc3_zero_points;
}
bool has_bias(const MoeSpec& s, Fc fc) { return fc == Fc::fc1 ? s.fc1_bias : fc == Fc::fc2 ? s.fc2_bias : s.fc3_bias; }

// Zero-point code of (raw row n, block b) of expert e (contract §5.3).
int raw_zero_point(const MoeSpec& s, const Tensor& zp, int64_t e, int64_t N, int64_t nb, int64_t n, int64_t b) {
  const int zpack = s.pack();
  const uint8_t* p = zp.data_as<uint8_t>();
  int64_t byte, shift;
  if (s.block_wise()) {
    const int64_t per_row = (nb + zpack - 1) / zpack;
    byte = (e * N + n) * per_row + b / zpack;
    shift = (b % zpack) * s.bits;
  } else {
    byte = e * ((N + zpack - 1) / zpack) + n / zpack;
    shift = (n % zpack) * s.bits;
  }
  return (p[byte] >> shift) & ((1 << s.bits) - 1);
}

// Packed buffers come from here rather than Tensor(dtype, shape): no zero fill, because pack_tile
// writes every byte of every tile (padding included). On this VM the first touch of fresh memory costs
// ~1 s per GB (page faults, measured by bench/cpu_bench.cpp), which bounds prepack; a zero fill would
// add a second pass. (MADV_HUGEPAGE was tried: first-touch compaction stalls of seconds, no decode gain.)
Tensor packed_tensor(DType dt, Shape shape) {
  const size_t bytes = size_t(shape_numel(shape)) * dtype_size(dt);
  const size_t alloc = std::max<size_t>((bytes + 63) / 64 * 64, 64);
  void* p = std::aligned_alloc(64, alloc);
  if (!p) throw Error("out of memory allocating " + std::to_string(alloc) + " bytes for packed weights " + shape_str(shape));
  return Tensor::wrap(dt, std::move(shape), p, std::shared_ptr<void>(p, [](void* q) { std::free(q); }));
}

PackedMat alloc_mat(const MatGeom& g) {
  PackedMat m;
  m.codes = packed_tensor(DType::u8, {g.experts, g.tiles, g.jbytes, kTileRows});
  m.scales = packed_tensor(g.scale_dtype, {g.experts, g.tiles, g.nb, kTileRows});
  if (g.zero_points) m.zero_points = packed_tensor(DType::u8, {g.experts, g.tiles, g.nb, kTileRows});
  if (g.bias) m.bias = packed_tensor(DType::f32, {g.experts, g.rows()});
  return m;
}

}  // namespace

LayerPlan make_plan(const MoeSpec& s) {
  LayerPlan p;
  const int64_t H = s.hidden, I = s.inter;
  p.swiglu = s.is_swiglu();
  auto part = [&](Part which, Fc src, int64_t rows, int64_t K, int64_t valid, int64_t stride, int64_t offset) {
    PartPlan pp;
    pp.geom = geom_for(s, which, rows, K, has_zp(s, src), has_bias(s, src));
    pp.source = src;
    pp.valid_rows = valid;
    pp.stride = stride;
    pp.offset = offset;
    return pp;
  };
  if (p.swiglu) {
    const int64_t rows = round_up(I, kTileRows);
    switch (s.swiglu_fusion) {
      case SwigluFusion::separate:
        p.fc1_gate = part(Part::fc1_gate, Fc::fc1, rows, H, I, 1, 0);
        p.fc1_linear = part(Part::fc1_linear, Fc::fc3, rows, H, I, 1, 0);
        break;
      case SwigluFusion::interleaved:
        p.fc1_gate = part(Part::fc1_gate, Fc::fc1, rows, H, I, 2, 0);
        p.fc1_linear = part(Part::fc1_linear, Fc::fc1, rows, H, I, 2, 1);
        break;
      case SwigluFusion::concatenated:
        p.fc1_gate = part(Part::fc1_gate, Fc::fc1, rows, H, I, 1, 0);
        p.fc1_linear = part(Part::fc1_linear, Fc::fc1, rows, H, I, 1, I);
        break;
    }
  } else {
    p.fc1 = part(Part::fc1, Fc::fc1, round_up(I, kPairRows), H, I, 1, 0);
  }
  p.fc2 = part(Part::fc2, Fc::fc2, round_up(H, kPairRows), I, H, 1, 0);
  return p;
}

LayoutTag packed_tag(const MoeSpec& s) { return {"cpu-t16-w" + std::to_string(s.bits), 1, "cpu"}; }
LayoutTag raw_path_tag() { return {"cpu-raw", 1, "cpu"}; }

void pack_tile(const MoeSpec& s, const PartPlan& part, const RawMatrix& src, int64_t e, int64_t t,
               const TileDst& dst) {
  const MatGeom& g = part.geom;
  const int64_t N = fc_rows(s, part.source), J = g.K / g.pack();
  const uint8_t* w = src.weights.data_as<uint8_t>() + e * N * J;
  const size_t ssz = dtype_size(g.scale_dtype);
  const auto* sc = static_cast<const uint8_t*>(src.scales.data());
  const uint8_t* rows[kTileRows];
  bool full = true;
  for (int64_t l = 0; l < kTileRows; ++l) {
    const int64_t n = part.row_source(t * kTileRows + l).row;
    rows[l] = n < 0 ? nullptr : w + n * J;
    full &= n >= 0;
  }
  // Zero what the copies below do not write: padded rows (partial tiles) and padded bytes j >= J.
  if (full)
    std::memset(dst.codes + g.code_offset(0, 0, J), 0, size_t((g.jbytes - J) * kTileRows));
  else
    std::memset(dst.codes, 0, size_t(g.jbytes * kTileRows));
  std::memset(dst.scales, 0, size_t(g.nb * kTileRows) * ssz);
  if (dst.zero_points) std::memset(dst.zero_points, 0, size_t(g.nb * kTileRows));
  if (dst.bias) std::fill(dst.bias, dst.bias + kTileRows, 0.f);
  // The byte transpose: row n's byte j goes to codes[j][l] (cpu_layout.h grid). Full tiles go 16x16
  // bytes at a time through SSE2 registers: four rounds of "interleave row k with row k+8" transpose a
  // 16x16 byte block (~0.3 cycles/byte instead of ~1.5 for the scalar scatter below).
  int64_t j_done = 0;
  if (full) {
    for (; j_done + 16 <= J; j_done += 16) {
      __m128i x[16], y[16];
      for (int l = 0; l < 16; ++l) x[l] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[l] + j_done));
      for (int round = 0; round < 4; ++round) {
        for (int q = 0; q < 8; ++q) {
          y[2 * q] = _mm_unpacklo_epi8(x[q], x[q + 8]);
          y[2 * q + 1] = _mm_unpackhi_epi8(x[q], x[q + 8]);
        }
        for (int q = 0; q < 16; ++q) x[q] = y[q];
      }
      for (int q = 0; q < 16; ++q)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst.codes + g.code_offset(0, 0, j_done + q)), x[q]);
    }
  }
  // Scales: raw [N][B] -> tile [B][16], a fixed-size strided copy (a variable-size memcpy call per
  // element was ~15% of prepack). The source goes through memcpy too: raw tensors may be misaligned
  // (numpy views, file offsets), and a misaligned typed load is undefined behaviour.
  auto copy_scales = [&](auto elem, int64_t l, int64_t n) {
    using T = decltype(elem);
    const uint8_t* from = sc + size_t((e * N + n) * g.nb) * sizeof(T);
    T* to = static_cast<T*>(dst.scales);
    for (int64_t b = 0; b < g.nb; ++b) std::memcpy(&to[g.meta_offset(0, b, l)], from + size_t(b) * sizeof(T), sizeof(T));
  };
  for (int64_t l = 0; l < kTileRows; ++l) {
    if (!rows[l]) continue;
    const int64_t n = part.row_source(t * kTileRows + l).row;
    for (int64_t j = j_done; j < J; ++j) dst.codes[g.code_offset(0, l, j)] = rows[l][j];
    if (ssz == 4)
      copy_scales(uint32_t{}, l, n);
    else
      copy_scales(uint16_t{}, l, n);
    if (dst.zero_points)
      for (int64_t b = 0; b < g.nb; ++b)
        dst.zero_points[g.meta_offset(0, b, l)] = uint8_t(raw_zero_point(s, *src.zero_points, e, N, g.nb, n, b));
    if (dst.bias) {  // through memcpy: the raw bias may be misaligned
      const size_t es = dtype_size(s.act_dtype);
      alignas(4) uint8_t tmp[4];
      std::memcpy(tmp, static_cast<const uint8_t*>(src.bias->data()) + size_t(e * N + n) * es, es);
      dst.bias[l] = load_as_float(s.act_dtype, tmp, 0);
    }
  }
}

size_t PackedMat::nbytes() const {
  size_t n = codes.empty() ? 0 : codes.nbytes();
  if (!scales.empty()) n += scales.nbytes();
  if (!zero_points.empty()) n += zero_points.nbytes();
  if (!bias.empty()) n += bias.nbytes();
  return n;
}

CpuPackedExperts::CpuPackedExperts(const MoeSpec& spec, LayerPlan plan)
    : PackedExperts(packed_tag(spec), spec), plan_(std::move(plan)) {}

size_t CpuPackedExperts::resident_bytes() const {
  size_t n = 0;
  for (const auto& m : mats_) n += m.nbytes();
  return n;
}

namespace {

std::vector<const PartPlan*> parts_of(const LayerPlan& p) {
  if (p.swiglu) return {&p.fc1_gate, &p.fc1_linear, &p.fc2};
  return {&p.fc1, &p.fc2};
}

// Whether any of n values of a floating dtype is +-Inf: all exponent bits set, mantissa zero. On the
// bit patterns, so the loops vectorize (a layer's scales are 1/8 of its weight bytes at int4 block 32
// with fp32 scales).
template <class U>
bool any_inf_bits(const void* p, int64_t n, U abs_mask, U inf) {
  const U* v = static_cast<const U*>(p);
  bool any = false;
  for (int64_t i = 0; i < n; ++i) any |= (v[i] & abs_mask) == inf;
  return any;
}
bool any_inf(DType dt, const void* p, int64_t n) {
  switch (dt) {
    case DType::f32: return any_inf_bits<uint32_t>(p, n, 0x7fffffffu, 0x7f800000u);
    case DType::f16: return any_inf_bits<uint16_t>(p, n, 0x7fff, 0x7c00);
    case DType::bf16: return any_inf_bits<uint16_t>(p, n, 0x7fff, 0x7f80);
    case DType::u8: break;
  }
  throw Error("packed weights: scales must be float32, float16 or bfloat16, got " + std::string(dtype_name(dt)));
}

// PackedMat::finite of a matrix whose scales are in place.
void mark_finite(PackedMat& m, const MatGeom& g, ThreadPool* pool) {
  m.finite.assign(size_t(g.experts), 0);
  const int64_t n = g.meta_per_expert();
  const uint8_t* s = static_cast<const uint8_t*>(m.scales.data());
  auto task = [&](int64_t e) {
    m.finite[size_t(e)] = !any_inf(g.scale_dtype, s + size_t(e * n) * dtype_size(g.scale_dtype), n);
  };
  if (pool)
    pool->parallel_for(g.experts, task);
  else
    for (int64_t e = 0; e < g.experts; ++e) task(e);
}

}  // namespace

std::vector<NamedTensor> CpuPackedExperts::to_blobs() const {
  std::vector<NamedTensor> out;
  for (const PartPlan* pp : parts_of(plan_)) {
    const std::string n = part_name(pp->geom.part);
    const PackedMat& m = mat(pp->geom.part);
    out.push_back({n + ".codes", m.codes});
    out.push_back({n + ".scales", m.scales});
    if (!m.zero_points.empty()) out.push_back({n + ".zero_points", m.zero_points});
    if (!m.bias.empty()) out.push_back({n + ".bias", m.bias});
  }
  return out;
}

std::unique_ptr<CpuPackedExperts> pack_experts(const MoeSpec& s, RawExperts raw, ThreadPool* pool) {
  auto packed = std::make_unique<CpuPackedExperts>(s, make_plan(s));
  const LayerPlan& plan = packed->plan();
  const auto parts = parts_of(plan);
  for (size_t pi = 0; pi < parts.size(); ++pi) {
    const PartPlan& pp = *parts[pi];
    const MatGeom& g = pp.geom;
    PackedMat& m = packed->mat(g.part);
    m = alloc_mat(g);
    const RawMatrix& src = source_of(raw, pp.source);
    // Tasks of ~64 tiles keep both threads busy on a small expert and the task overhead negligible.
    const int64_t chunk = 64, per_expert = (g.tiles + chunk - 1) / chunk;
    const size_t ssz = dtype_size(g.scale_dtype);
    auto task = [&](int64_t i) {
      const int64_t e = i / per_expert, t0 = (i % per_expert) * chunk, t1 = std::min(t0 + chunk, g.tiles);
      for (int64_t t = t0; t < t1; ++t) {
        TileDst d;
        d.codes = m.codes.data_as<uint8_t>() + e * g.codes_per_expert() + g.code_offset(t, 0, 0);
        d.scales = static_cast<uint8_t*>(m.scales.data()) + size_t(e * g.meta_per_expert() + g.meta_offset(t, 0, 0)) * ssz;
        d.zero_points = g.zero_points ? m.zero_points.data_as<uint8_t>() + e * g.meta_per_expert() + g.meta_offset(t, 0, 0) : nullptr;
        d.bias = g.bias ? m.bias.data_as<float>() + e * g.rows() + t * kTileRows : nullptr;
        pack_tile(s, pp, src, e, t, d);
      }
    };
    const int64_t n = g.experts * per_expert;
    if (pool)
      pool->parallel_for(n, task);
    else
      for (int64_t i = 0; i < n; ++i) task(i);
    mark_finite(m, g, pool);
    // Free the raw matrix once no later part reads it: the transient extra memory is one matrix.
    const bool later = pi + 1 < parts.size() && parts[pi + 1]->source == pp.source;
    if (!later) {
      RawMatrix& r = pp.source == Fc::fc1 ? raw.fc1 : pp.source == Fc::fc2 ? raw.fc2 : *raw.fc3;
      r = RawMatrix{};
    }
  }
  return packed;
}

std::unique_ptr<CpuPackedExperts> packed_from_blobs(const MoeSpec& s, const std::vector<NamedTensor>& blobs) {
  auto packed = std::make_unique<CpuPackedExperts>(s, make_plan(s));
  std::vector<bool> used(blobs.size(), false);
  auto take = [&](const std::string& name, DType dt, const Shape& shape, bool required) -> Tensor {
    for (size_t i = 0; i < blobs.size(); ++i) {
      if (blobs[i].name != name) continue;
      const Tensor& t = blobs[i].tensor;
      if (t.empty()) throw Error("packed file: blob " + name + " is empty");
      if (t.dtype() != dt)
        throw Error("packed file: blob " + name + ": expected dtype " + std::string(dtype_name(dt)) + ", got " +
                    std::string(dtype_name(t.dtype())));
      if (t.shape() != shape)
        throw Error("packed file: blob " + name + ": expected shape " + shape_str(shape) + " (" +
                    std::to_string(shape_numel(shape) * int64_t(dtype_size(dt))) + " bytes), got " +
                    shape_str(t.shape()) + " (" + std::to_string(t.nbytes()) + " bytes)");
      used[i] = true;
      return t;
    }
    if (required) throw Error("packed file: blob " + name + " is missing (layout " + packed_tag(s).to_string() + ")");
    return Tensor();
  };
  for (const PartPlan* pp : parts_of(packed->plan())) {
    const MatGeom& g = pp->geom;
    const std::string n = part_name(g.part);
    PackedMat& m = packed->mat(g.part);
    m.codes = take(n + ".codes", DType::u8, {g.experts, g.tiles, g.jbytes, kTileRows}, true);
    m.scales = take(n + ".scales", g.scale_dtype, {g.experts, g.tiles, g.nb, kTileRows}, true);
    if (g.zero_points) m.zero_points = take(n + ".zero_points", DType::u8, {g.experts, g.tiles, g.nb, kTileRows}, true);
    if (g.bias) m.bias = take(n + ".bias", DType::f32, {g.experts, g.rows()}, true);
    mark_finite(m, g, nullptr);
  }
  for (size_t i = 0; i < blobs.size(); ++i)
    if (!used[i]) throw Error("packed file: unexpected blob " + blobs[i].name + " for " + s.to_string());
  return packed;
}

RawExperts unpack_experts(const CpuPackedExperts& packed) {
  const MoeSpec& s = packed.spec();
  RawExperts raw;
  auto init = [&](RawMatrix& m, Fc fc) {
    m.weights = Tensor(DType::u8, raw_weight_shape(s, fc));
    m.scales = Tensor(s.scale_dtype, raw_scale_shape(s, fc));
    if (has_zp(s, fc)) m.zero_points = Tensor(DType::u8, raw_zero_point_shape(s, fc));
    if (has_bias(s, fc)) m.bias = Tensor(s.act_dtype, raw_bias_shape(s, fc));
  };
  init(raw.fc1, Fc::fc1);
  init(raw.fc2, Fc::fc2);
  if (s.has_fc3()) {
    raw.fc3.emplace();
    init(*raw.fc3, Fc::fc3);
  }
  const int zpack = s.pack();
  for (const PartPlan* pp : parts_of(packed.plan())) {
    const MatGeom& g = pp->geom;
    const PackedMat& m = packed.mat(g.part);
    RawMatrix& r = const_cast<RawMatrix&>(source_of(raw, pp->source));
    const int64_t N = fc_rows(s, pp->source), J = g.K / g.pack();
    const size_t ssz = dtype_size(g.scale_dtype);
    for (int64_t e = 0; e < g.experts; ++e)
      for (int64_t row = 0; row < g.rows(); ++row) {
        const int64_t n = pp->row_source(row).row;
        if (n < 0) continue;
        const int64_t t = row / kTileRows, l = row % kTileRows;
        const uint8_t* codes = m.codes.data_as<uint8_t>() + e * g.codes_per_expert();
        uint8_t* w = r.weights.data_as<uint8_t>() + (e * N + n) * J;
        for (int64_t j = 0; j < J; ++j) w[j] = codes[g.code_offset(t, l, j)];
        for (int64_t b = 0; b < g.nb; ++b) {
          const int64_t mo = e * g.meta_per_expert() + g.meta_offset(t, b, l);
          std::memcpy(static_cast<uint8_t*>(r.scales.data()) + size_t((e * N + n) * g.nb + b) * ssz,
                      static_cast<const uint8_t*>(m.scales.data()) + size_t(mo) * ssz, ssz);
          if (g.zero_points) {
            const int z = m.zero_points.data_as<uint8_t>()[mo];
            uint8_t* zp = r.zero_points->data_as<uint8_t>();
            if (s.block_wise()) {
              const int64_t per_row = (g.nb + zpack - 1) / zpack;
              zp[(e * N + n) * per_row + b / zpack] |= uint8_t(z << ((b % zpack) * s.bits));
            } else {
              zp[e * ((N + zpack - 1) / zpack) + n / zpack] |= uint8_t(z << ((n % zpack) * s.bits));
            }
          }
        }
        if (g.bias)
          store_from_float(s.act_dtype, r.bias->data(), e * N + n, m.bias.data_as<float>()[e * g.rows() + row]);
      }
  }
  return raw;
}

std::string dump_layout(const MatGeom& g, int64_t row, int64_t col, int64_t block_size) {
  const int64_t t = row / kTileRows, l = row % kTileRows, j = col / g.pack(), p = col % g.pack();
  const int64_t b = block_size > 0 ? col / block_size : 0;
  StrBuilder os;
  os << "cpu-t16-w" << g.bits << ": " << part_name(g.part) << " row " << row << " col " << col << " -> codes[e][" << t
     << "][" << j << "][" << l << "] bits " << p * g.bits << ".." << (p + 1) * g.bits - 1 << ", scale[e][" << t << "]["
     << b << "][" << l << "]";
  return os.str();
}

}  // namespace qmoe::cpu
