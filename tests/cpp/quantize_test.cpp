// Tests of the raw-format quantizer (contract §5-6): the worked example of §5.4, goldens produced by
// ONNX Runtime 1.32's quantize_matmul_{2,4,8}bits (so this binary checks ORT agreement without ORT;
// tests/python/test_quantize_ort.py compares against the live ORT on random matrices), edge blocks,
// error messages, and the dequantize(quantize(w)) error bound.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "qmoe/error.h"
#include "qmoe/quantize.h"

namespace qmoe {
namespace {

TensorView view_f32(const std::vector<float>& v, Shape shape) { return TensorView{DType::f32, std::move(shape), v.data()}; }

std::vector<uint8_t> bytes_of(const Tensor& t) {
  const uint8_t* p = static_cast<const uint8_t*>(t.data());
  return std::vector<uint8_t>(p, p + t.nbytes());
}

std::vector<uint8_t> from_hex(const std::string& h) {
  std::vector<uint8_t> out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) out.push_back(uint8_t(std::stoul(h.substr(i, 2), nullptr, 16)));
  return out;
}

std::string hex(const std::vector<uint8_t>& b) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (uint8_t x : b) (s += d[x >> 4]) += d[x & 15];
  return s;
}

// Fails with the first differing byte index and both values.
void expect_bytes(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what << ": byte count";
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(got[i], want[i]) << what << ": first difference at byte " << i << "\n got  " << hex(got) << "\n want "
                               << hex(want);
}

TEST(Quantize, WorkedExampleSymmetric4BitRowWise) {
  // Contract §5.4.
  const std::vector<float> w = {0.5f, -1.0f, 0.25f, 0.75f, 2.0f, 1.0f, -0.5f, 0.0f};
  const QuantizedMatrix q = quantize_matrix(view_f32(w, {2, 4}), QuantizeOptions{4, 0, true, DType::f32});
  EXPECT_EQ(q.weights.shape(), (Shape{2, 2}));
  EXPECT_EQ(q.scales.shape(), (Shape{2}));
  EXPECT_FALSE(q.zero_points.has_value());
  expect_bytes(bytes_of(q.weights), {0x0C, 0xEA, 0x40, 0x8A}, "weights");
  EXPECT_EQ(q.scales.data_as<float>()[0], 0.125f);
  EXPECT_EQ(q.scales.data_as<float>()[1], -0.25f);
  // Every value of the example is a multiple of its scale, so the round trip is exact.
  const Tensor d = dequantize_matrix(q, 4, 0);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(d.data_as<float>()[i], w[size_t(i)]) << "element " << i;
}

TEST(Quantize, WorkedExampleZeroPointByte0x97) {
  // Asymmetric row-wise: row 0 spans [-7, 8] and row 1 [-9, 6], both with scale 1, so the zero
  // points are 7 and 9 and pack along N into one byte, row 0 in the low nibble: 0x97.
  const std::vector<float> w = {-7, 8, 0, 1, -9, 6, 2, 3};
  const QuantizedMatrix q = quantize_matrix(view_f32(w, {2, 4}), QuantizeOptions{4, 0, false, DType::f32});
  ASSERT_TRUE(q.zero_points.has_value());
  EXPECT_EQ(q.zero_points->shape(), (Shape{1}));
  expect_bytes(bytes_of(*q.zero_points), {0x97}, "zero_points");
  EXPECT_EQ(q.scales.data_as<float>()[0], 1.0f);
  EXPECT_EQ(q.scales.data_as<float>()[1], 1.0f);
  // codes row 0: 0 15 7 8; row 1: 0 15 11 12.
  expect_bytes(bytes_of(q.weights), {0xF0, 0x87, 0xF0, 0xCB}, "weights");
  const Tensor d = dequantize_matrix(q, 4, 0);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(d.data_as<float>()[i], w[size_t(i)]) << "element " << i;
}

TEST(Dequantize, WorkedExampleWithGivenZeroPoints) {
  // §5.4 codes with the zero-point byte 0x97: W = s * (q - z), z = 7 for row 0 and 9 for row 1.
  QuantizedMatrix q;
  q.weights = Tensor(DType::u8, {2, 2});
  const uint8_t wb[4] = {0x0C, 0xEA, 0x40, 0x8A};
  std::memcpy(q.weights.data(), wb, 4);
  q.scales = Tensor(DType::f32, {2});
  q.scales.data_as<float>()[0] = 0.125f;
  q.scales.data_as<float>()[1] = -0.25f;
  q.zero_points = Tensor(DType::u8, {1});
  q.zero_points->data_as<uint8_t>()[0] = 0x97;
  const Tensor d = dequantize_matrix(q, 4, 0);
  const int codes[8] = {12, 0, 10, 14, 0, 4, 10, 8};
  for (int i = 0; i < 8; ++i) {
    const float want = (i < 4 ? 0.125f : -0.25f) * float(codes[i] - (i < 4 ? 7 : 9));
    EXPECT_EQ(d.data_as<float>()[i], want) << "element " << i;
  }
}

// Goldens from ORT 1.32 (quantize_matmul_{bits}bits, block 16, fp32) on a 4 x 40 matrix:
// w[n][k] = float(((37n + 11k) mod 23) - 11) / 7 * (n + 1), with row 2's block 1 all zero and row 3's
// block 0 alternating +-1.5 (a |max| == |min| tie). K = 40 is not a multiple of the block (3 blocks,
// the last one 8 long). Scales are big-endian fp32 bit patterns; ORT's zero points [N, ceil(3/pack)].
struct OrtGolden {
  int bits;
  bool symmetric;
  const char* weights;
  const char* scales;
  const char* zero_points;
};
const OrtGolden kOrtGoldens[] = {
    {2, true, "b87b77773722eededdcc23e2eedddddd88b8c8dcdd8d88bbaaaaaaaae2ee33333333227277778d88",
     "3f4924923f4924923f0000003fc924923fc92492bfb6db6e4016db6e800000004016db6e3f400000c049249240492492", ""},
    {2, false, "b9bb77776766eeeedddd66e6eededd9d99b93723dd9999bb00000000e6ee77777777dd9d88888c88",
     "3f8618613f8618613f2aaaab40061861400618613fb6db6d4049249300000000404924933f800000405b6db7402aaaab", "aa9aa2a6"},
    {4, true,
     "807f7f6f5e4d4c3c2b1a1909f8f7f7e6f3f2e1d01a1909f8f7f7e6d5c4c4b3a29191807fa0a1b2c2c4b3a29191807f7f888888888888"
     "888809f8f7f70f0f0f0f0f0f0f0f0819192a3b4c4c5da2919180",
     "3e4924923e4924923e0000003ec924923ec92492beb6db6e3f16db6e800000003f16db6e3e400000bf4924923f492492", ""},
    {4, false,
     "706f6e5d4c4c3b2a2a190808f7e6d6c5f3d2c1b0190808f7e6d6c5c4b4a3a2928180706f3f2e1d0cb4b3a39291817f7f000000000000"
     "000019f8f7e71f1f1f1f1f1f1f1ff6e5e4d4c3b2a190f3e2d1c0",
     "3e568d693e568d693e0888893ed68d693ed68d693e9249243f20ea0f000000003f20ea0f3e4ccccd3f2f8af93f088889",
     "778777850888688c"},
    {8, true,
     "0080ff74f469e95ddd51d146c63aba2faf23a317970c8c0080ff74f469e95ddd37ff25ee12db00c9a317970c8c0080ff74f469e95ddd"
     "51d146c63aba2faf23a317970c8c0080ff74009a0da61ab326c03aba2faf23a317970c8c0080ff74f46980808080808080808080808080"
     "8080808c0080ff74f469e9ff00ff00ff00ff00ff00ff00ff00ff0080008c0c9717a323af2fba3ac646d15123a317970c8c0080",
     "3c4924923c4924923c0000003cc924923cc92492bcb6db6e3d16db6e800000003d16db6e3c400000bd4924923d492492", ""},
    {8, false,
     "007fff73f368e75cdc51d045c539b92ead22a217960b8b007fff73f368e75cdc36ff24ec12da00c8a217960b8b007fff73f368e75cdc"
     "51d045c539b92ead22a217960b8b007fff73ff33ee22dd11cc003aba2fae23a318970c8c0180ff74f4690000000000000000000000000"
     "00000008c0180ff74f469e8ff01ff01ff01ff01ff01ff01ff01ff0163ff55f147e339d42ac61cb80eaa009c36ff24ec12da00c8",
     "3c49ee813c49ee813c0080813cc9ee813cc9ee813c89ae403d1772e1000000003d1772e13c40c0c13d2537813d008081",
     "7f7f7f7f7f558000808063c8"},
};

std::vector<float> golden_matrix() {
  const int N = 4, K = 40;
  std::vector<float> w(size_t(N * K));
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k) {
      float v = float(((n * 37 + k * 11) % 23) - 11) / 7.0f * float(n + 1);
      if (n == 2 && k >= 16 && k < 32) v = 0.0f;
      if (n == 3 && k < 16) v = k % 2 == 0 ? 1.5f : -1.5f;
      w[size_t(n * K + k)] = v;
    }
  return w;
}

TEST(Quantize, MatchesOrtGoldens) {
  const std::vector<float> w = golden_matrix();
  for (const OrtGolden& g : kOrtGoldens) {
    SCOPED_TRACE("bits=" + std::to_string(g.bits) + (g.symmetric ? " symmetric" : " asymmetric") + " block=16 [4, 40]");
    const QuantizedMatrix q = quantize_matrix(view_f32(w, {4, 40}), QuantizeOptions{g.bits, 16, g.symmetric, DType::f32});
    EXPECT_EQ(q.scales.shape(), (Shape{4, 3}));
    expect_bytes(bytes_of(q.weights), from_hex(g.weights), "weights");
    std::vector<uint8_t> scale_be;
    for (int i = 0; i < 12; ++i) {
      uint32_t u = float_to_bits(q.scales.data_as<float>()[i]);
      for (int s = 24; s >= 0; s -= 8) scale_be.push_back(uint8_t(u >> s));
    }
    expect_bytes(scale_be, from_hex(g.scales), "scales");
    if (g.symmetric) {
      EXPECT_FALSE(q.zero_points.has_value());
    } else {
      ASSERT_TRUE(q.zero_points.has_value());
      EXPECT_EQ(q.zero_points->shape(), (Shape{4, (3 + 8 / g.bits - 1) / (8 / g.bits)}));
      expect_bytes(bytes_of(*q.zero_points), from_hex(g.zero_points), "zero_points");
    }
  }
}

TEST(Quantize, AllZeroBlock) {
  const std::vector<float> w(2 * 32, 0.0f);
  for (int bits : {2, 4, 8}) {
    SCOPED_TRACE("bits=" + std::to_string(bits));
    const int mid = 1 << (bits - 1), pack = 8 / bits;
    uint8_t mid_byte = 0;
    for (int i = 0; i < pack; ++i) mid_byte |= uint8_t(mid << (i * bits));
    // Symmetric: scale -0/2^(bits-1) = -0.0 (sign bit kept, as ORT stores it), every code the midpoint.
    QuantizedMatrix s = quantize_matrix(view_f32(w, {2, 32}), QuantizeOptions{bits, 16, true, DType::f16});
    for (int i = 0; i < 4; ++i) EXPECT_EQ(s.scales.data_as<uint16_t>()[i], 0x8000) << "scale " << i;
    for (uint8_t b : bytes_of(s.weights)) ASSERT_EQ(b, mid_byte);
    // Asymmetric: scale 0, zero point 0, codes 0.
    QuantizedMatrix a = quantize_matrix(view_f32(w, {2, 32}), QuantizeOptions{bits, 16, false, DType::f32});
    for (int i = 0; i < 4; ++i) EXPECT_EQ(float_to_bits(a.scales.data_as<float>()[i]), 0u) << "scale " << i;
    for (uint8_t b : bytes_of(a.weights)) ASSERT_EQ(b, 0);
    // ceil(2 blocks / pack) bytes per row; for 2-bit the two unused slots hold the midpoint 2.
    const std::vector<uint8_t> zp = bytes_of(*a.zero_points);
    const uint8_t want = bits == 2 ? uint8_t(2 << 4 | 2 << 6) : 0;
    for (uint8_t b : zp) ASSERT_EQ(b, want);
    const Tensor d = dequantize_matrix(a, bits, 16);
    for (int i = 0; i < 64; ++i) ASSERT_EQ(d.data_as<float>()[i], 0.0f) << "element " << i;
  }
}

TEST(Quantize, TieOfMaxAndMinPicksNegative) {
  // |max| == |min| = 2: the extreme is -2, so the scale is +2/8 = 0.25 and -2 gets code 0; +2 would be
  // code 16 and clamps to 15.
  const std::vector<float> w = {2.0f, -2.0f, 1.0f, 0.0f};
  const QuantizedMatrix q = quantize_matrix(view_f32(w, {1, 4}), QuantizeOptions{4, 0, true, DType::f32});
  EXPECT_EQ(q.scales.data_as<float>()[0], 0.25f);
  expect_bytes(bytes_of(q.weights), {0x0F, 0x8C}, "weights");
  // Without the tie the sign follows the extreme: max 3 > |min| 2 gives a negative scale.
  const std::vector<float> w2 = {3.0f, -2.0f, 1.0f, 0.0f};
  const QuantizedMatrix q2 = quantize_matrix(view_f32(w2, {1, 4}), QuantizeOptions{4, 0, true, DType::f32});
  EXPECT_EQ(q2.scales.data_as<float>()[0], -0.375f);
}

TEST(Quantize, KNotAMultipleOfTheBlock) {
  // K = 40, block 32: blocks of 32 and 8. The second block's scale sees only its 8 values.
  std::vector<float> w(40, 1.0f);
  w[35] = -4.0f;
  const QuantizedMatrix q = quantize_matrix(view_f32(w, {1, 40}), QuantizeOptions{4, 32, false, DType::f32});
  EXPECT_EQ(q.scales.shape(), (Shape{1, 2}));
  EXPECT_EQ(q.weights.shape(), (Shape{1, 20}));
  EXPECT_EQ(q.scales.data_as<float>()[0], 1.0f / 15.0f);  // range [0, 1]
  EXPECT_EQ(q.scales.data_as<float>()[1], 5.0f / 15.0f);  // range [-4, 1]
  // zero points: block 0 -> 0, block 1 -> round(4 / (1/3)) = 12, one byte: 0xC0.
  expect_bytes(bytes_of(*q.zero_points), {0xC0}, "zero_points");
}

TEST(Quantize, ExpertsEqualPerMatrixAndThreadCountDoesNotMatter) {
  // E * N * K is large enough that quantize_experts splits rows over threads; quantize_matrix on
  // one expert stays on one thread. Row-wise zero points are packed across the split.
  const int64_t E = 4, N = 257, K = 512;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> w(size_t(E * N * K));
  for (float& v : w) v = nd(rng);
  for (bool sym : {true, false}) {
    for (int64_t bs : {int64_t(0), int64_t(64)}) {
      SCOPED_TRACE(std::string(sym ? "symmetric" : "asymmetric") + " block=" + std::to_string(bs) + " seed=7");
      const QuantizeOptions opt{2, bs, sym, DType::bf16};
      const RawMatrix all = quantize_experts(view_f32(w, {E, N, K}), opt);
      const std::vector<uint8_t> wa = bytes_of(all.weights), sa = bytes_of(all.scales);
      const std::vector<uint8_t> za = sym ? std::vector<uint8_t>() : bytes_of(*all.zero_points);
      for (int64_t e = 0; e < E; ++e) {
        std::vector<float> one(w.begin() + e * N * K, w.begin() + (e + 1) * N * K);
        const QuantizedMatrix q = quantize_matrix(view_f32(one, {N, K}), opt);
        const std::vector<uint8_t> wq = bytes_of(q.weights), sq = bytes_of(q.scales);
        expect_bytes(std::vector<uint8_t>(wa.begin() + e * wq.size(), wa.begin() + (e + 1) * wq.size()), wq, "weights");
        expect_bytes(std::vector<uint8_t>(sa.begin() + e * sq.size(), sa.begin() + (e + 1) * sq.size()), sq, "scales");
        if (!sym) {
          const std::vector<uint8_t> zq = bytes_of(*q.zero_points);
          expect_bytes(std::vector<uint8_t>(za.begin() + e * zq.size(), za.begin() + (e + 1) * zq.size()), zq, "zp");
        }
      }
    }
  }
}

// Relative precision of a T2 value (half an ulp at 1).
float t2_eps(DType t) { return t == DType::f32 ? 0x1p-24f : t == DType::f16 ? 0x1p-11f : 0x1p-8f; }

TEST(Quantize, DequantizeRoundTripWithinHalfAScale) {
  // Unclamped codes: q = round(v/s + z), so |v - s(q - z)| <= |s|/2 up to the rounding of v * (1/s)
  // (a few fp32 ulps of v). Clamped codes: the range maps onto [0, 2^bits - 1] only up to the T2
  // rounding of s (relative eps) times at most 2^bits codes, plus half a code from the zero point's
  // rounding; the symmetric top code loses a whole step by design (+v* would need code 2^bits).
  for (uint32_t seed : {1u, 2u, 3u}) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    const int64_t N = 9, K = 200;  // K = 200: not a multiple of any block size tried
    std::vector<float> w(size_t(N * K));
    for (float& v : w) v = nd(rng) * (1.0f + float(rng() % 4));
    for (int k = 0; k < 48; ++k) w[size_t(3 * K + k)] = 0.0f;  // zero blocks for small block sizes
    for (DType in_t : {DType::f32, DType::f16, DType::bf16}) {
      // Store the weights in the input dtype; compare against the values the quantizer actually saw.
      std::vector<uint16_t> w16(w.size());
      std::vector<float> seen(w.size());
      for (size_t i = 0; i < w.size(); ++i) {
        w16[i] = in_t == DType::f16 ? float_to_half(w[i]) : float_to_bf16(w[i]);
        seen[i] = in_t == DType::f32 ? w[i] : in_t == DType::f16 ? half_to_float(w16[i]) : bf16_to_float(w16[i]);
      }
      const TensorView wv{in_t, {N, K}, in_t == DType::f32 ? static_cast<const void*>(w.data()) : w16.data()};
      for (int bits : {2, 4, 8})
        for (bool sym : {true, false})
          for (int64_t bs : {int64_t(0), int64_t(16), int64_t(32), int64_t(64), int64_t(128), int64_t(256)})
            for (DType t2 : {DType::f32, DType::f16, DType::bf16}) {
              const std::string cfg = "seed=" + std::to_string(seed) + " in=" + std::string(dtype_name(in_t)) +
                                      " bits=" + std::to_string(bits) + (sym ? " sym" : " asym") +
                                      " block=" + std::to_string(bs) + " T2=" + std::string(dtype_name(t2));
              const QuantizedMatrix q = quantize_matrix(wv, QuantizeOptions{bits, bs, sym, t2});
              const Tensor d = dequantize_matrix(q, bits, bs);
              const int64_t eb = bs > 0 ? bs : K, nb = (K + eb - 1) / eb;
              const int qmax = (1 << bits) - 1;
              for (int64_t n = 0; n < N; ++n)
                for (int64_t k = 0; k < K; ++k) {
                  const float s = std::fabs(load_as_float(t2, q.scales.data(), n * nb + k / eb));
                  const int code = raw_code(q.weights.data_as<uint8_t>(), K, bits, n, k);
                  const float v = seen[size_t(n * K + k)], got = d.data_as<float>()[n * K + k];
                  float tol = 0.5f * s;
                  if (code == 0 || code == qmax) tol = (sym ? 1.0f : 0.5f) * s + float(qmax + 1) * t2_eps(t2) * s;
                  tol += 4 * 0x1p-24f * std::fabs(v);
                  ASSERT_LE(std::fabs(got - v), tol) << cfg << " at [" << n << ", " << k << "]: w=" << v
                                                      << " dequantized=" << got << " scale=" << s << " code=" << code;
                }
            }
    }
  }
}

TEST(Quantize, ErrorsNameTheProblem) {
  const std::vector<float> w(64, 1.0f);
  auto msg = [&](Shape shape, QuantizeOptions opt) -> std::string {
    try {
      quantize_matrix(view_f32(w, std::move(shape)), opt);
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_NE(msg({4, 16}, {3, 0, true, DType::f32}).find("bits must be 2, 4 or 8, got 3"), std::string::npos);
  EXPECT_NE(msg({4, 16}, {4, 24, true, DType::f32}).find("power of two >= 16, got 24"), std::string::npos);
  EXPECT_NE(msg({4, 16}, {4, 8, true, DType::f32}).find("got 8"), std::string::npos);
  EXPECT_EQ(msg({8, 8}, {2, 0, true, DType::f32}), "no error");   // K = 8 holds whole 2-bit bytes
  EXPECT_EQ(msg({16, 4}, {8, 0, true, DType::f32}), "no error");  // any K at 8 bits
  EXPECT_NE(msg({64}, {4, 0, true, DType::f32}).find("2-D [N, K]"), std::string::npos);
  EXPECT_NE(msg({4, 16}, {4, 0, true, DType::u8}).find("scale_dtype"), std::string::npos);
  std::vector<float> odd(3 * 6, 1.0f);
  try {
    quantize_matrix(view_f32(odd, {3, 6}), {2, 0, true, DType::f32});
    FAIL() << "K = 6 at 2 bits must be rejected";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("multiple of 4"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("K = 6"), std::string::npos) << e.what();
  }
  std::vector<float> nan = w;
  nan[21] = std::nanf("");
  try {
    quantize_matrix(view_f32(nan, {4, 16}), {4, 0, true, DType::f32});
    FAIL() << "NaN must be rejected";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("row 1, column 5"), std::string::npos) << e.what();
  }
  std::vector<float> big(16, 1e6f);
  try {
    quantize_matrix(view_f32(big, {1, 16}), {2, 0, true, DType::f16});
    FAIL() << "a scale of 5e5 does not fit float16";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("overflows scale dtype float16"), std::string::npos) << e.what();
  }
}

TEST(Dequantize, ChecksShapes) {
  const std::vector<float> w(2 * 3 * 32, 0.5f);
  RawMatrix m = quantize_experts(view_f32(w, {2, 3, 32}), QuantizeOptions{4, 16, false, DType::f32});
  EXPECT_EQ(m.weights.shape(), (Shape{2, 3, 16}));
  EXPECT_EQ(m.scales.shape(), (Shape{2, 3, 2}));
  EXPECT_EQ(m.zero_points->shape(), (Shape{2, 3, 1}));
  EXPECT_EQ(dequantize_experts(m, 4, 16, 32).shape(), (Shape{2, 3, 32}));
  EXPECT_THROW(dequantize_experts(m, 4, 16, 30), Error);  // K does not fit the weights
  EXPECT_THROW(dequantize_experts(m, 4, 0, 32), Error);   // row-wise expects scales [2, 3]
  try {
    dequantize_experts(m, 4, 32, 32);
    FAIL() << "block 32 means one block per row";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("scales: expected shape [2, 3, 1], got [2, 3, 2]"), std::string::npos)
        << e.what();
  }
  RawMatrix r = quantize_experts(view_f32(w, {2, 3, 32}), QuantizeOptions{8, 0, false, DType::f16});
  EXPECT_EQ(r.zero_points->shape(), (Shape{2, 3}));  // 8-bit: one byte per row
  EXPECT_EQ(r.scales.shape(), (Shape{2, 3}));
  r.scales = r.scales.reshaped({2, 3, 1});  // the [E, N, 1] spelling of row-wise scales
  const Tensor d = dequantize_experts(r, 8, 0, 32);
  for (int i = 0; i < 2 * 3 * 32; ++i) ASSERT_NEAR(d.data_as<float>()[i], 0.5f, 0.5f / 255) << i;
}

}  // namespace
}  // namespace qmoe
