// The raw-format quantizer and dequantizer (contract §5-6).
//
// This file is where qmoe's raw bytes come from when a user starts from float weights (the Python
// module, the CLI's synthetic models, tests). It must agree byte for byte with ONNX Runtime's
// quantize_matmul_{2,4,8}bits (MLAS BlockwiseQuantizer), because models quantized by either tool are
// compared against each other. The details that make the bytes identical, each one observed on ORT:
//   * the block range is scanned with `v < min` / `v > max` from +-FLT_MAX (not clamped to 0 for the
//     symmetric extreme, clamped to 0 for asymmetric);
//   * symmetric: the extreme keeps its sign and ties go to the minimum (the negative value), and the
//     scale is -v*/2^(bits-1) computed in fp32 and only then rounded to T2 (an all-zero block stores
//     -0.0);
//   * the reciprocal is taken from the *stored* (T2-rounded) scale, 0 for a zero scale;
//   * q = clamp(roundf(v * recip + zp)) with the product rounded to fp32 before the add: this file
//     is compiled with -ffp-contract=off (see CMakeLists.txt) so no FMA fuses it;
//   * asymmetric zero points come from the unrounded fp32 scale: clamp(roundf(0 - min/scale));
//   * zero-point nibbles past the last block hold the default zero point 2^(bits-1).
// Work is split over rows on a few std::threads; rows never share an output byte except row-wise zero
// points, which are packed after the parallel part.
#include "qmoe/quantize.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <exception>
#include <thread>
#include <vector>

#include "qmoe/error.h"

namespace qmoe {
namespace {

void check_bits(int bits, const char* who) {
  if (bits != 2 && bits != 4 && bits != 8)
    throw Error(std::string(who) + ": bits must be 2, 4 or 8, got " + std::to_string(bits));
}

void check_block_size(int64_t bs, const char* who) {
  if (bs == 0) return;
  if (bs < 16 || (bs & (bs - 1)) != 0)
    throw Error(std::string(who) + ": block_size must be 0 (row-wise) or a power of two >= 16, got " +
                std::to_string(bs));
}

void check_float(DType t, const std::string& name) {
  if (!is_float(t))
    throw Error(name + ": expected dtype float32, float16 or bfloat16, got " + std::string(dtype_name(t)));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Converts one row of K elements to fp32 (exact for every input dtype).
void load_row(DType t, const void* base, int64_t offset, int64_t K, float* out) {
  switch (t) {
    case DType::f32: std::copy_n(static_cast<const float*>(base) + offset, K, out); return;
    case DType::f16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < K; ++i) out[i] = half_to_float(p[i]);
      return;
    }
    case DType::bf16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < K; ++i) out[i] = bf16_to_float(p[i]);
      return;
    }
    case DType::u8: break;
  }
  throw Error("quantize: weights must be float32, float16 or bfloat16");
}

// Runs fn(begin, end) over [0, n) on up to hardware_concurrency threads; rethrows the first error.
// Small jobs stay on the calling thread: a thread start costs more than quantizing a few rows.
template <class Fn>
void parallel_rows(int64_t n, int64_t work_per_row, Fn fn) {
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t min_work = int64_t(1) << 18;
  int64_t threads = std::min<int64_t>(hw, std::max<int64_t>(1, n * work_per_row / min_work));
  threads = std::min(threads, std::max<int64_t>(n, 1));
  if (threads <= 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  const int64_t chunk = ceil_div(n, threads);
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t b = t * chunk, e = std::min(n, b + chunk);
    if (b >= e) break;
    pool.emplace_back([&, t, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        errors[size_t(t)] = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (auto& err : errors)
    if (err) std::rethrow_exception(err);
}

// Geometry shared by all rows of one quantization call.
struct Plan {
  int bits;
  int64_t K;      // columns
  int64_t bs;     // elements per block (K when row-wise)
  int64_t nb;     // blocks per row
  bool symmetric;
  DType scale_dtype;
};

// Quantizes one row: writes K/pack code bytes, nb scales (T2, at scales + first_scale) and, when
// asymmetric, nb unpacked zero points (one byte each). `row` is only for error messages.
void quantize_row(const Plan& p, const float* v, uint8_t* codes, void* scales, int64_t first_scale,
                  uint8_t* zps, const std::string& name, int64_t row) {
  const int qmax = (1 << p.bits) - 1;
  const int mid = 1 << (p.bits - 1);
  const int pack = 8 / p.bits;
  std::fill_n(codes, p.K / pack, uint8_t(0));
  for (int64_t b = 0; b < p.nb; ++b) {
    const int64_t k0 = b * p.bs, k1 = std::min(p.K, k0 + p.bs);
    float mn = FLT_MAX, mx = -FLT_MAX;
    for (int64_t k = k0; k < k1; ++k) {
      if (!std::isfinite(v[k]))
        throw Error(name + ": non-finite value " + std::to_string(v[k]) + " at row " + std::to_string(row) +
                    ", column " + std::to_string(k) + "; only finite weights can be quantized");
      if (v[k] < mn) mn = v[k];
      if (v[k] > mx) mx = v[k];
    }
    float scale_f;
    int zp = mid;
    if (p.symmetric) {
      // The extreme keeps its sign and maps to code 0, so the 2^(bits-1) negative codes cover it;
      // on a tie |max| == |min| ORT keeps min.
      const float vstar = std::fabs(mx) > std::fabs(mn) ? mx : mn;
      scale_f = -vstar / float(mid);
    } else {
      mn = std::min(mn, 0.0f);
      mx = std::max(mx, 0.0f);
      scale_f = (mx - mn) / float(qmax);
      float zfp = mn;  // 0 here: a zero scale means mn == mx == 0
      if (scale_f != 0.0f) zfp = 0.0f - mn / scale_f;
      zp = zfp < 0.0f ? 0 : zfp > float(qmax) ? qmax : int(std::roundf(zfp));
      zps[b] = uint8_t(zp);
    }
    store_from_float(p.scale_dtype, scales, first_scale + b, scale_f);
    const float stored = load_as_float(p.scale_dtype, scales, first_scale + b);
    if (!std::isfinite(stored))
      throw Error(name + ": the scale of row " + std::to_string(row) + ", block " + std::to_string(b) + " (" +
                  std::to_string(scale_f) + ") overflows scale dtype " + std::string(dtype_name(p.scale_dtype)));
    const float recip = stored != 0.0f ? 1.0f / stored : 0.0f;
    const float zpf = float(zp);
    for (int64_t k = k0; k < k1; ++k) {
      const float prod = v[k] * recip;  // rounded to fp32 before the add, as in ORT (no FMA)
      const float q = std::clamp(std::roundf(prod + zpf), 0.0f, float(qmax));
      codes[k / pack] |= uint8_t(int(q) << ((k % pack) * p.bits));
    }
  }
}

struct Shapes {
  int64_t E, N, K;
};

// Quantizes w viewed as E experts of [N, K]; `rank3` picks the output shapes ([E, ...] or not).
QuantizedMatrix quantize_impl(const TensorView& w, const QuantizeOptions& opt, Shapes s, bool rank3,
                              const std::string& name) {
  check_bits(opt.bits, "quantize");
  check_block_size(opt.block_size, "quantize");
  check_float(w.dtype, name);
  check_float(opt.scale_dtype, "quantize: scale_dtype");
  if (!w.data && w.numel() > 0) throw Error(name + ": null data pointer");
  const int pack = 8 / opt.bits;
  if (s.K % pack != 0)
    throw Error(name + ": columns K must be a multiple of " + std::to_string(pack) + " for " +
                std::to_string(opt.bits) + "-bit codes (" + std::to_string(pack) + " per byte), got K = " +
                std::to_string(s.K) + " in shape " + shape_str(w.shape));
  if (s.K == 0) throw Error(name + ": columns K must be > 0, got shape " + shape_str(w.shape));

  Plan p{opt.bits, s.K, opt.block_size > 0 ? opt.block_size : s.K, 1, opt.symmetric, opt.scale_dtype};
  p.nb = ceil_div(s.K, p.bs);
  const bool block_wise = opt.block_size > 0;

  auto lead = [&](Shape tail) {
    if (rank3) tail.insert(tail.begin(), s.E);
    return tail;
  };
  QuantizedMatrix out;
  out.weights = Tensor(DType::u8, lead({s.N, s.K / pack}));
  out.scales = Tensor(opt.scale_dtype, block_wise ? lead({s.N, p.nb}) : lead({s.N}));
  // One unpacked zero point per (row, block); packed below once all rows are done.
  std::vector<uint8_t> zp_unpacked(opt.symmetric ? 0 : size_t(s.E * s.N * p.nb));

  const int64_t rows = s.E * s.N;
  uint8_t* codes = out.weights.data_as<uint8_t>();
  void* scales = out.scales.data();
  parallel_rows(rows, s.K, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(size_t(s.K));
    for (int64_t r = r0; r < r1; ++r) {
      load_row(w.dtype, w.data, r * s.K, s.K, buf.data());
      quantize_row(p, buf.data(), codes + r * (s.K / pack), scales, r * p.nb,
                   opt.symmetric ? nullptr : zp_unpacked.data() + r * p.nb, name, r);
    }
  });

  if (!opt.symmetric) {
    const uint8_t mid = uint8_t(1 << (opt.bits - 1));
    if (block_wise) {
      // [E, N, ceil(nb/pack)]: block b of row n at byte b/pack, bit (b%pack)*bits; unused slots = mid.
      const int64_t per_row = ceil_div(p.nb, pack);
      Tensor zp(DType::u8, lead({s.N, per_row}));
      uint8_t* z = zp.data_as<uint8_t>();
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < per_row * pack; ++j) {
          const uint8_t val = j < p.nb ? zp_unpacked[size_t(r * p.nb + j)] : mid;
          z[r * per_row + j / pack] |= uint8_t(val << ((j % pack) * opt.bits));
        }
      out.zero_points = std::move(zp);
    } else {
      // [E, ceil(N/pack)]: packed along N, row n at byte n/pack; unused slots = mid.
      const int64_t per_expert = ceil_div(s.N, pack);
      Tensor zp(DType::u8, lead({per_expert}));
      uint8_t* z = zp.data_as<uint8_t>();
      for (int64_t e = 0; e < s.E; ++e)
        for (int64_t n = 0; n < per_expert * pack; ++n) {
          const uint8_t val = n < s.N ? zp_unpacked[size_t(e * s.N + n)] : mid;
          z[e * per_expert + n / pack] |= uint8_t(val << ((n % pack) * opt.bits));
        }
      out.zero_points = std::move(zp);
    }
  }
  return out;
}

}  // namespace

QuantizedMatrix quantize_matrix(const TensorView& w, const QuantizeOptions& opt) {
  if (w.rank() != 2) throw Error("quantize_matrix: weights must be 2-D [N, K], got shape " + shape_str(w.shape));
  return quantize_impl(w, opt, Shapes{1, w.shape[0], w.shape[1]}, false, "quantize_matrix: weights");
}

RawMatrix quantize_experts(const TensorView& w, const QuantizeOptions& opt) {
  if (w.rank() != 3)
    throw Error("quantize_experts: weights must be 3-D [E, N, K], got shape " + shape_str(w.shape));
  QuantizedMatrix q = quantize_impl(w, opt, Shapes{w.shape[0], w.shape[1], w.shape[2]}, true,
                                    "quantize_experts: weights");
  RawMatrix m;
  m.weights = std::move(q.weights);
  m.scales = std::move(q.scales);
  m.zero_points = std::move(q.zero_points);
  return m;
}

namespace {

// Dequantizes E experts of [N, K]; weights/scales/zero points already checked by the caller.
Tensor dequantize_impl(const Tensor& weights, const Tensor& scales, const std::optional<Tensor>& zero_points,
                       int bits, int64_t block_size, Shapes s, Shape out_shape) {
  const int pack = 8 / bits;
  const int64_t bs = block_size > 0 ? block_size : s.K;
  const int64_t nb = ceil_div(s.K, bs);
  const int mid = 1 << (bits - 1);
  Tensor out(DType::f32, std::move(out_shape));
  float* o = out.data_as<float>();
  const uint8_t* w = weights.data_as<uint8_t>();
  const uint8_t* z = zero_points ? zero_points->data_as<uint8_t>() : nullptr;
  const int64_t zrow = ceil_div(nb, pack);           // block-wise zero-point bytes per row
  const int64_t zexp = ceil_div(s.N, pack);          // row-wise zero-point bytes per expert
  const int mask = (1 << bits) - 1;
  parallel_rows(s.E * s.N, s.K, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t e = r / s.N, n = r % s.N;
      for (int64_t b = 0; b < nb; ++b) {
        const float sc = load_as_float(scales.dtype(), scales.data(), r * nb + b);
        int zp = mid;
        if (z) {
          zp = block_size > 0 ? (z[r * zrow + b / pack] >> ((b % pack) * bits)) & mask
                              : (z[e * zexp + n / pack] >> ((n % pack) * bits)) & mask;
        }
        const int64_t k1 = std::min(s.K, (b + 1) * bs);
        for (int64_t k = b * bs; k < k1; ++k)
          o[r * s.K + k] = sc * float(raw_code(w + e * s.N * (s.K / pack), s.K, bits, n, k) - zp);
      }
    }
  });
  return out;
}

void expect_shape(const Tensor& t, const Shape& shape, const std::string& name) {
  if (t.shape() != shape) throw Error(name + ": expected shape " + shape_str(shape) + ", got " + shape_str(t.shape()));
}

}  // namespace

namespace {

// Checks weights/scales/zero points of E experts (rank3) or one matrix (!rank3) and dequantizes.
// Expected shapes are spelled the way the caller passed them, so a 2-D caller never sees [1, ...].
Tensor dequantize_checked(const Tensor& weights, const Tensor& scales, const std::optional<Tensor>& zero_points,
                          int bits, int64_t block_size, int64_t K, bool rank3, const std::string& who) {
  check_bits(bits, who.c_str());
  check_block_size(block_size, who.c_str());
  const int pack = 8 / bits;
  const int r = rank3 ? 3 : 2;
  if (weights.empty()) throw Error(who + ": weights missing");
  if (weights.dtype() != DType::u8)
    throw Error(who + ": weights: expected dtype uint8, got " + std::string(dtype_name(weights.dtype())));
  if (weights.rank() != r)
    throw Error(who + ": weights: expected " + (rank3 ? "3-D [E, N, K/pack]" : "2-D [N, K/pack]") + ", got shape " +
                shape_str(weights.shape()));
  if (K <= 0 || K % pack != 0 || weights.dim(r - 1) != K / pack)
    throw Error(who + ": K = " + std::to_string(K) + " does not fit weights of shape " + shape_str(weights.shape()) +
                " at " + std::to_string(bits) + " bits (expected K = " + std::to_string(weights.dim(r - 1) * pack) + ")");
  const Shapes s{rank3 ? weights.dim(0) : 1, weights.dim(r - 2), K};
  auto lead = [&](Shape tail) {
    if (rank3) tail.insert(tail.begin(), s.E);
    return tail;
  };
  if (scales.empty()) throw Error(who + ": scales missing");
  check_float(scales.dtype(), who + ": scales");
  const int64_t nb = block_size > 0 ? ceil_div(K, block_size) : 1;
  Shape want_scales = block_size > 0 ? lead({s.N, nb}) : lead({s.N});
  if (block_size == 0 && scales.rank() == r) want_scales.push_back(1);  // [.., N, 1] spells row-wise too
  expect_shape(scales, want_scales, who + ": scales");
  if (zero_points) {
    if (zero_points->dtype() != DType::u8)
      throw Error(who + ": zero_points: expected dtype uint8, got " + std::string(dtype_name(zero_points->dtype())));
    expect_shape(*zero_points, block_size > 0 ? lead({s.N, ceil_div(nb, pack)}) : lead({ceil_div(s.N, pack)}),
                 who + ": zero_points");
  }
  return dequantize_impl(weights, scales, zero_points, bits, block_size, s, lead({s.N, K}));
}

}  // namespace

Tensor dequantize_experts(const RawMatrix& m, int bits, int64_t block_size, int64_t K) {
  return dequantize_checked(m.weights, m.scales, m.zero_points, bits, block_size, K, true, "dequantize_experts");
}

Tensor dequantize_matrix(const QuantizedMatrix& q, int bits, int64_t block_size) {
  const int64_t K = q.weights.rank() == 2 && (bits == 2 || bits == 4 || bits == 8) ? q.weights.dim(1) * (8 / bits) : 0;
  return dequantize_checked(q.weights, q.scales, q.zero_points, bits, block_size, K, false, "dequantize_matrix");
}

}  // namespace qmoe
