// Synthetic layers (include/qmoe/synthetic.h): determinism of the seed, validity of the quantized
// weights, and float_forward checked against the reference backend on weights that quantize exactly
// (so the two must agree to fp32 rounding, and any routing/activation/bias slip shows).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "qmoe/error.h"
#include "qmoe/quantize.h"
#include "qmoe/reference.h"
#include "qmoe/synthetic.h"

using namespace qmoe;

namespace {

MoeSpec small_spec(Activation act, SwigluFusion fusion = SwigluFusion::separate) {
  MoeSpec s;
  s.num_experts = 5;
  s.k = 2;
  s.hidden = 32;
  s.inter = 24;
  s.bits = 4;
  s.block_size = 16;
  s.activation = act;
  s.swiglu_fusion = fusion;
  s.normalize_routing_weights = true;
  s.fc1_bias = s.fc2_bias = true;
  s.fc3_bias = s.has_fc3();
  s.fc1_zero_points = true;
  return s;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

}  // namespace

TEST(Synthetic, SameSeedSameLayerOtherSeedOtherLayer) {
  const MoeSpec s = small_spec(Activation::silu);
  const SyntheticLayer a = make_synthetic_layer(s, {7, 8, 0, true});
  const SyntheticLayer b = make_synthetic_layer(s, {7, 8, 0, true});
  const SyntheticLayer c = make_synthetic_layer(s, {8, 8, 0, true});
  EXPECT_TRUE(same_bytes(a.weights.fc1, b.weights.fc1));
  EXPECT_TRUE(same_bytes(a.raw.fc2.weights, b.raw.fc2.weights));
  EXPECT_TRUE(same_bytes(a.input, b.input));
  EXPECT_TRUE(same_bytes(*a.router_weights, *b.router_weights));
  EXPECT_FALSE(same_bytes(a.weights.fc1, c.weights.fc1));
  EXPECT_FALSE(same_bytes(a.input, c.input));
}

TEST(Synthetic, TokenCountDoesNotChangeWeights) {
  const MoeSpec s = small_spec(Activation::relu);
  const SyntheticLayer a = make_synthetic_layer(s, {3, 4});
  const SyntheticLayer b = make_synthetic_layer(s, {3, 40});
  EXPECT_TRUE(same_bytes(a.weights.fc2, b.weights.fc2));
  EXPECT_EQ(b.input.shape(), (Shape{40, 32}));
}

TEST(Synthetic, WeightScaleIsKaimingLike) {
  MoeSpec s = small_spec(Activation::relu);
  s.hidden = 256;
  s.inter = 64;
  const FloatExperts w = make_float_experts(s, 1);
  double sum = 0, sq = 0;
  const float* p = w.fc1.data_as<float>();
  const int64_t n = w.fc1.numel();
  for (int64_t i = 0; i < n; ++i) sum += p[i], sq += double(p[i]) * p[i];
  const double mean = sum / double(n), var = sq / double(n) - mean * mean;
  // n = 5*64*256 = 81920 samples of N(0, 1/256): the mean's standard error is 1.1e-4, the
  // variance's relative standard error 0.5%; bounds at ~5 sigma.
  EXPECT_NEAR(mean, 0.0, 6e-4);
  EXPECT_NEAR(var * 256, 1.0, 0.03);
}

TEST(Synthetic, QuantizedWeightsMatchTheSpec) {
  for (auto [act, fusion] : {std::pair{Activation::swiglu, SwigluFusion::separate},
                             std::pair{Activation::swiglu, SwigluFusion::interleaved},
                             std::pair{Activation::gelu, SwigluFusion::separate}}) {
    MoeSpec s = small_spec(act, fusion);
    s.act_dtype = DType::f16;
    s.scale_dtype = DType::bf16;
    const SyntheticLayer L = make_synthetic_layer(s, {1, 6, 2});
    EXPECT_NO_THROW(validate_raw(s, L.raw)) << s.to_string();
    EXPECT_EQ(L.raw.fc3.has_value(), s.has_fc3());
    EXPECT_TRUE(L.raw.fc1.zero_points.has_value());
    EXPECT_FALSE(L.raw.fc2.zero_points.has_value());
    EXPECT_EQ(L.input.shape(), (Shape{2, 3, 32}));
    EXPECT_EQ(L.raw.fc1.bias->dtype(), DType::f16);
  }
}

TEST(Synthetic, BadOptionsAreErrors) {
  const MoeSpec s = small_spec(Activation::relu);
  EXPECT_THROW(make_synthetic_layer(s, {0, 5, 2}), Error);  // batch does not divide tokens
  MoeSpec bad = s;
  bad.k = 9;
  EXPECT_THROW(make_synthetic_layer(bad, {}), Error);
  FloatExperts w = make_float_experts(s, 0);
  MoeSpec swiglu = small_spec(Activation::swiglu);
  EXPECT_THROW(quantize_float_experts(swiglu, w), Error);  // no fc3 in the weights
}

// With float weights equal to the dequantized quantized weights, the unquantized layer and the
// reference on the quantized layer compute the same function; only fp32 summation order differs.
TEST(Synthetic, FloatForwardMatchesReferenceOnExactlyQuantizableWeights) {
  for (auto [act, fusion] : {std::pair{Activation::swiglu, SwigluFusion::separate},
                             std::pair{Activation::swiglu, SwigluFusion::interleaved},
                             std::pair{Activation::swiglu, SwigluFusion::concatenated},
                             std::pair{Activation::gelu, SwigluFusion::separate},
                             std::pair{Activation::identity, SwigluFusion::separate}}) {
    MoeSpec s = small_spec(act, fusion);
    s.swiglu_limit = act == Activation::swiglu ? 1.5f : s.swiglu_limit;
    SyntheticLayer L = make_synthetic_layer(s, {11, 9, 3, true});
    FloatExperts deq;
    deq.fc1 = dequantize_experts(L.raw.fc1, s.bits, s.block_size, s.hidden);
    deq.fc2 = dequantize_experts(L.raw.fc2, s.bits, s.block_size, s.inter);
    if (s.has_fc3()) deq.fc3 = dequantize_experts(*L.raw.fc3, s.bits, s.block_size, s.hidden);
    deq.fc1_bias = L.weights.fc1_bias;
    deq.fc2_bias = L.weights.fc2_bias;
    deq.fc3_bias = L.weights.fc3_bias;
    const Tensor want = reference_forward(s, L.raw, L.inputs());
    const Tensor got = float_forward(s, deq, L.inputs());
    ASSERT_EQ(got.shape(), want.shape());
    EXPECT_LT(relative_error(got.view(), want.view()), 1e-6) << s.to_string();
    // and the quantized layer differs from the unquantized one by a quantization-sized amount
    const double qerr = relative_error(want.view(), float_forward(s, L.weights, L.inputs()).view());
    EXPECT_GT(qerr, 1e-3) << s.to_string();
    EXPECT_LT(qerr, 0.5) << s.to_string();
  }
}

TEST(Synthetic, RelativeError) {
  Tensor a(DType::f32, {3}), b(DType::f16, {3});
  const float av[3] = {1, 2, 2};
  for (int i = 0; i < 3; ++i) {
    a.data_as<float>()[i] = av[i];
    store_from_float(DType::f16, b.data(), i, i == 2 ? 2.5f : av[i]);
  }
  // ||(0, 0, -0.5)|| / ||(1, 2, 2.5)||
  EXPECT_NEAR(relative_error(a.view(), b.view()), 0.5 / std::sqrt(11.25), 1e-12);
  EXPECT_THROW(relative_error(a.view(), Tensor(DType::f32, {2}).view()), Error);
}
