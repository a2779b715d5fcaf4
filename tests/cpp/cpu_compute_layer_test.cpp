// The CPU backend's accuracy options (CpuBackendOptions::compute = "bf16", "int8" and "int8x3") on whole
// layers; every test runs once per mode (gtest parameters).
//
// 1. Agreement with the reference backend (the fp32 oracle), relative L2 over the output, within the
//    mode's stated tolerance:
//    bf16: ||bf16 - ref|| / ||ref|| <= 8e-3. Why: the mode rounds two things to bf16, the layer input (FC1's
//    x) and FC1's activated output (FC2's x), each by a relative error of at most 2^-8 (8 significant
//    bits), rms about 2^-8/sqrt(3) * 0.7 = 1.6e-3 (uniform in half an ulp; 0.7 = rms of 1/m over the
//    mantissa m in [1, 2)). Over a dot product of random-sign terms the output's relative rms error is
//    about the same; SwiGLU multiplies gate and linear halves (their errors add in quadrature), and
//    FC2 carries FC1's error through and adds its own rounding: about sqrt(3) * 1.6e-3 = 2.8e-3
//    expected (measured 2.2e-3 to 3.5e-3 on these layers, the largest at T = 1 where few elements
//    average). 8e-3 is ~3x the expected value, room for the spread over small random layers; a bug (a
//    wrong column, nibble, zero point or scale) costs O(1). With T = fp16/bf16 both results are also
//    rounded to T; they round apart only where the mode's error straddles a rounding boundary.
//    The per-GEMM worst-case bound, 2^-8 * sum |w x| + fp32 terms, is tested in cpu_bf16_kernel_test.cpp.
//    int8: ||int8 - ref|| / ||ref|| <= 4e-2. Why: the mode quantizes two things per row, the
//    layer input (FC1's x) and FC1's activated output (FC2's x), to sx * xq with sx = max|x| / 127; the
//    error per element is uniform in [-sx/2, sx/2], rms sx / sqrt(12) = max|x| / 440, i.e. c / 440
//    relative to the row's rms, where c = max|x| / rms(x) is the row's crest factor. Over a dot product
//    of random-sign terms the output's relative rms error is about the same. Layer inputs here have
//    c ~ 3 (7e-3); SwiGLU and silu outputs are heavy-tailed (a product of two near-Gaussian values),
//    c ~ 6-8 over a few hundred columns, so FC2 adds ~1.5e-2: measured 0.8e-2 to 1.9e-2 on these
//    layers (the largest for SwiGLU; relu/gelu ~1e-2). 4e-2 is ~2x the worst measured value, room for
//    the spread over small random layers; a bug (a wrong column, nibble, zero point or scale) costs
//    O(1). This is 3-5x the bf16 mode's error (8 significant bits relative to each element, not 7
//    bits relative to the row's largest).
//    The per-GEMM worst-case bound, (sx / 2) * sum |s (q - z)| + fp32 terms, is tested in
//    cpu_int8_kernel_test.cpp.
//    int8x3: every element within the exact kernels' own bound (reference_bound.h: fp32 summation order
//    plus one ulp of T), and relative L2 on fp32 layers 4e-6, on fp16/bf16 layers 8e-3. Why: the digits
//    (int8_rows.h) round each element by at most max|x| * 6.1e-8, below the row's largest value's own
//    fp32 half-ulp, so the mode's distance from the reference is the fp32 kernels' own (different
//    summation order): measured 1-6e-7 on the fp32 layers here, as the exact mode's 1-6e-7. 4e-6 is ~7x
//    that; dropping the last digit would cost ~3e-5. With fp16/bf16 activations both results are
//    rounded to T, and an element whose fp32 values straddle a rounding boundary differs by one ulp of T
//    (up to 2^-7 relative for bf16). How many do depends on the draw: usually the relative L2 stays under
//    1e-4, but one largest element of a 7-token bf16 layer rounding apart gave 3.04e-4. So the per-element
//    bound is the check, and the L2 limit is the one it implies, one bf16 ulp: 8e-3.
//    Every mode's fp32 layers differ bitwise from the exact mode's (the mode is on).
// 2. Determinism: outputs bitwise the same for chunks of 1, 7, 64 rows and one chunk, 1, 2 and 3
//    threads, prepack on and off.
// 3. 2-bit layers (which run the exact kernel in these modes too) equal compute "exact" bitwise.
// 4. Option errors name the option, the allowed values and what was given; the scratch stays within
//    the documented bound with the mode's rows.
// Layers: fixed (int4/int8, row-wise and blocks, zero points, biases, SwiGLU in all three forms,
// fp32/fp16/bf16, k = E, experts with no tokens, all tokens on one expert) and random ones (blocks up
// to 512; fresh seed per run, printed with every failure; replay with QMOE_TEST_SEED=<seed>).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "bitwise_diff.h"
#include "cpu_isas.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_kernels.h"
#include "qmoe/backend.h"
#include "qmoe/error.h"
#include "qmoe/layer.h"
#include "qmoe/reference.h"
#include "qmoe/synthetic.h"
#include "random_spec.h"
#include "reference_bound.h"
#include "test_seed.h"

namespace {

using namespace qmoe;
using test::bitwise_diff;

// The int8 mode's rows, one per route: codes, group sums, row scales, and the route's position.
int64_t int8_extra_scratch(const MoeSpec& s, int64_t XW, int64_t AW) {
  return s.k * ((XW + AW) + 4 * (XW / 16 + AW / 16) + 4 + 4 + 8);
}

// The int8x3 mode's: three digit planes of codes and group sums per row (four for 4-bit weights in blocks of
// 16 or 32), one scale, one position.
int64_t int8x3_extra_scratch(const MoeSpec& s, int64_t XW, int64_t AW) {
  const int64_t D = s.bits == 4 && (s.block_size == 16 || s.block_size == 32) ? 4 : 3;
  return s.k * (D * ((XW + AW) + 4 * (XW / 16 + AW / 16)) + 4 + 4 + 8);
}

// What differs between the modes.
struct Mode {
  std::string label;       // the test's name
  std::string name;        // the compute option's value
  std::string isa;         // the isa option's value: "amx" runs the int8 mode's tile multiplies
  std::string cpu_feature; // what the CPU needs beyond AVX-512 F/BW/VL, as the backend's error names it
  bool supported;
  double tolerance;        // see 1. above; also docs/DESIGN.md "Numerics"
  double fp32_tolerance;   // the same for layers of fp32 activations (int8x3: tighter, see 1.)
  // Scratch bytes per token row beyond the exact mode's (backend.h, docs/RELIABILITY.md), written out
  // here from the documentation; XW = round64(H + 8), AW = round64(I + 8).
  int64_t (*extra_scratch)(const MoeSpec&, int64_t XW, int64_t AW);
  int64_t mixtral_chunk;   // the automatic chunk for Mixtral-8x7B (1630 rows in the exact mode)
};

const Mode kModes[] = {
    {"bf16", "bf16", "auto", "AVX512_BF16", test::has_avx512_bf16(), 8e-3, 8e-3,
     [](const MoeSpec& s, int64_t XW, int64_t AW) { return 2 * (XW + s.k * AW); }, 1164},
    {"int8_vnni", "int8", "avx512", "AVX512_VNNI", test::has_avx512_vnni(), 4e-2, 4e-2, int8_extra_scratch, 1271},
    {"int8_amx", "int8", "amx", "AMX-TILE, AMX-INT8", cpu::amx_available(), 4e-2, 4e-2, int8_extra_scratch, 1271},
    {"int8x3", "int8x3", "auto", "AMX-TILE, AMX-INT8", cpu::amx_available(), 8e-3, 4e-6, int8x3_extra_scratch, 883},
};

void PrintTo(const Mode& m, std::ostream* os) { *os << m.label; }

class CpuComputeLayer : public ::testing::TestWithParam<Mode> {
 protected:
  const std::string& mode() const { return GetParam().name; }
  const std::string& isa() const { return GetParam().isa; }
};
// Tests that run the mode's kernels skip on CPUs without its feature.
#define QMOE_REQUIRE_MODE()                                                                      \
  if (!GetParam().supported) GTEST_SKIP() << "this CPU lacks " << GetParam().cpu_feature

using test::base_seed;

struct LayerCase {
  std::string name;
  MoeSpec spec;
  int64_t tokens = 16;
  int one_expert = -1;  // >= 0: every token's logits pick this expert first
  bool router_weights = false;
  uint64_t seed = 11;
};

std::vector<LayerCase> fixed_cases() {
  std::vector<LayerCase> v;
  MoeSpec a;
  a.num_experts = 8, a.k = 2, a.hidden = 256, a.inter = 192, a.bits = 4, a.block_size = 32;
  a.activation = Activation::swiglu, a.swiglu_fusion = SwigluFusion::interleaved, a.normalize_routing_weights = true;
  v.push_back({"swiglu_interleaved_int4_block32_T40", a, 40});
  MoeSpec b = a;
  b.bits = 8, b.block_size = 0, b.fc1_zero_points = b.fc2_zero_points = true, b.fc1_bias = b.fc2_bias = true;
  b.swiglu_limit = 7.f, b.activation_alpha = 1.702f, b.activation_beta = 1.f;
  v.push_back({"swiglu_int8_rowwise_zp_bias_gptoss_T33", b, 33});
  MoeSpec c = a;
  c.activation = Activation::silu, c.swiglu_fusion = SwigluFusion::separate, c.block_size = 128, c.hidden = 301 * 2, c.inter = 77 * 2, c.fc1_zero_points = true;
  c.act_dtype = DType::f16, c.scale_dtype = DType::f16;
  v.push_back({"silu_int4_block128_odd_widths_zp_f16_T29", c, 29});
  MoeSpec d = a;
  d.swiglu_fusion = SwigluFusion::separate, d.fc3_zero_points = true, d.fc3_bias = true, d.block_size = 16;
  d.act_dtype = DType::bf16, d.scale_dtype = DType::bf16;
  v.push_back({"swiglu_fc3_int4_block16_bf16_T24", d, 24});
  MoeSpec e = a;
  e.swiglu_fusion = SwigluFusion::concatenated, e.bits = 8, e.block_size = 64, e.scale_dtype = DType::bf16;
  v.push_back({"swiglu_concatenated_int8_block64_T17", e, 17});
  MoeSpec f = a;
  f.num_experts = 4, f.k = 4, f.activation = Activation::gelu, f.swiglu_fusion = SwigluFusion::separate, f.block_size = 256, f.hidden = 512;
  v.push_back({"gelu_int4_block256_k_eq_E_T9", f, 9, -1, true});
  MoeSpec g = a;
  g.num_experts = 16, g.k = 1, g.activation = Activation::relu, g.swiglu_fusion = SwigluFusion::separate;
  v.push_back({"relu_E16_k1_T3_most_experts_idle", g, 3});
  v.push_back({"swiglu_all_tokens_on_expert_5_T50", a, 50, 5});
  MoeSpec h = a;
  h.bits = 8, h.block_size = 0;
  v.push_back({"swiglu_int8_all_tokens_on_expert_0_T1", h, 1, 0});
  // Rows of 2 and 4 columns: shorter than one tile multiply, on the AMX kernels (>= 10 tokens an expert).
  MoeSpec n = a;
  n.bits = 8, n.block_size = 0, n.hidden = 2, n.inter = 4, n.fc2_zero_points = true;
  v.push_back({"swiglu_int8_rowwise_H2_I4_T40_on_expert_1", n, 40, 1});
  n.bits = 4, n.activation = Activation::relu, n.swiglu_fusion = SwigluFusion::separate, n.hidden = 4, n.inter = 2;
  v.push_back({"relu_int4_rowwise_H4_I2_T37_on_expert_2", n, 37, 2});
  return v;
}

LayerCase random_case(uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto pick = [&](int n) { return int(rng() % uint64_t(n)); };
  LayerCase c;
  c.seed = seed;
  c.name = "random seed " + std::to_string(seed);
  MoeSpec& s = c.spec;
  s.bits = pick(2) ? 4 : 8;
  const int64_t blocks[] = {0, 16, 32, 64, 128, 256, 512};
  s.block_size = blocks[pick(7)];
  s.hidden = s.pack() * (32 + pick(200));
  s.inter = s.pack() * (32 + pick(150));
  s.num_experts = 2 + pick(9);
  s.k = 1 + pick(int(s.num_experts));
  const Activation acts[] = {Activation::relu, Activation::gelu, Activation::silu, Activation::identity, Activation::swiglu};
  s.activation = acts[pick(5)];
  if (s.is_swiglu()) s.swiglu_fusion = SwigluFusion(pick(3));
  test::randomize_layer_options(s, pick);
  c.tokens = 1 + pick(70);
  c.router_weights = pick(4) == 0;
  if (pick(4) == 0) c.one_expert = pick(int(s.num_experts));
  return c;
}

SyntheticLayer make_layer(const LayerCase& c) {
  SyntheticLayer l = make_synthetic_layer(c.spec, {.seed = c.seed, .tokens = c.tokens, .router_weights = c.router_weights});
  if (c.one_expert >= 0) {
    const int64_t E = c.spec.num_experts;
    for (int64_t t = 0; t < c.tokens; ++t)
      store_from_float(c.spec.act_dtype, l.router_probs.data(), t * E + c.one_expert, 20.f);
  }
  return l;
}

Tensor run_cpu(const SyntheticLayer& l, const CpuBackendOptions& opt) {
  auto be = make_cpu_backend(opt);
  auto packed = be->prepack(l.spec, l.raw);
  Tensor y(l.spec.act_dtype, l.input.shape());
  auto* p = static_cast<uint8_t*>(y.data());
  for (size_t i = 0; i < y.nbytes(); ++i) p[i] = 0xa5;  // poison: every element must be written
  be->run(*packed, l.inputs(), y);
  return y;
}

std::vector<LayerCase> all_cases() {
  std::vector<LayerCase> cases = fixed_cases();
  for (uint64_t i = 0; i < 12; ++i) cases.push_back(random_case(base_seed() + i));
  return cases;
}

TEST_P(CpuComputeLayer, AgreesWithReferenceWithinStatedTolerance) {
  QMOE_REQUIRE_MODE();
  double worst = 0;
  for (const LayerCase& c : all_cases()) {
    const SyntheticLayer l = make_layer(c);
    const Tensor ref = reference_forward(l.spec, l.raw, l.inputs());
    const Tensor got = run_cpu(l, {.threads = 2, .isa = isa(), .compute = mode()});
    const double err = relative_error(got.view(), ref.view());
    const bool f32 = c.spec.act_dtype == DType::f32;
    worst = std::max(worst, err);
    if (mode() == "int8x3")  // the exact mode's accuracy: the exact kernels' per-element bound
      EXPECT_EQ(test::beyond_reference_bound(l.spec, ref, got), "")
          << c.name << " [" << c.spec.to_string() << "] T=" << c.tokens << " (base seed " << base_seed() << ")";
    EXPECT_LE(err, f32 ? GetParam().fp32_tolerance : GetParam().tolerance)
        << c.name << " [" << c.spec.to_string() << "] T=" << c.tokens << " one_expert=" << c.one_expert
        << " (base seed " << base_seed() << ")";
    // The exact mode's result would mean the mode is not on (fp32 layers: nothing rounds the difference
    // away; 2-bit layers run exact in every mode).
    if (c.spec.bits != 2 && c.tokens > 0 && f32)
      EXPECT_NE(bitwise_diff(got, run_cpu(l, {.threads = 2, .compute = "exact"})), "")
          << c.name << ": mode " << mode() << " gave the exact mode's result";
  }
  std::printf("worst relative L2 error of compute %s vs the reference: %.3g\n", mode().c_str(), worst);
}

TEST_P(CpuComputeLayer, BitwiseDeterministicAcrossChunksThreadsAndPrepack) {
  QMOE_REQUIRE_MODE();
  for (const LayerCase& c : all_cases()) {
    const SyntheticLayer l = make_layer(c);
    const Tensor want = run_cpu(l, {.threads = 2, .isa = isa(), .max_chunk_rows = c.tokens, .compute = mode()});
    for (int threads : {1, 2, 3})
      for (bool prepack : {true, false})
        for (int64_t chunk : {int64_t(1), int64_t(7), int64_t(64), int64_t(0)}) {
          const std::string d = bitwise_diff(
              want, run_cpu(l, {.threads = threads, .prepack = prepack, .isa = isa(), .max_chunk_rows = chunk, .compute = mode()}));
          ASSERT_EQ(d, "") << c.name << " [" << c.spec.to_string() << "] T=" << c.tokens << " threads=" << threads
                           << " prepack=" << prepack << " max_chunk_rows=" << chunk << ": " << d << " (base seed "
                           << base_seed() << ")";
        }
  }
}

TEST_P(CpuComputeLayer, TwoBitLayersRunExact) {
  QMOE_REQUIRE_MODE();
  MoeSpec s;
  s.num_experts = 4, s.k = 2, s.hidden = 64, s.inter = 48, s.bits = 2, s.block_size = 16;
  s.activation = Activation::swiglu, s.swiglu_fusion = SwigluFusion::interleaved, s.fc1_zero_points = true;
  const SyntheticLayer l = make_synthetic_layer(s, {.seed = 3, .tokens = 21});
  const std::string d = bitwise_diff(run_cpu(l, {.threads = 2}), run_cpu(l, {.threads = 2, .isa = isa(), .compute = mode()}));
  EXPECT_EQ(d, "") << "2-bit, compute " << mode() << " vs exact: " << d;
}

// The scratch bound with the mode's rows (backend.h, docs/RELIABILITY.md): the exact mode's row plus
// the mode's extra bytes (Mode::extra_scratch); the automatic chunk uses it.
TEST_P(CpuComputeLayer, ScratchWithinDocumentedBound) {
  auto r64 = [](int64_t v) { return (v + 63) / 64 * 64; };
  auto per_row = [&](const MoeSpec& s) {
    const int64_t XW = r64(s.hidden + 8), AW = r64(s.inter + 8);
    return 4 * (XW + s.k * (AW + s.hidden)) + 16 * s.k + GetParam().extra_scratch(s, XW, AW);
  };
  MoeSpec m;
  m.num_experts = 8, m.k = 2, m.hidden = 4096, m.inter = 14336, m.activation = Activation::swiglu;
  EXPECT_EQ(cpu::scratch_bytes_per_row(m, mode()), per_row(m));
  EXPECT_EQ(cpu::chunk_rows(m, {.isa = isa(), .compute = mode()}), GetParam().mixtral_chunk);
  for (int64_t block : {16, 32, 64}) {  // int8x3 keeps four digit planes for 4-bit blocks of 16 and 32
    MoeSpec b = m;
    b.block_size = block;
    EXPECT_EQ(cpu::scratch_bytes_per_row(b, mode()), per_row(b)) << "block " << block;
  }
  QMOE_REQUIRE_MODE();
  MoeSpec s;
  s.num_experts = 4, s.k = 2, s.hidden = 64, s.inter = 96, s.bits = 4, s.block_size = 32, s.activation = Activation::silu;
  const SyntheticLayer l = make_synthetic_layer(s, {.seed = 5, .tokens = 300});
  auto be = make_cpu_backend({.isa = isa(), .max_chunk_rows = 100, .compute = mode()});
  auto packed = be->prepack(s, l.raw);
  Tensor y(s.act_dtype, l.input.shape());
  be->run(*packed, l.inputs(), y);
  EXPECT_LE(int64_t(cpu::held_scratch_bytes(*be)), 100 * per_row(s));
}

// The error message of constructing `opt`, or "" when it is accepted.
template <class F>
std::string error_of(F&& make) {
  try {
    make();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST_P(CpuComputeLayer, OptionErrorsAreClear) {
  const std::string m = mode();
  // The mode needs the AVX-512 kernels: other instruction sets are refused, naming both options.
  for (const char* isa : {"portable", "avx2"}) {
    const std::string e = error_of([&] { make_cpu_backend({.isa = isa, .compute = m}); });
    if (std::string(isa) == "avx2" && !__builtin_cpu_supports("avx2")) continue;
    EXPECT_NE(e.find("compute '" + m + "'"), std::string::npos) << e;
    EXPECT_NE(e.find("isa '" + std::string(isa) + "'"), std::string::npos) << e;
  }
  const std::string native = error_of([&] { make_cpu_backend({.isa = isa(), .compute = m}); });
  if (GetParam().supported)
    EXPECT_EQ(native, "");
  else
    EXPECT_NE(native.find("lacks " + GetParam().cpu_feature), std::string::npos) << native;
}

// The AMX kernels compute the VNNI kernels' integers (kernels_amx.cpp), so whole layers agree bit for bit.
TEST(CpuCompute, AmxLayersEqualVnniLayersBitwise) {
  if (!cpu::amx_available()) GTEST_SKIP() << "this CPU (or OS) gives no AMX tile multiplies";
  for (const LayerCase& c : all_cases()) {
    const SyntheticLayer l = make_layer(c);
    const std::string d = bitwise_diff(run_cpu(l, {.threads = 2, .isa = "avx512", .compute = "int8"}),
                                       run_cpu(l, {.threads = 2, .isa = "amx", .compute = "int8"}));
    ASSERT_EQ(d, "") << c.name << " [" << c.spec.to_string() << "] T=" << c.tokens << ": " << d << " (base seed "
                     << base_seed() << ")";
  }
}

TEST(CpuCompute, AmxServesOnlyTheInt8Modes) {
  for (const char* m : {"exact", "bf16"})
    EXPECT_EQ(error_of([&] { make_cpu_backend({.isa = "amx", .compute = m}); }),
              "cpu backend: isa 'amx' serves only compute 'int8' and 'int8x3' (its tile multiplies take int8 "
              "activations), got compute '" + std::string(m) + "'");
  EXPECT_EQ(error_of([&] { make_cpu_backend({.isa = "avx512", .compute = "int8x3"}); }),
            "cpu backend: compute 'int8x3' runs only on the AMX kernels, but isa 'avx512' was requested (use isa "
            "auto or amx)");
}

TEST(CpuCompute, UnknownValuesAreRefused) {
  EXPECT_EQ(error_of([] { make_cpu_backend({.compute = "fp8"}); }),
            "cpu backend: compute: expected exact, bf16, int8 or int8x3, got 'fp8'");
  EXPECT_EQ(error_of([] { make_backend("cpu", LayerOptions{.cpu_compute = "BF16"}); }),
            "cpu_compute: expected exact, bf16, int8 or int8x3, got 'BF16'");
  // Checked whatever the backend, as cuda_gemm is.
  EXPECT_EQ(error_of([] { make_backend("reference", LayerOptions{.cpu_compute = "half"}); }),
            "cpu_compute: expected exact, bf16, int8 or int8x3, got 'half'");
}

INSTANTIATE_TEST_SUITE_P(Modes, CpuComputeLayer, ::testing::ValuesIn(kModes),
                         [](const ::testing::TestParamInfo<Mode>& p) { return p.param.label; });

}  // namespace
