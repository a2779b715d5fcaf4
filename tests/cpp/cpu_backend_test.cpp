// The CPU backend (src/cpu) against the scalar reference, across ISA paths, prepack on/off, thread
// counts and packed files; the cpu-t16 packer's round trip; raw buffers released after prepack.
//
// Random configurations use a fresh seed per run (printed with every failure; replay one with
// QMOE_TEST_SEED=<seed>). Weights are random bytes/scales/zero points made here: this test does not
// depend on the quantizer.
//
// Tolerance against the reference (reasoned, not tuned). Both compute every dot product in fp32 but in
// different orders: the reference sums K products of pre-rounded weights sequentially, the kernels sum
// exact (q - z) * x products in two chains per block and scale per block. A sequential fp32 sum of K
// random-sign terms of rms sigma has a rounding error that behaves like a random walk of K steps of
// size u * |partial sum| ~ u * sqrt(i) * sigma, i.e. about u * K * sigma / sqrt(2) = u * sqrt(K/2) times
// the output's rms (u = 2^-24); the blocked sum is smaller. FC1's error enters FC2 through the
// activation (SwiGLU multiplies two FC1 outputs: up to ~3x), so per output element
//   |ours - ref| <= 32 * u * (sqrt(H) + sqrt(I)) * rms(ref) + eps_T * |ref|
// where 32 covers the tail of the max over all elements (~5 sigma) times the activation factor, and
// eps_T (2^-10 fp16, 2^-7 bf16, 0 fp32) is the one ulp by which both results may round apart to T.
// An indexing or scaling bug produces errors of order rms(ref), ~1e4 times larger than this bound.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>

#include "cpu/cpu_layout.h"
#include "qmoe/backend.h"
#include "qmoe/error.h"
#include "qmoe/reference.h"
#include "cpu_isas.h"
#include "random_spec.h"
#include "reference_bound.h"
#include "test_seed.h"

using namespace qmoe;

namespace {

using test::base_seed;

using test::isas;

struct Case {
  MoeSpec spec;
  int64_t rows = 1;
  bool three_d = false;
  bool router_weights = false;
  enum Routing { uniform, one_expert, half_idle } routing = uniform;
  std::string str() const {
    std::ostringstream os;
    os << spec.to_string() << " rows=" << rows << (three_d ? " 3-D" : "") << (router_weights ? " router_weights" : "")
       << (routing == one_expert ? " all-on-one-expert" : routing == half_idle ? " half-experts-idle" : "");
    return os.str();
  }
};

Tensor random_float_tensor(std::mt19937_64& rng, DType dt, Shape shape, float lo, float hi) {
  Tensor t(dt, std::move(shape));
  std::uniform_real_distribution<float> d(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_float(dt, t.data(), i, d(rng));
  return t;
}

// Random raw matrix: random code bytes, scales of random sign and magnitude 0.005..0.05, zero-point
// codes with unused high bits zero (unpack writes zeros there), bias in [-0.5, 0.5].
RawMatrix random_matrix(std::mt19937_64& rng, const MoeSpec& s, Fc fc, bool zp, bool bias) {
  RawMatrix m;
  m.weights = Tensor(DType::u8, raw_weight_shape(s, fc));
  for (int64_t i = 0; i < m.weights.numel(); ++i) m.weights.data_as<uint8_t>()[i] = uint8_t(rng());
  m.scales = Tensor(s.scale_dtype, raw_scale_shape(s, fc));
  std::uniform_real_distribution<float> mag(0.005f, 0.05f);
  for (int64_t i = 0; i < m.scales.numel(); ++i)
    store_from_float(s.scale_dtype, m.scales.data(), i, (rng() & 1 ? -1.f : 1.f) * mag(rng));
  if (zp) {
    m.zero_points = Tensor(DType::u8, raw_zero_point_shape(s, fc));
    const int64_t N = fc_rows(s, fc), nb = s.blocks(fc_cols(s, fc)), zpack = s.pack();
    const int64_t per_row = s.block_wise() ? (nb + zpack - 1) / zpack : 0;
    for (int64_t e = 0; e < s.num_experts; ++e)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < nb; ++b) {
          const int code = int(rng() % (1u << s.bits));
          uint8_t* z = m.zero_points->data_as<uint8_t>();
          if (s.block_wise())
            z[(e * N + n) * per_row + b / zpack] |= uint8_t(code << ((b % zpack) * s.bits));
          else
            z[e * ((N + zpack - 1) / zpack) + n / zpack] |= uint8_t(code << ((n % zpack) * s.bits));
        }
  }
  if (bias) m.bias = random_float_tensor(rng, s.act_dtype, raw_bias_shape(s, fc), -0.5f, 0.5f);
  return m;
}

RawExperts random_raw(std::mt19937_64& rng, const MoeSpec& s) {
  RawExperts r;
  r.fc1 = random_matrix(rng, s, Fc::fc1, s.fc1_zero_points, s.fc1_bias);
  r.fc2 = random_matrix(rng, s, Fc::fc2, s.fc2_zero_points, s.fc2_bias);
  if (s.has_fc3()) r.fc3 = random_matrix(rng, s, Fc::fc3, s.fc3_zero_points, s.fc3_bias);
  return r;
}

struct Inputs {
  Tensor x, logits, rw;
  MoeInputs view() const {
    MoeInputs in{x.view(), logits.view(), std::nullopt};
    if (!rw.empty()) in.router_weights = rw.view();
    return in;
  }
};

Inputs random_inputs(std::mt19937_64& rng, const Case& c) {
  const MoeSpec& s = c.spec;
  Inputs in;
  Shape xs = c.three_d ? Shape{1, c.rows, s.hidden} : Shape{c.rows, s.hidden};
  in.x = random_float_tensor(rng, s.act_dtype, xs, -1.f, 1.f);
  Tensor lg(DType::f32, {c.rows, s.num_experts});
  std::uniform_real_distribution<float> d(-2.f, 2.f);
  for (int64_t t = 0; t < c.rows; ++t)
    for (int64_t e = 0; e < s.num_experts; ++e) {
      float v = d(rng);
      if (c.routing == Case::one_expert && e == s.num_experts - 1) v += 50.f;  // k=1 picks it for every token
      if (c.routing == Case::half_idle && e >= (s.num_experts + 1) / 2) v -= 50.f;
      lg.data_as<float>()[t * s.num_experts + e] = v;
    }
  in.logits = Tensor(s.act_dtype, {c.rows, s.num_experts});
  for (int64_t i = 0; i < lg.numel(); ++i) store_from_float(s.act_dtype, in.logits.data(), i, lg.data_as<float>()[i]);
  if (c.router_weights) in.rw = random_float_tensor(rng, s.act_dtype, {c.rows, s.num_experts}, 0.f, 1.f);
  return in;
}

Case random_case(uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto pick = [&](int n) { return int(rng() % uint64_t(n)); };
  Case c;
  MoeSpec& s = c.spec;
  const int bits[] = {2, 4, 8};
  s.bits = bits[pick(3)];
  const int64_t blocks[] = {0, 16, 32, 64, 128, 256};
  s.block_size = blocks[pick(6)];
  // Multiples of pack, usually not of the block size nor of the 16/32-row tiles (odd K, partial tiles).
  s.hidden = s.pack() * (4 + pick(80));
  s.inter = s.pack() * (4 + pick(60));
  s.num_experts = 1 + pick(9);
  s.k = 1 + pick(int(s.num_experts));
  const Activation acts[] = {Activation::relu, Activation::gelu, Activation::silu, Activation::identity,
                             Activation::swiglu, Activation::swiglu};
  s.activation = acts[pick(6)];
  if (s.is_swiglu()) {
    s.swiglu_fusion = SwigluFusion(pick(3));
    if (pick(2)) {
      s.swiglu_limit = 7.f;
      s.activation_alpha = 1.702f;
      s.activation_beta = 1.f;
    }
  }
  test::randomize_layer_options(s, pick);
  c.rows = 1 + pick(20);
  c.three_d = pick(4) == 0;
  c.router_weights = pick(5) == 0;
  c.routing = Case::Routing(pick(5) < 3 ? 0 : pick(2) + 1);
  if (c.routing == Case::one_expert) s.k = 1;
  if (c.routing == Case::half_idle) s.k = std::max<int64_t>(1, std::min<int64_t>(s.k, s.num_experts / 2));
  return c;
}

// Runs the CPU backend; the output is poisoned (NaN) first so every element must be written.
Tensor run_cpu(const Case& c, const RawExperts& raw, const Inputs& in, const CpuBackendOptions& opt) {
  auto be = make_cpu_backend(opt);
  auto packed = be->prepack(c.spec, raw);  // shallow copy: the backend releases its handles only
  Tensor out(in.x.dtype(), in.x.shape());
  for (int64_t i = 0; i < out.numel(); ++i) store_from_float(out.dtype(), out.data(), i, NAN);
  be->run(*packed, in.view(), out);
  return out;
}

// Largest |ours - ref| / tol seen (fp32 outputs only, where no rounding to T hides the error): printed
// by the random test so the margin of the bound is visible.
double g_worst_ratio = 0;

// Compares with the reference under the bound above; returns an empty string or the first failure.
std::string compare(const Case& c, const Tensor& ref, const Tensor& got) {
  return test::beyond_reference_bound(c.spec, ref, got, &g_worst_ratio);
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

// The whole check for one case: each ISA x prepack on/off against the reference, all bitwise equal.
void check_case(const Case& c, uint64_t seed) {
  SCOPED_TRACE("seed " + std::to_string(seed) + " (QMOE_TEST_SEED to replay): " + c.str());
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
  const RawExperts raw = random_raw(rng, c.spec);
  const Inputs in = random_inputs(rng, c);
  const Tensor ref = reference_forward(c.spec, raw, in.view());
  Tensor first;
  std::string first_name;
  for (const std::string& isa : isas())
    for (bool prepack : {true, false}) {
      const std::string name = isa + (prepack ? " prepacked" : " prepack-off");
      const Tensor got = run_cpu(c, raw, in, {2, prepack, isa});
      const std::string err = compare(c, ref, got);
      ASSERT_TRUE(err.empty()) << name << ": " << err;
      if (first.empty()) {
        first = got;
        first_name = name;
      } else {
        ASSERT_TRUE(bitwise_equal(first, got)) << name << " differs bitwise from " << first_name;
      }
    }
}

}  // namespace

TEST(CpuBackend, RandomConfigsMatchReferenceOnEveryIsa) {
  const uint64_t seed0 = base_seed();
  for (int i = 0; i < 48; ++i) {
    const uint64_t seed = seed0 + uint64_t(i);
    check_case(random_case(seed), seed);
    if (HasFatalFailure()) return;
  }
  std::printf("[ info ] base seed %llu; worst fp32 |cpu - reference| / tolerance = %.3g\n",
              static_cast<unsigned long long>(seed0), g_worst_ratio);
}

// The named edge cases, each on every ISA (random weights, the seed still printed on failure).
TEST(CpuBackend, EdgeCases) {
  const uint64_t seed = base_seed() + 1000;
  auto base = [] {
    Case c;
    c.spec.num_experts = 4;
    c.spec.hidden = 96;
    c.spec.inter = 80;
    c.spec.k = 2;
    c.spec.bits = 4;
    c.spec.block_size = 32;
    c.rows = 9;
    return c;
  };
  std::vector<Case> cases;
  {
    Case c = base();  // E = 1
    c.spec.num_experts = 1;
    c.spec.k = 1;
    cases.push_back(c);
  }
  {
    Case c = base();  // k = E
    c.spec.k = 4;
    c.spec.activation = Activation::swiglu;
    c.spec.swiglu_fusion = SwigluFusion::interleaved;
    cases.push_back(c);
  }
  {
    Case c = base();  // all tokens on one expert, 13 tokens: 3 full kernel groups + a partial one
    c.spec.k = 1;
    c.rows = 13;
    c.routing = Case::one_expert;
    cases.push_back(c);
  }
  {
    Case c = base();  // experts without tokens
    c.spec.num_experts = 8;
    c.spec.k = 2;
    c.routing = Case::half_idle;
    cases.push_back(c);
  }
  for (int bits : {2, 4, 8})
    for (int64_t bs : {0, 16, 256}) {
      Case c = base();  // K not a multiple of the block (H=200, I=72 with bs 16..256), zero points
      c.spec.bits = bits;
      c.spec.block_size = bs;
      c.spec.hidden = 200;
      c.spec.inter = 72;
      c.spec.fc1_zero_points = c.spec.fc2_zero_points = true;
      c.spec.activation = Activation::swiglu;
      c.spec.swiglu_fusion = SwigluFusion::separate;
      c.spec.fc3_zero_points = true;
      c.spec.fc1_bias = c.spec.fc2_bias = c.spec.fc3_bias = true;
      cases.push_back(c);
    }
  for (bool fc2 : {false, true}) {
    // One expert holding every token, and more pairs per task than a pair block (kPairBlock = 16: with 2
    // threads a task holds a sixteenth of a stage's pairs, here 17 or more), so tasks run several blocks,
    // each through several token calls (70 rows, at most 32 a call): FC1's pairs (I = 4400, 275 SwiGLU
    // pairs) or FC2's (H = 8800, 275 pairs).
    Case c = base();
    c.spec.num_experts = 1;
    c.spec.k = 1;
    c.spec.hidden = fc2 ? 8800 : 72;
    c.spec.inter = fc2 ? 48 : 4400;
    c.spec.activation = Activation::swiglu;
    c.rows = 70;
    cases.push_back(c);
  }
  for (DType dt : {DType::f16, DType::bf16}) {
    Case c = base();
    c.spec.act_dtype = dt;
    c.spec.scale_dtype = dt;
    c.spec.activation = Activation::swiglu;
    c.spec.swiglu_fusion = SwigluFusion::concatenated;
    c.spec.swiglu_limit = 7.f;
    c.spec.activation_alpha = 1.702f;
    c.spec.activation_beta = 1.f;
    cases.push_back(c);
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    check_case(cases[i], seed + i);
    if (HasFatalFailure()) return;
  }
}

TEST(CpuBackend, BitwiseIdenticalAcrossThreadCounts) {
  const uint64_t seed = base_seed() + 2000;
  SCOPED_TRACE("seed " + std::to_string(seed));
  Case c;
  c.spec.num_experts = 6;
  c.spec.hidden = 512;
  c.spec.inter = 384;
  c.spec.k = 2;
  c.spec.block_size = 64;
  c.spec.activation = Activation::swiglu;
  c.spec.swiglu_fusion = SwigluFusion::interleaved;
  c.rows = 37;
  std::mt19937_64 rng(seed);
  const RawExperts raw = random_raw(rng, c.spec);
  const Inputs in = random_inputs(rng, c);
  const Tensor one = run_cpu(c, raw, in, {1, true, "auto"});
  for (int threads : {2, 3, 5}) {
    EXPECT_TRUE(bitwise_equal(one, run_cpu(c, raw, in, {threads, true, "auto"}))) << threads << " threads";
    EXPECT_TRUE(bitwise_equal(one, run_cpu(c, raw, in, {threads, false, "auto"}))) << threads << " threads, prepack off";
  }
  EXPECT_EQ(compare(c, reference_forward(c.spec, raw, in.view()), one), "");
}

// One backend object keeps its activation scratch across calls; a call must not see what an earlier,
// larger call (or another layer) left there.
TEST(CpuBackend, ReusedBackendMatchesFreshOne) {
  const uint64_t seed = base_seed() + 2500;
  SCOPED_TRACE("seed " + std::to_string(seed));
  Case a, b;
  a.spec.num_experts = 4, a.spec.hidden = 256, a.spec.inter = 200, a.spec.k = 2, a.spec.block_size = 32;
  a.spec.activation = Activation::swiglu;
  b.spec.num_experts = 3, b.spec.hidden = 72, b.spec.inter = 40, b.spec.k = 1, b.spec.bits = 8;
  b.spec.activation = Activation::gelu;
  std::mt19937_64 rng(seed);
  const RawExperts ra = random_raw(rng, a.spec), rb = random_raw(rng, b.spec);
  auto be = make_cpu_backend({2, true, "auto"});
  auto pa = be->prepack(a.spec, ra), pb = be->prepack(b.spec, rb);
  for (auto [c, rows] : {std::pair{&a, 37}, std::pair{&b, 5}, std::pair{&a, 3}}) {
    c->rows = rows;
    const RawExperts& raw = c == &a ? ra : rb;
    const Inputs in = random_inputs(rng, *c);
    Tensor out(in.x.dtype(), in.x.shape());
    be->run(c == &a ? *pa : *pb, in.view(), out);
    EXPECT_TRUE(bitwise_equal(out, run_cpu(*c, raw, in, {2, true, "auto"}))) << c->str();
  }
}

// An infinite scale makes s * sum(...) and the reference's sum of s * w * x disagree on which outputs
// are NaN; every ISA must reproduce the reference's NaN/Inf pattern, and agree bit for bit. 13 tokens on
// 2 experts reach the 1-4 and 5-8 token kernels.
TEST(CpuBackend, InfiniteScaleGivesReferenceNonFinitePattern) {
  const uint64_t seed = base_seed() + 5000;
  for (int bits : {4, 8}) {
    SCOPED_TRACE("seed " + std::to_string(seed) + " bits " + std::to_string(bits));
    Case c;
    c.spec.num_experts = 2, c.spec.hidden = 96, c.spec.inter = 64, c.spec.k = 1, c.spec.bits = bits;
    c.spec.block_size = 32;
    c.spec.activation = Activation::identity;
    c.spec.fc2_zero_points = true;
    c.rows = 13;
    std::mt19937_64 rng(seed);
    RawExperts raw = random_raw(rng, c.spec);
    const int64_t nb1 = c.spec.blocks(c.spec.hidden), nb2 = c.spec.blocks(c.spec.inter);
    store_from_float(c.spec.scale_dtype, raw.fc1.scales.data(), 3 * nb1 + 1, INFINITY);        // e0 row 3 block 1
    store_from_float(c.spec.scale_dtype, raw.fc2.scales.data(), (96 + 17) * nb2 + 0, -INFINITY);  // e1 row 17 block 0
    const Inputs in = random_inputs(rng, c);
    const Tensor ref = reference_forward(c.spec, raw, in.view());
    auto cls = [](float v) { return std::isnan(v) ? 1 : std::isinf(v) ? (v > 0 ? 2 : 3) : 0; };
    int64_t nonfinite = 0;
    for (int64_t i = 0; i < ref.numel(); ++i) nonfinite += cls(ref.data_as<float>()[i]) != 0;
    ASSERT_GT(nonfinite, 0) << "the poisoned scales must reach the output";
    Tensor first;
    for (const std::string& isa : isas()) {
      const Tensor got = run_cpu(c, raw, in, {2, true, isa});
      for (int64_t i = 0; i < ref.numel(); ++i)
        ASSERT_EQ(cls(ref.data_as<float>()[i]), cls(got.data_as<float>()[i]))
            << isa << " element " << i << ": reference " << ref.data_as<float>()[i] << ", cpu " << got.data_as<float>()[i];
      if (first.empty()) first = got;
      EXPECT_TRUE(bitwise_equal(first, got)) << isa;
    }
  }
}

TEST(CpuLayout, UnpackOfPackIsRaw) {
  const uint64_t seed = base_seed() + 3000;
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int bits : {2, 4, 8})
    for (int64_t bs : {0, 16, 64})
      for (int fusion = -1; fusion <= 2; ++fusion) {
        MoeSpec s;
        s.num_experts = 3;
        s.hidden = 8 * 13;
        s.inter = 8 * 5;
        s.k = 2;
        s.bits = bits;
        s.block_size = bs;
        if (fusion >= 0) {
          s.activation = Activation::swiglu;
          s.swiglu_fusion = SwigluFusion(fusion);
        }
        s.fc1_zero_points = s.fc2_zero_points = true;
        s.fc3_zero_points = s.has_fc3();
        s.fc1_bias = s.fc2_bias = true;
        s.fc3_bias = s.has_fc3();
        s.act_dtype = DType::f16;
        s.scale_dtype = DType::bf16;
        const RawExperts raw = random_raw(rng, s);
        auto packed = cpu::pack_experts(s, raw, nullptr);
        const RawExperts back = cpu::unpack_experts(*packed);
        auto same = [&](const Tensor& a, const Tensor& b, const std::string& what) {
          EXPECT_EQ(a.shape(), b.shape()) << what;
          EXPECT_TRUE(bitwise_equal(a, b)) << what << " differs after unpack(pack()) for " << s.to_string();
        };
        auto same_m = [&](const RawMatrix& a, const RawMatrix& b, const std::string& p) {
          same(a.weights, b.weights, p + " weights");
          same(a.scales, b.scales, p + " scales");
          same(*a.zero_points, *b.zero_points, p + " zero points");
          same(*a.bias, *b.bias, p + " bias");
        };
        same_m(raw.fc1, back.fc1, "fc1");
        same_m(raw.fc2, back.fc2, "fc2");
        if (s.has_fc3()) same_m(*raw.fc3, *back.fc3, "fc3");
      }
}

// The grid in cpu_layout.h, checked against what the packer writes: raw byte (n, j) = f(n, j) must
// land at codes[e][n/16][j][n%16].
TEST(CpuLayout, GridMatchesPacker) {
  MoeSpec s;
  s.num_experts = 2;
  s.hidden = 64;
  s.inter = 48;
  s.bits = 4;
  s.block_size = 16;
  RawExperts raw;
  auto fill = [&](Fc fc) {
    RawMatrix m;
    m.weights = Tensor(DType::u8, raw_weight_shape(s, fc));
    const int64_t N = fc_rows(s, fc), J = fc_cols(s, fc) / 2;
    for (int64_t e = 0; e < 2; ++e)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < J; ++j) m.weights.data_as<uint8_t>()[(e * N + n) * J + j] = uint8_t(e * 101 + n * 7 + j);
    m.scales = Tensor(DType::f32, raw_scale_shape(s, fc));
    return m;
  };
  raw.fc1 = fill(Fc::fc1);
  raw.fc2 = fill(Fc::fc2);
  auto packed = cpu::pack_experts(s, raw, nullptr);
  const auto& g = packed->plan().fc2.geom;
  const uint8_t* codes = packed->mat(cpu::Part::fc2).codes.data_as<uint8_t>();
  for (int64_t e = 0; e < 2; ++e)
    for (int64_t n = 0; n < s.hidden; ++n)
      for (int64_t j = 0; j < s.inter / 2; ++j)
        ASSERT_EQ(codes[e * g.codes_per_expert() + g.code_offset(n / 16, n % 16, j)], uint8_t(e * 101 + n * 7 + j))
            << "e " << e << " n " << n << " j " << j;
  EXPECT_EQ(g.code_offset(2, 5, 5), (2 * g.jbytes + 5) * 16 + 5);
  EXPECT_EQ(cpu::dump_layout(g, 37, 11, 16), "cpu-t16-w4: fc2 row 37 col 11 -> codes[e][2][5][5] bits 4..7, scale[e][2][0][5]");
  EXPECT_EQ(packed->tag().to_string(), "cpu-t16-w4 v1 (target cpu)");
}

// PackedMat::finite marks exactly the experts without an infinite scale, for every scale dtype, both
// when packed and when rebuilt from blobs (the kernels skip their Inf scan only where it says 1).
TEST(CpuLayout, FiniteFlagsMarkExpertsWithoutInfiniteScales) {
  for (DType sd : {DType::f32, DType::f16, DType::bf16}) {
    SCOPED_TRACE(dtype_name(sd));
    MoeSpec s;
    s.num_experts = 3, s.hidden = 64, s.inter = 32, s.block_size = 32, s.scale_dtype = sd;
    std::mt19937_64 rng(base_seed() + 4500);
    RawExperts raw = random_raw(rng, s);
    // Expert 1's last fc2 scale is -Inf, expert 2's first fc1 scale is NaN (finite for this purpose:
    // NaN propagates the same way on every path).
    const int64_t n2 = raw.fc2.scales.numel() / 3, n1 = raw.fc1.scales.numel() / 3;
    store_from_float(sd, raw.fc2.scales.data(), 2 * n2 - 1, -INFINITY);
    store_from_float(sd, raw.fc1.scales.data(), 2 * n1, NAN);
    auto packed = cpu::pack_experts(s, raw, nullptr);
    auto again = cpu::packed_from_blobs(s, packed->to_blobs());
    for (const cpu::CpuPackedExperts* p : {packed.get(), again.get()}) {
      EXPECT_EQ(p->mat(cpu::Part::fc1).finite, (std::vector<uint8_t>{1, 1, 1}));
      EXPECT_EQ(p->mat(cpu::Part::fc2).finite, (std::vector<uint8_t>{1, 0, 1}));
    }
  }
}

TEST(CpuBackend, PackedFileBlobsRoundTripAndAreChecked) {
  const uint64_t seed = base_seed() + 4000;
  SCOPED_TRACE("seed " + std::to_string(seed));
  Case c;
  c.spec.num_experts = 3;
  c.spec.hidden = 64;
  c.spec.inter = 40;
  c.spec.k = 2;
  c.spec.block_size = 16;
  c.spec.activation = Activation::swiglu;
  c.spec.fc1_zero_points = c.spec.fc2_bias = true;
  c.rows = 5;
  std::mt19937_64 rng(seed);
  const RawExperts raw = random_raw(rng, c.spec);
  const Inputs in = random_inputs(rng, c);
  for (bool prepack : {true, false}) {
    auto be = make_cpu_backend({2, prepack, "auto"});
    auto packed = be->prepack(c.spec, raw);
    EXPECT_EQ(packed->tag(), be->layout_for(c.spec));
    auto blobs = packed->to_blobs();
    auto again = be->from_blobs(c.spec, blobs);
    Tensor a(in.x.dtype(), in.x.shape()), b(in.x.dtype(), in.x.shape());
    be->run(*packed, in.view(), a);
    be->run(*again, in.view(), b);
    EXPECT_TRUE(bitwise_equal(a, b)) << (prepack ? "packed" : "raw") << " blobs";

    // A truncated blob, a missing blob, an extra blob: each refused by name.
    auto bad = blobs;
    bad[0].tensor = Tensor(bad[0].tensor.dtype(), {bad[0].tensor.numel() - 1});
    try {
      be->from_blobs(c.spec, bad);
      ADD_FAILURE() << "truncated blob accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(blobs[0].name), std::string::npos) << e.what();
    }
    bad = blobs;
    bad.pop_back();
    EXPECT_THROW(be->from_blobs(c.spec, bad), Error);
    bad = blobs;
    bad.push_back({"fc9.codes", blobs[0].tensor});
    EXPECT_THROW(be->from_blobs(c.spec, bad), Error);
  }
}

TEST(CpuBackend, RefusesOtherLayouts) {
  MoeSpec s;
  s.num_experts = 2;
  s.hidden = 32;
  s.inter = 32;
  std::mt19937_64 rng(1);
  const RawExperts raw = random_raw(rng, s);
  auto ref_packed = make_reference_backend()->prepack(s, raw);
  auto cpu = make_cpu_backend({1, true, "auto"});
  auto cpu_raw = make_cpu_backend({1, false, "auto"});
  auto raw_packed = cpu_raw->prepack(s, raw);
  Tensor x(DType::f32, {1, 32}), lg(DType::f32, {1, 2}), out(DType::f32, {1, 32});
  MoeInputs in{x.view(), lg.view(), std::nullopt};
  try {
    cpu->run(*ref_packed, in, out);
    ADD_FAILURE() << "raw layout accepted by the packed cpu backend";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layout raw v1 (target any), expected cpu-t16-w4 v1"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(cpu->run(*raw_packed, in, out), Error);
  EXPECT_THROW(cpu_raw->run(*cpu->prepack(s, raw), in, out), Error);
  EXPECT_THROW(make_cpu_backend({1, true, "sse9"}), Error);
}

// Prepack frees each raw matrix once packed (fc1's bytes go before fc2's are packed), and nothing
// raw stays referenced afterwards; with prepack off the raw bytes are what is kept.
TEST(CpuBackend, PrepackReleasesRawBuffers) {
  MoeSpec s;
  s.num_experts = 4;
  s.hidden = 128;
  s.inter = 64;
  s.k = 2;
  s.block_size = 32;
  s.activation = Activation::swiglu;
  s.swiglu_fusion = SwigluFusion::separate;
  s.fc1_zero_points = true;
  std::mt19937_64 rng(7);
  auto log = std::make_shared<std::vector<std::string>>();
  auto tracked = [&](const Tensor& t, const std::string& name, std::vector<std::weak_ptr<void>>& watch) {
    auto copy = std::make_shared<Tensor>(t);
    std::shared_ptr<void> owner(copy.get(), [copy, name, log](void*) mutable {
      log->push_back(name);
      copy.reset();
    });
    watch.push_back(owner);
    return Tensor::wrap(t.dtype(), t.shape(), copy->data(), owner);
  };
  for (bool prepack : {true, false}) {
    log->clear();
    std::vector<std::weak_ptr<void>> watch;
    RawExperts raw;
    {
      RawExperts r = random_raw(rng, s);
      auto track_m = [&](RawMatrix& m, const std::string& p) {
        m.weights = tracked(m.weights, p + ".weights", watch);
        m.scales = tracked(m.scales, p + ".scales", watch);
        if (m.zero_points) m.zero_points = tracked(*m.zero_points, p + ".zero_points", watch);
      };
      track_m(r.fc1, "fc1");
      track_m(*r.fc3, "fc3");
      track_m(r.fc2, "fc2");
      raw = std::move(r);
    }
    const size_t raw_bytes = raw.nbytes();
    auto be = make_cpu_backend({2, prepack, "auto"});
    auto packed = be->prepack(s, std::move(raw));
    if (prepack) {
      for (auto& w : watch) EXPECT_TRUE(w.expired()) << "a raw buffer is still referenced after prepack";
      ASSERT_EQ(log->size(), watch.size());
      // fc1 (gate) packs first, then fc3 (linear), then fc2: each is freed before the next is packed.
      EXPECT_EQ((*log)[0].substr(0, 3), "fc1");
      EXPECT_EQ((*log)[3].substr(0, 3), "fc3");
      EXPECT_EQ(log->back().substr(0, 3), "fc2");
      // Resident: codes (same bytes as raw, up to padding) + scales + unpacked zero points.
      EXPECT_GE(packed->resident_bytes(), raw_bytes / 2);
      EXPECT_LE(packed->resident_bytes(), raw_bytes * 3);
    } else {
      for (auto& w : watch) EXPECT_FALSE(w.expired());
      EXPECT_EQ(packed->resident_bytes(), raw_bytes);
      packed.reset();
      for (auto& w : watch) EXPECT_TRUE(w.expired());
    }
  }
}
