// MoeSpec validation, dtype conversions and raw-shape rules.
#include <gtest/gtest.h>

#include <cmath>

#include "qmoe/error.h"
#include "qmoe/raw_experts.h"
#include "qmoe/spec.h"

using namespace qmoe;

namespace {

MoeSpec small_spec() {
  MoeSpec s;
  s.num_experts = 4;
  s.hidden = 32;
  s.inter = 16;
  s.k = 2;
  return s;
}

// Expects validate() to throw a message containing `needle`.
void expect_invalid(const MoeSpec& s, const std::string& needle) {
  try {
    s.validate();
    FAIL() << "expected an error containing '" << needle << "' for " << s.to_string();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Spec, ValidDefaults) { EXPECT_NO_THROW(small_spec().validate()); }

TEST(Spec, RejectsBadFields) {
  MoeSpec s = small_spec();
  s.k = 5;
  expect_invalid(s, "k: expected in [1, E=4], got 5");
  s = small_spec();
  s.k = 0;
  expect_invalid(s, "k: expected");
  s = small_spec();
  s.bits = 3;
  expect_invalid(s, "expert_weight_bits: expected 2, 4 or 8, got 3");
  s = small_spec();
  s.block_size = 24;
  expect_invalid(s, "block_size: expected a power of two >= 16");
  s.block_size = 8;
  expect_invalid(s, "block_size");
  s = small_spec();
  s.hidden = 33;
  expect_invalid(s, "hidden_size (H): expected a multiple of 2");
  s = small_spec();
  s.swiglu_fusion = SwigluFusion::interleaved;
  expect_invalid(s, "swiglu_fusion: expected 0 with activation 'relu'");
  s = small_spec();
  s.use_sparse_mixer = true;
  s.k = 3;
  expect_invalid(s, "k: expected 2 when use_sparse_mixer");
  s = small_spec();
  s.activation = Activation::swiglu;
  s.swiglu_limit = -1;
  expect_invalid(s, "swiglu_limit");
  s = small_spec();
  s.act_dtype = DType::u8;
  expect_invalid(s, "T (activation dtype)");
}

TEST(Spec, ParseActivation) {
  EXPECT_EQ(parse_activation("swiglu"), Activation::swiglu);
  EXPECT_THROW(parse_activation("tanh"), Error);
}

TEST(Spec, Fc1RowsFollowFusion) {
  MoeSpec s = small_spec();
  s.activation = Activation::swiglu;
  EXPECT_EQ(s.fc1_rows(), 16);
  EXPECT_TRUE(s.has_fc3());
  s.swiglu_fusion = SwigluFusion::interleaved;
  EXPECT_EQ(s.fc1_rows(), 32);
  EXPECT_FALSE(s.has_fc3());
}

TEST(RawShapes, RowAndBlockWise) {
  MoeSpec s = small_spec();
  s.block_size = 16;
  s.hidden = 40;  // not a multiple of the block: nb = 3
  EXPECT_EQ(raw_weight_shape(s, Fc::fc1), (Shape{4, 16, 20}));
  EXPECT_EQ(raw_scale_shape(s, Fc::fc1), (Shape{4, 16, 3}));
  EXPECT_EQ(raw_zero_point_shape(s, Fc::fc1), (Shape{4, 16, 2}));  // ceil(3 / 2)
  EXPECT_EQ(raw_weight_shape(s, Fc::fc2), (Shape{4, 40, 8}));
  s.block_size = 0;
  EXPECT_EQ(raw_scale_shape(s, Fc::fc2), (Shape{4, 40}));
  EXPECT_EQ(raw_zero_point_shape(s, Fc::fc2), (Shape{4, 20}));
}

TEST(DType, HalfRoundTripsAndRounds) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = half_to_float(uint16_t(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(half_to_float(float_to_half(f))));
      continue;
    }
    ASSERT_EQ(float_to_half(f), h) << "half bits " << h;
  }
  EXPECT_EQ(float_to_half(1.0f + 1.0f / 2048), 0x3c00);  // tie rounds to even
  EXPECT_EQ(float_to_half(1.0f + 3.0f / 2048), 0x3c02);
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00);  // rounds up to inf
  EXPECT_EQ(float_to_half(5.96e-8f), 0x0001);
}

TEST(DType, Bf16RoundTripsAndRounds) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = bf16_to_float(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_bf16(f), h);
  }
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f808000u)), 0x3f80);  // tie to even
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f818000u)), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
}
