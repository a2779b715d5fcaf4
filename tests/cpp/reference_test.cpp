// The scalar reference against hand-computed cases: routing rules, activations, dequantization and a
// tiny layer whose output can be worked out on paper. These pin the oracle itself to the contract.
#include <gtest/gtest.h>

#include <cmath>

#include "qmoe/error.h"
#include "qmoe/reference.h"
#include "qmoe/routing.h"

using namespace qmoe;

namespace {

MoeSpec spec4(int64_t k) {
  MoeSpec s;
  s.num_experts = 4;
  s.hidden = 2;
  s.inter = 2;
  s.k = k;
  s.bits = 8;
  return s;
}

}  // namespace

TEST(Routing, TopKTiesGoToLowerIndex) {
  MoeSpec s = spec4(2);
  const float logits[4] = {1.f, 3.f, 3.f, 2.f};
  Route r[2];
  route_token(s, logits, nullptr, r);
  EXPECT_EQ(r[0].expert, 1);
  EXPECT_EQ(r[1].expert, 2);
}

TEST(Routing, SoftmaxOverAllExpertsThenOptionalNormalize) {
  MoeSpec s = spec4(2);
  const float logits[4] = {0.f, 1.f, 2.f, 3.f};
  const double z = 1 + std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  Route r[2];
  route_token(s, logits, nullptr, r);
  EXPECT_EQ(r[0].expert, 3);
  EXPECT_NEAR(r[0].weight, std::exp(3.0) / z, 1e-6);
  EXPECT_NEAR(r[1].weight, std::exp(2.0) / z, 1e-6);
  s.normalize_routing_weights = true;
  route_token(s, logits, nullptr, r);
  EXPECT_NEAR(r[0].weight, std::exp(3.0) / (std::exp(3.0) + std::exp(2.0)), 1e-6);
  EXPECT_NEAR(r[0].weight + r[1].weight, 1.0, 1e-6);
}

TEST(Routing, RouterWeightsAreGatheredAndNormalized) {
  MoeSpec s = spec4(2);
  const float logits[4] = {0.f, 5.f, 4.f, 3.f};
  const float rw[4] = {9.f, 0.5f, 1.5f, 7.f};
  Route r[2];
  route_token(s, logits, rw, r);
  EXPECT_EQ(r[0].expert, 1);
  EXPECT_FLOAT_EQ(r[0].weight, 0.5f);
  EXPECT_FLOAT_EQ(r[1].weight, 1.5f);
  s.normalize_routing_weights = true;
  route_token(s, logits, rw, r);
  EXPECT_FLOAT_EQ(r[0].weight, 0.25f);
  EXPECT_FLOAT_EQ(r[1].weight, 0.75f);
}

TEST(Routing, SparseMixerMasksDistantLogits) {
  MoeSpec s = spec4(2);
  s.use_sparse_mixer = true;
  // Expert 0 is chosen first. Its softmax keeps logits within 2% of 10 relative to max(|l|, 10):
  // 9.9 qualifies ((10-9.9)/10 = 0.01 <= 0.02), 5 and 1 do not.
  const float logits[4] = {10.f, 9.9f, 5.f, 1.f};
  Route r[2];
  route_token(s, logits, nullptr, r);
  EXPECT_EQ(r[0].expert, 0);
  EXPECT_NEAR(r[0].weight, 1.0 / (1.0 + std::exp(-0.1)), 1e-6);
  // Second choice: expert 1 (max 9.9 among the rest); 5 and 1 are beyond 2%; expert 0 is removed.
  EXPECT_EQ(r[1].expert, 1);
  EXPECT_NEAR(r[1].weight, 1.0, 1e-6);
}

TEST(Activation, SwigluFusionModesAgree) {
  MoeSpec s = spec4(1);
  s.activation = Activation::swiglu;
  s.swiglu_limit = 7.f;
  s.activation_alpha = 1.702f;
  s.activation_beta = 1.f;
  const float gate[2] = {8.f, -1.f}, lin[2] = {-9.f, 0.5f};
  auto expected = [&](float g, float u) {
    g = std::min(g, 7.f);
    u = std::clamp(u, -7.f, 7.f);
    return g / (1 + std::exp(-1.702f * g)) * (u + 1.f);
  };
  float a[2];
  apply_activation(s, gate, lin, a);
  EXPECT_FLOAT_EQ(a[0], expected(8.f, -9.f));
  EXPECT_FLOAT_EQ(a[1], expected(-1.f, 0.5f));
  s.swiglu_fusion = SwigluFusion::interleaved;
  const float inter[4] = {8.f, -9.f, -1.f, 0.5f};
  apply_activation(s, inter, nullptr, a);
  EXPECT_FLOAT_EQ(a[0], expected(8.f, -9.f));
  s.swiglu_fusion = SwigluFusion::concatenated;
  const float concat[4] = {8.f, -1.f, -9.f, 0.5f};
  apply_activation(s, concat, nullptr, a);
  EXPECT_FLOAT_EQ(a[1], expected(-1.f, 0.5f));
}

TEST(Activation, GeluIsTheTanhForm) {
  MoeSpec s = spec4(1);
  s.activation = Activation::gelu;
  const float h[2] = {1.f, -2.f};
  float a[2];
  apply_activation(s, h, nullptr, a);
  EXPECT_NEAR(a[0], 0.8411920f, 1e-6);
  EXPECT_NEAR(a[1], -0.0454023f, 1e-6);
}

// One expert, identity activation, 8-bit codes with explicit zero points, worked out by hand.
TEST(Reference, TinyLayerByHand) {
  MoeSpec s;
  s.num_experts = 1;
  s.hidden = 2;
  s.inter = 2;
  s.k = 1;
  s.bits = 8;
  s.activation = Activation::identity;
  s.fc1_zero_points = true;
  s.fc2_bias = true;
  RawExperts raw;
  // fc1 codes [[130, 126], [128, 132]], zero points [128, 130], scales [0.5, 2] ->
  // W1 = [[1, -1], [-4, 4]]
  raw.fc1.weights = Tensor(DType::u8, {1, 2, 2});
  const uint8_t w1[4] = {130, 126, 128, 132};
  std::copy(w1, w1 + 4, raw.fc1.weights.data_as<uint8_t>());
  raw.fc1.scales = Tensor(DType::f32, {1, 2});
  raw.fc1.scales.data_as<float>()[0] = 0.5f;
  raw.fc1.scales.data_as<float>()[1] = 2.f;
  raw.fc1.zero_points = Tensor(DType::u8, {1, 2});
  raw.fc1.zero_points->data_as<uint8_t>()[0] = 128;
  raw.fc1.zero_points->data_as<uint8_t>()[1] = 130;
  // fc2 codes [[129, 128], [128, 127]], default zero 128, scales [1, -1] -> W2 = [[1, 0], [0, 1]]
  raw.fc2.weights = Tensor(DType::u8, {1, 2, 2});
  const uint8_t w2[4] = {129, 128, 128, 127};
  std::copy(w2, w2 + 4, raw.fc2.weights.data_as<uint8_t>());
  raw.fc2.scales = Tensor(DType::f32, {1, 2});
  raw.fc2.scales.data_as<float>()[0] = 1.f;
  raw.fc2.scales.data_as<float>()[1] = -1.f;
  raw.fc2.bias = Tensor(DType::f32, {1, 2});
  raw.fc2.bias->data_as<float>()[0] = 0.25f;
  raw.fc2.bias->data_as<float>()[1] = -0.25f;

  Tensor x(DType::f32, {1, 2}), logits(DType::f32, {1, 1});
  x.data_as<float>()[0] = 3.f;
  x.data_as<float>()[1] = 1.f;
  // h = W1 x = [2, -8]; y = W2 h + b = [2.25, -8.25]; weight = softmax of one logit = 1.
  Tensor y = reference_forward(s, raw, MoeInputs{x.view(), logits.view(), std::nullopt});
  EXPECT_FLOAT_EQ(y.data_as<float>()[0], 2.25f);
  EXPECT_FLOAT_EQ(y.data_as<float>()[1], -8.25f);

  // Row-wise zero points of 8-bit codes: one byte per row. A wrong shape is refused by name.
  raw.fc1.zero_points = Tensor(DType::u8, {1, 3});
  try {
    reference_forward(s, raw, MoeInputs{x.view(), logits.view(), std::nullopt});
    FAIL() << "mis-shaped zero points accepted";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "fc1_zero_points: expected shape [1, 2], got [1, 3]");
  }
}

TEST(Reference, RejectsBadInputs) {
  MoeSpec s = spec4(1);
  RawExperts raw;
  raw.fc1.weights = Tensor(DType::u8, raw_weight_shape(s, Fc::fc1));
  raw.fc1.scales = Tensor(DType::f32, raw_scale_shape(s, Fc::fc1));
  raw.fc2.weights = Tensor(DType::u8, raw_weight_shape(s, Fc::fc2));
  raw.fc2.scales = Tensor(DType::f32, raw_scale_shape(s, Fc::fc2));
  Tensor x(DType::f32, {3, 2}), logits(DType::f32, {3, 5});
  try {
    reference_forward(s, raw, MoeInputs{x.view(), logits.view(), std::nullopt});
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "router_probs: expected shape [3, 4], got [3, 5]");
  }
  Tensor xh(DType::f16, {3, 2}), lg(DType::f32, {3, 4});
  try {
    reference_forward(s, raw, MoeInputs{xh.view(), lg.view(), std::nullopt});
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "input: expected dtype float32 (T), got float16");
  }
  // Zero tokens: valid, empty output.
  Tensor x0(DType::f32, {0, 2}), l0(DType::f32, {0, 4});
  EXPECT_EQ(reference_forward(s, raw, MoeInputs{x0.view(), l0.view(), std::nullopt}).numel(), 0);
}
