// Bad-input matrix for the library (issue 7 item 4), the cases tests/python/test_cli_errors.py (files,
// tensors, attributes through `qmoe run`) does not reach: NaN/Inf in inputs, logits, router weights and
// scales; zero-size dims; T = 0 tokens; k = E; E = 1; enormous declared sizes; misaligned buffers;
// out-of-range enum values; wrong output tensors. docs/RELIABILITY.md lists every case with its
// expectation. Each runs on the reference backend and on the CPU backend (2 threads).
//
// Stated behaviour for non-finite values: never a crash, never an exception; every value is computed
// in fp32 with IEEE semantics, so a NaN propagates through sums and products to the outputs it feeds,
// except through relu, which is max(0, v) and maps NaN to 0 as IEEE 754-2008 maxNum does. The CPU
// backend must produce NaN/Inf in exactly the elements where the reference does, and tokens that do not
// touch the bad value must be bitwise unchanged.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "qmoe/backend.h"
#include "qmoe/error.h"
#include "qmoe/layer.h"
#include "qmoe/reference.h"
#include "qmoe/synthetic.h"

namespace {

using namespace qmoe;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

MoeSpec base_spec() {
  MoeSpec s;
  s.num_experts = 4, s.k = 2, s.hidden = 32, s.inter = 48, s.bits = 4, s.block_size = 16;
  s.activation = Activation::silu;
  return s;
}

struct Outputs {
  Tensor ref, cpu;
};

Tensor run_backend(Backend& be, const MoeSpec& s, const RawExperts& raw, const MoeInputs& in) {
  auto packed = be.prepack(s, raw);
  Tensor y(s.act_dtype, in.input.shape);
  be.run(*packed, in, y);
  return y;
}

Outputs run_both(const MoeSpec& s, const RawExperts& raw, const MoeInputs& in) {
  Outputs o;
  auto ref = make_reference_backend();
  o.ref = run_backend(*ref, s, raw, in);
  auto cpu = make_backend("cpu", LayerOptions{.threads = 2});
  o.cpu = run_backend(*cpu, s, raw, in);
  return o;
}

float at(const Tensor& t, int64_t i) { return load_as_float(t.dtype(), t.data(), i); }
int64_t cols(const Tensor& t) { return t.shape().back(); }

// "" if `a` and `b` are non-finite (NaN, +Inf, -Inf classified separately) in exactly the same
// elements; else the first element where they differ.
std::string same_nonfinite_mask(const Tensor& a, const Tensor& b) {
  auto cls = [](float v) { return std::isnan(v) ? 1 : std::isinf(v) ? (v > 0 ? 2 : 3) : 0; };
  for (int64_t i = 0; i < a.numel(); ++i)
    if (cls(at(a, i)) != cls(at(b, i))) {
      std::ostringstream os;
      os << "element " << i << " (row " << i / cols(a) << ", col " << i % cols(a) << "): reference " << at(a, i)
         << ", cpu " << at(b, i);
      return os.str();
    }
  return "";
}

// Rows != `except` bitwise equal in a and b.
std::string rows_equal_except(const Tensor& a, const Tensor& b, int64_t except) {
  const int64_t C = cols(a), es = int64_t(dtype_size(a.dtype()));
  for (int64_t r = 0; r < a.numel() / C; ++r) {
    if (r == except) continue;
    if (std::memcmp(static_cast<const uint8_t*>(a.data()) + r * C * es, static_cast<const uint8_t*>(b.data()) + r * C * es,
                    size_t(C * es)) != 0)
      return "row " + std::to_string(r) + " changed although it does not touch the bad value";
  }
  return "";
}

int64_t count_if(const Tensor& t, int64_t row, const std::function<bool(float)>& f) {
  int64_t n = 0;
  for (int64_t c = 0; c < cols(t); ++c) n += f(at(t, row * cols(t) + c));
  return n;
}

// Runs clean and with `poison` applied to a copy of the layer; checks no throw, same non-finite masks
// on both backends, and rows other than `row` unchanged. Returns the poisoned outputs.
Outputs poisoned_run(const MoeSpec& s, int64_t tokens, int64_t row, bool router_weights,
                     const std::function<void(SyntheticLayer&)>& poison) {
  SyntheticLayer l = make_synthetic_layer(s, {.seed = 99, .tokens = tokens, .router_weights = router_weights});
  const Outputs clean = run_both(s, l.raw, l.inputs());
  poison(l);
  Outputs bad;
  EXPECT_NO_THROW(bad = run_both(s, l.raw, l.inputs())) << s.to_string();
  if (bad.ref.empty() || bad.cpu.empty()) return bad;
  EXPECT_EQ(same_nonfinite_mask(bad.ref, bad.cpu), "") << s.to_string();
  if (row >= 0) {
    EXPECT_EQ(rows_equal_except(clean.ref, bad.ref, row), "") << "reference; " << s.to_string();
    EXPECT_EQ(rows_equal_except(clean.cpu, bad.cpu, row), "") << "cpu; " << s.to_string();
  }
  return bad;
}

// ---------------------------------------------------------------- NaN / Inf

TEST(BadInput, B01_NanInInputPropagatesThroughSilu) {
  const MoeSpec s = base_spec();
  const Outputs o = poisoned_run(s, 6, 2, false, [&](SyntheticLayer& l) {
    store_from_float(s.act_dtype, l.input.data(), 2 * s.hidden + 5, kNaN);
  });
  EXPECT_EQ(count_if(o.ref, 2, [](float v) { return std::isnan(v); }), s.hidden) << "reference row 2 must be all NaN";
  EXPECT_EQ(count_if(o.cpu, 2, [](float v) { return std::isnan(v); }), s.hidden) << "cpu row 2 must be all NaN";
}

TEST(BadInput, B02_NanInInputThroughReluIsMaxNum) {
  MoeSpec s = base_spec();
  s.activation = Activation::relu;
  const Outputs o = poisoned_run(s, 6, 2, false, [&](SyntheticLayer& l) {
    store_from_float(s.act_dtype, l.input.data(), 2 * s.hidden + 5, kNaN);
  });
  // relu(NaN) = max(0, NaN) = 0: every FC1 output of the row is NaN and becomes 0, so the row is the
  // FC2 bias mix (no bias here: exactly 0).
  EXPECT_EQ(count_if(o.ref, 2, [](float v) { return v == 0.f; }), s.hidden) << "reference row 2";
  EXPECT_EQ(count_if(o.cpu, 2, [](float v) { return v == 0.f; }), s.hidden) << "cpu row 2";
}

TEST(BadInput, B03_InfInInputIdentity) {
  MoeSpec s = base_spec();
  s.activation = Activation::identity;
  const Outputs o = poisoned_run(s, 5, 1, false, [&](SyntheticLayer& l) {
    store_from_float(s.act_dtype, l.input.data(), 1 * s.hidden, kInf);
  });
  EXPECT_EQ(count_if(o.ref, 1, [](float v) { return std::isfinite(v); }), 0) << "row 1 must be all non-finite";
}

TEST(BadInput, B04_NanScaleReachesExactlyOneColumnWhenKEqualsE) {
  MoeSpec s = base_spec();
  s.k = s.num_experts;  // every token uses expert 1 with a softmax weight > 0
  s.block_size = 0;
  const int64_t e = 1, n = 3, T = 6;
  const Outputs o = poisoned_run(s, T, -1, false, [&](SyntheticLayer& l) {
    // fc2 row-wise scales [E, H]: row n of expert e is output column n.
    store_from_float(s.scale_dtype, l.raw.fc2.scales.data(), e * s.hidden + n, kNaN);
  });
  for (const Tensor* y : {&o.ref, &o.cpu})
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < s.hidden; ++c)
        EXPECT_EQ(std::isnan(at(*y, t * s.hidden + c)), c == n)
            << (y == &o.ref ? "reference" : "cpu") << " token " << t << " col " << c;
}

TEST(BadInput, B05_InfScaleInFc1) {
  const MoeSpec s = base_spec();
  poisoned_run(s, 8, -1, false, [&](SyntheticLayer& l) { store_from_float(s.scale_dtype, l.raw.fc1.scales.data(), 0, kInf); });
}

// Routing with bad logits stays defined (a NaN never wins a comparison, docs/DESIGN.md), and the
// softmax over all E logits then carries the NaN into every weight: the token's row is all NaN.
TEST(BadInput, B06_NanRouterLogit) {
  const MoeSpec s = base_spec();
  const Outputs o = poisoned_run(s, 6, 3, false, [&](SyntheticLayer& l) {
    store_from_float(s.act_dtype, l.router_probs.data(), 3 * s.num_experts + 0, kNaN);
  });
  EXPECT_EQ(count_if(o.ref, 3, [](float v) { return std::isnan(v); }), s.hidden) << "reference row 3";
  EXPECT_EQ(count_if(o.cpu, 3, [](float v) { return std::isnan(v); }), s.hidden) << "cpu row 3";
}

// softmax of all -Inf is 0/0: NaN weights, row all NaN.
TEST(BadInput, B07_AllRouterLogitsMinusInf) {
  const MoeSpec s = base_spec();
  const Outputs o = poisoned_run(s, 6, 4, false, [&](SyntheticLayer& l) {
    for (int64_t e = 0; e < s.num_experts; ++e) store_from_float(s.act_dtype, l.router_probs.data(), 4 * s.num_experts + e, -kInf);
  });
  EXPECT_EQ(count_if(o.ref, 4, [](float v) { return std::isnan(v); }), s.hidden) << "reference row 4";
  EXPECT_EQ(count_if(o.cpu, 4, [](float v) { return std::isnan(v); }), s.hidden) << "cpu row 4";
}

TEST(BadInput, B08_NanRouterWeight) {
  MoeSpec s = base_spec();
  s.normalize_routing_weights = true;
  const Outputs o = poisoned_run(s, 6, 0, true, [&](SyntheticLayer& l) {
    for (int64_t e = 0; e < s.num_experts; ++e) store_from_float(s.act_dtype, l.router_weights->data(), e, kNaN);
  });
  EXPECT_EQ(count_if(o.ref, 0, [](float v) { return std::isnan(v); }), s.hidden) << "reference row 0";
  EXPECT_EQ(count_if(o.cpu, 0, [](float v) { return std::isnan(v); }), s.hidden) << "cpu row 0";
}

TEST(BadInput, B09_Fp16OutputOverflowsToInf) {
  MoeSpec s = base_spec();
  s.act_dtype = DType::f16;
  s.scale_dtype = DType::f32;
  const Outputs o = poisoned_run(s, 4, -1, false, [&](SyntheticLayer& l) {
    for (int64_t i = 0; i < l.raw.fc2.scales.numel(); ++i) l.raw.fc2.scales.data_as<float>()[i] *= 1e6f;
  });
  int64_t infs = 0;
  for (int64_t i = 0; i < o.ref.numel(); ++i) infs += std::isinf(at(o.ref, i));
  EXPECT_GT(infs, 0) << "outputs beyond 65504 must round to +-Inf in float16";
}

// ---------------------------------------------------------------- sizes

TEST(BadInput, B10_ZeroTokens2D) {
  const MoeSpec s = base_spec();
  SyntheticLayer l = make_synthetic_layer(s, {.seed = 1, .tokens = 0});
  Outputs o;
  ASSERT_NO_THROW(o = run_both(s, l.raw, l.inputs()));
  EXPECT_EQ(o.ref.shape(), (Shape{0, s.hidden}));
  EXPECT_EQ(o.cpu.shape(), (Shape{0, s.hidden}));
}

TEST(BadInput, B11_ZeroTokens3DAndNullData) {
  const MoeSpec s = base_spec();
  SyntheticLayer l = make_synthetic_layer(s, {.seed = 1, .tokens = 2});
  MoeInputs in;
  in.input = TensorView{s.act_dtype, {2, 0, s.hidden}, nullptr};
  in.router_probs = TensorView{s.act_dtype, {0, s.num_experts}, nullptr};
  Outputs o;
  ASSERT_NO_THROW(o = run_both(s, l.raw, in));
  EXPECT_EQ(o.cpu.shape(), (Shape{2, 0, s.hidden}));
}

TEST(BadInput, B12_ZeroSizeSpecDims) {
  for (const char* field : {"num_experts", "hidden_size", "inter_size"}) {
    MoeSpec s = base_spec();
    if (field[0] == 'n') s.num_experts = 0, s.k = 0;
    if (field[0] == 'h') s.hidden = 0;
    if (field[0] == 'i') s.inter = 0;
    try {
      s.validate();
      ADD_FAILURE() << field << " = 0 accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  }
}

TEST(BadInput, B13_KEqualsE) {
  MoeSpec s = base_spec();
  s.k = s.num_experts;
  s.normalize_routing_weights = true;
  SyntheticLayer l = make_synthetic_layer(s, {.seed = 5, .tokens = 9});
  const Outputs o = run_both(s, l.raw, l.inputs());
  // Same fp32 math in another summation order: cpu_backend_test's bound (32 u (sqrt H + sqrt I) of the
  // output rms ~ 4e-5 here), rounded up.
  EXPECT_LT(relative_error(o.cpu.view(), o.ref.view()), 1e-4);
}

TEST(BadInput, B14_SingleExpertIgnoresRouting) {
  MoeSpec s = base_spec();
  s.num_experts = 1, s.k = 1;
  SyntheticLayer l = make_synthetic_layer(s, {.seed = 6, .tokens = 5});
  const Outputs a = run_both(s, l.raw, l.inputs());
  // softmax over one logit is exactly 1 whatever the logit, and normalizing by it changes nothing.
  for (int64_t t = 0; t < 5; ++t) store_from_float(s.act_dtype, l.router_probs.data(), t, float(t) * 1e3f - 7.f);
  MoeSpec sn = s;
  sn.normalize_routing_weights = true;
  const Outputs b = run_both(sn, l.raw, l.inputs());
  EXPECT_EQ(std::memcmp(a.ref.data(), b.ref.data(), a.ref.nbytes()), 0) << "reference";
  EXPECT_EQ(std::memcmp(a.cpu.data(), b.cpu.data(), a.cpu.nbytes()), 0) << "cpu";
}

TEST(BadInput, B15_KOutOfRange) {
  for (int64_t k : {int64_t(0), int64_t(-1), int64_t(5), std::numeric_limits<int64_t>::min()}) {
    MoeSpec s = base_spec();
    s.k = k;
    EXPECT_THROW(s.validate(), Error) << "k = " << k;
  }
}

RawExperts tiny_raw() {
  MoeSpec s = base_spec();
  return make_synthetic_layer(s, {.seed = 2, .tokens = 1}).raw;
}

// Enormous declared sizes with small buffers: refused by validation (naming a tensor), with no
// arithmetic overflow on the way (the sanitizer build turns an overflow into a failure).
void expect_refused(const MoeSpec& s, const char* what) {
  const RawExperts raw = tiny_raw();
  Tensor x(DType::f32, {1, 32}), r(DType::f32, {1, 4});
  MoeInputs in;
  in.input = TensorView{s.act_dtype, {1, s.hidden}, x.data()};
  in.router_probs = TensorView{s.act_dtype, {1, s.num_experts}, r.data()};
  try {
    s.validate();
    validate_raw(s, raw);
    (void)reference_forward(s, raw, in);
    ADD_FAILURE() << what << ": accepted " << s.to_string();
  } catch (const Error& e) {
    SUCCEED() << e.what();
  }
}

TEST(BadInput, B16_EnormousKDeclared) {
  MoeSpec s = base_spec();
  s.hidden = int64_t(1) << 40;
  expect_refused(s, "H = 2^40");
}

TEST(BadInput, B17_EnormousKWithHugeBlock) {
  MoeSpec s = base_spec();
  s.hidden = int64_t(1) << 62;
  s.block_size = int64_t(1) << 62;  // blocks(K) = (K + bs - 1) / bs must not overflow
  expect_refused(s, "H = block = 2^62");
}

TEST(BadInput, B18_EnormousInterFusedRowsOverflow) {
  MoeSpec s = base_spec();
  s.activation = Activation::swiglu, s.swiglu_fusion = SwigluFusion::interleaved;
  s.inter = int64_t(1) << 62;  // fc1_rows() = 2I = 2^63 overflows int64
  expect_refused(s, "I = 2^62 with fused SwiGLU");
}

TEST(BadInput, B19_EnormousE) {
  MoeSpec s = base_spec();
  s.num_experts = int64_t(1) << 40;
  expect_refused(s, "E = 2^40");
}

// ---------------------------------------------------------------- misaligned buffers

// Copies `t` into a buffer at byte offset `off` from 64-byte alignment; the returned holder owns it.
struct Shifted {
  std::vector<uint8_t> storage;
  void* p = nullptr;
};
Shifted shifted_copy(const Tensor& t, size_t off) {
  Shifted s;
  s.storage.resize(t.nbytes() + 128);
  uint8_t* base = s.storage.data();
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  s.p = base + off;
  std::memcpy(s.p, t.data(), t.nbytes());
  return s;
}

// A misaligned buffer must either be refused with qmoe::Error or give bitwise the aligned result.
void expect_misaligned_ok(const MoeSpec& s, bool shift_input, bool shift_logits, size_t off) {
  SyntheticLayer l = make_synthetic_layer(s, {.seed = 8, .tokens = 7});
  const Outputs want = run_both(s, l.raw, l.inputs());
  Shifted xi = shifted_copy(l.input, off), lo = shifted_copy(l.router_probs, off);
  MoeInputs in = l.inputs();
  if (shift_input) in.input.data = xi.p;
  if (shift_logits) in.router_probs.data = lo.p;
  try {
    const Outputs got = run_both(s, l.raw, in);
    EXPECT_EQ(std::memcmp(want.ref.data(), got.ref.data(), want.ref.nbytes()), 0) << "reference, offset " << off;
    EXPECT_EQ(std::memcmp(want.cpu.data(), got.cpu.data(), want.cpu.nbytes()), 0) << "cpu, offset " << off;
  } catch (const Error& e) {
    SUCCEED() << "refused: " << e.what();
  }
}

TEST(BadInput, B20_MisalignedInputF32) { expect_misaligned_ok(base_spec(), true, false, 1); }
TEST(BadInput, B21_MisalignedInputF16) {
  MoeSpec s = base_spec();
  s.act_dtype = DType::f16;
  expect_misaligned_ok(s, true, false, 1);
}
TEST(BadInput, B22_MisalignedRouterProbsF32) { expect_misaligned_ok(base_spec(), false, true, 2); }
TEST(BadInput, B23_InputAlignedTo4ButNot64) { expect_misaligned_ok(base_spec(), true, true, 4); }

TEST(BadInput, B24_MisalignedRawScalesAndWeights) {
  const MoeSpec s = base_spec();
  SyntheticLayer l = make_synthetic_layer(s, {.seed = 9, .tokens = 5});
  const Outputs want = run_both(s, l.raw, l.inputs());
  auto keep = std::make_shared<std::vector<Shifted>>();
  auto shift = [&](Tensor& t, size_t off) {
    keep->push_back(shifted_copy(t, off));
    t = Tensor::wrap(t.dtype(), t.shape(), keep->back().p, keep);
  };
  keep->reserve(4);
  RawExperts raw = l.raw;
  shift(raw.fc1.scales, 2);   // float32 at 2 mod 4
  shift(raw.fc1.weights, 1);  // bytes at 1 mod 64
  shift(raw.fc2.scales, 1);
  shift(raw.fc2.weights, 3);
  try {
    const Outputs got = run_both(s, raw, l.inputs());
    EXPECT_EQ(std::memcmp(want.ref.data(), got.ref.data(), want.ref.nbytes()), 0) << "reference";
    EXPECT_EQ(std::memcmp(want.cpu.data(), got.cpu.data(), want.cpu.nbytes()), 0) << "cpu";
  } catch (const Error& e) {
    SUCCEED() << "refused: " << e.what();
  }
}

// ---------------------------------------------------------------- invalid values a C++ caller can pass

TEST(BadInput, B25_ActivationEnumOutOfRange) {
  MoeSpec s = base_spec();
  s.activation = static_cast<Activation>(9);
  EXPECT_THROW(s.validate(), Error) << "validate() accepted activation value 9";
}

TEST(BadInput, B26_DTypeEnumOutOfRange) {
  MoeSpec s = base_spec();
  s.act_dtype = static_cast<DType>(7);
  EXPECT_THROW(s.validate(), Error) << "validate() accepted act_dtype value 7";
  MoeSpec s2 = base_spec();
  s2.scale_dtype = static_cast<DType>(200);
  EXPECT_THROW(s2.validate(), Error) << "validate() accepted scale_dtype value 200";
}

TEST(BadInput, B27_NonFiniteSwigluParameters) {
  for (int i = 0; i < 4; ++i) {
    MoeSpec s = base_spec();
    s.activation = Activation::swiglu, s.swiglu_fusion = SwigluFusion::interleaved;
    if (i == 0) s.swiglu_limit = kNaN;
    if (i == 1) s.activation_alpha = kInf;
    if (i == 2) s.activation_beta = -kInf;
    if (i == 3) s.activation_alpha = kNaN;
    EXPECT_THROW(s.validate(), Error) << "case " << i;
  }
}

TEST(BadInput, B28_OutputTensorOfWrongShapeOrDtype) {
  const MoeSpec s = base_spec();
  SyntheticLayer l = make_synthetic_layer(s, {.seed = 3, .tokens = 4});
  for (const char* name : {"reference", "cpu"}) {
    auto be = make_backend(name, LayerOptions{.backend = name, .threads = 2});
    auto packed = be->prepack(s, l.raw);
    Tensor small(s.act_dtype, {3, s.hidden}), wrong_dtype(DType::f16, {4, s.hidden});
    EXPECT_THROW(be->run(*packed, l.inputs(), small), Error) << name;
    EXPECT_THROW(be->run(*packed, l.inputs(), wrong_dtype), Error) << name;
  }
}

TEST(BadInput, B29_RouterWeightsWithSparseMixerRefused) {
  MoeSpec s = base_spec();
  s.use_sparse_mixer = true;
  SyntheticLayer l = make_synthetic_layer(s, {.seed = 4, .tokens = 3, .router_weights = true});
  auto ref = make_reference_backend();
  EXPECT_THROW(run_backend(*ref, s, l.raw, l.inputs()), Error);
  auto cpu = make_backend("cpu", LayerOptions{.threads = 2});
  EXPECT_THROW(run_backend(*cpu, s, l.raw, l.inputs()), Error);
}

TEST(BadInput, B30_InputDeclaredLargerThanRouterProbs) {
  // The input view claims 2^40 rows; router_probs has 4. Refused by the shape checks before any
  // output of that size is allocated or any input byte read.
  const MoeSpec s = base_spec();
  SyntheticLayer l = make_synthetic_layer(s, {.seed = 4, .tokens = 4});
  MoeInputs in = l.inputs();
  in.input.shape = {int64_t(1) << 40, s.hidden};
  EXPECT_THROW((void)reference_forward(s, l.raw, in), Error);
  auto cpu = make_backend("cpu", LayerOptions{.threads = 2});
  auto packed = cpu->prepack(s, l.raw);
  Tensor y(s.act_dtype, {4, s.hidden});
  EXPECT_THROW(cpu->run(*packed, in, y), Error);
}

}  // namespace
