// Determinism (issue 7 item 5): on the CPU backend, the same spec, weights and inputs give bitwise
// identical output
//   - across repeated runs of one layer,
//   - across thread counts 1, 2, 3, 4 (make_backend("cpu", LayerOptions{.threads = n})),
//   - for every ISA path this machine has (portable, avx2, avx512) and with prepack on and off,
// and the reference backend is bitwise repeatable too. Different ISAs may round differently (they sum
// in different orders, held to a tolerance by cpu_backend_test), so outputs are compared only within
// one (isa, prepack) configuration. Token counts straddle thread splits (1, 7, 64, 257 rows, a 3-D
// input) and routings include k = E, all tokens on one expert and the sparse mixer.
//
// Outputs are poisoned (NaN bit pattern 0x7fa5a5a5 in every byte group) before each run, so an element
// the backend forgot to write fails the comparison too. A failure prints the configuration, the first
// differing element and both values.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <sstream>
#include <thread>
#include <string>
#include <vector>

#include "qmoe/backend.h"
#include "qmoe/layer.h"
#include "qmoe/synthetic.h"
#include "bitwise_diff.h"
#include "cpu_isas.h"

namespace {

using namespace qmoe;

using test::isas;

struct DetCase {
  const char* name;
  MoeSpec spec;
  int64_t tokens;
  int64_t batch = 0;            // > 0: 3-D input
  bool router_weights = false;
  bool one_expert = false;      // every token routed to expert 0 (large logit)
};

std::vector<DetCase> cases() {
  std::vector<DetCase> v;
  MoeSpec a;
  a.num_experts = 8, a.k = 2, a.hidden = 128, a.inter = 96, a.bits = 4;
  v.push_back({"relu_int4_rowwise_f32_T257", a, 257});
  MoeSpec b = a;
  b.activation = Activation::swiglu, b.swiglu_fusion = SwigluFusion::interleaved, b.bits = 8, b.block_size = 32;
  b.act_dtype = DType::f16, b.scale_dtype = DType::f16, b.fc1_bias = b.fc2_bias = true;
  b.fc1_zero_points = b.fc2_zero_points = true, b.normalize_routing_weights = true;
  b.swiglu_limit = 7.f, b.activation_alpha = 1.702f, b.activation_beta = 1.f;
  v.push_back({"swiglu_fused_int8_block32_f16_T64", b, 64});
  MoeSpec c = a;
  c.activation = Activation::swiglu, c.swiglu_fusion = SwigluFusion::separate, c.bits = 2;
  c.act_dtype = DType::bf16, c.scale_dtype = DType::bf16, c.fc3_bias = true, c.fc3_zero_points = true;
  v.push_back({"swiglu_fc3_int2_bf16_3d", c, 48, 4});
  MoeSpec d = a;
  d.activation = Activation::silu, d.k = d.num_experts, d.normalize_routing_weights = true, d.block_size = 64;
  v.push_back({"silu_k_eq_E_block64_T7_router_weights", d, 7, 0, true});
  MoeSpec e = a;
  e.activation = Activation::gelu, e.swiglu_fusion = SwigluFusion::separate;
  v.push_back({"gelu_all_tokens_on_one_expert_T64", e, 64, 0, false, true});
  MoeSpec f = a;
  f.k = 2, f.use_sparse_mixer = true, f.activation = Activation::identity;
  v.push_back({"sparse_mixer_identity_T1", f, 1});
  return v;
}

SyntheticLayer make_layer(const DetCase& c) {
  SyntheticLayer l = make_synthetic_layer(
      c.spec, {.seed = 4242, .tokens = c.tokens, .batch = c.batch, .router_weights = c.router_weights});
  if (c.one_expert) {
    for (int64_t t = 0; t < c.tokens; ++t)
      store_from_float(c.spec.act_dtype, l.router_probs.data(), t * c.spec.num_experts, 20.f);
  }
  return l;
}

void poison(Tensor& y) {
  auto* p = static_cast<uint8_t*>(y.data());
  for (size_t i = 0; i < y.nbytes(); ++i) p[i] = (i % 4 == 3) ? 0x7f : 0xa5;
}

Tensor run_once(Backend& be, const PackedExperts& packed, const SyntheticLayer& l) {
  Tensor y(l.spec.act_dtype, l.input.shape());
  poison(y);
  be.run(packed, l.inputs(), y);
  return y;
}

using test::bitwise_diff;

TEST(Determinism, CpuBitwiseAcrossRunsAndThreadCounts) {
  for (const DetCase& c : cases()) {
    const SyntheticLayer l = make_layer(c);
    for (const std::string& isa : isas()) {
      for (bool prepack : {true, false}) {
        Tensor first;
        for (int threads : {1, 2, 3, 4}) {
          const std::string cfg = std::string(c.name) + " [" + l.spec.to_string() + "] isa=" + isa +
                                  " prepack=" + (prepack ? "1" : "0") + " threads=" + std::to_string(threads);
          std::unique_ptr<Backend> be = make_cpu_backend({.threads = threads, .prepack = prepack, .isa = isa});
          std::unique_ptr<PackedExperts> packed;
          ASSERT_NO_THROW(packed = be->prepack(l.spec, l.raw)) << cfg;
          for (int rep = 0; rep < 3; ++rep) {
            const Tensor y = run_once(*be, *packed, l);
            if (first.empty()) {
              first = y;
              continue;
            }
            const std::string d = bitwise_diff(first, y);
            ASSERT_EQ(d, "") << cfg << " run " << rep << " differs from threads=1 run 0: " << d;
          }
        }
      }
    }
  }
}

// The entry point the issue names: make_backend("cpu", LayerOptions{.threads = n}) and MoeLayer.
TEST(Determinism, MakeBackendAndMoeLayerAcrossThreadCounts) {
  for (const DetCase& c : cases()) {
    const SyntheticLayer l = make_layer(c);
    Tensor first;
    for (int threads : {1, 2, 3, 4}) {
      const std::string cfg = std::string(c.name) + " threads=" + std::to_string(threads);
      std::unique_ptr<Backend> be = make_backend("cpu", LayerOptions{.threads = threads});
      ASSERT_EQ(be->name().substr(0, 3), "cpu") << cfg;
      auto packed = be->prepack(l.spec, l.raw);
      const Tensor y = run_once(*be, *packed, l);
      MoeLayer layer(l.spec, l.raw, LayerOptions{.backend = "cpu", .threads = threads});
      Tensor y2(l.spec.act_dtype, l.input.shape());
      poison(y2);
      layer.run(l.inputs(), y2);
      EXPECT_EQ(bitwise_diff(y, y2), "") << cfg << ": MoeLayer::run differs from Backend::run";
      if (first.empty()) {
        first = y;
        continue;
      }
      const std::string d = bitwise_diff(first, y);
      EXPECT_EQ(d, "") << cfg << " differs from threads=1: " << d;
    }
  }
}

// Two layers run concurrently from two threads (each with its own 2-thread backend) give the same
// bytes as one run alone: no state shared between backend instances leaks into results.
TEST(Determinism, CpuConcurrentLayersMatchSequential) {
  const DetCase c = cases()[1];
  const SyntheticLayer l = make_layer(c);
  auto be0 = make_backend("cpu", LayerOptions{.threads = 2});
  auto packed0 = be0->prepack(l.spec, l.raw);
  const Tensor want = run_once(*be0, *packed0, l);
  auto be1 = make_backend("cpu", LayerOptions{.threads = 2});
  auto be2 = make_backend("cpu", LayerOptions{.threads = 2});
  auto p1 = be1->prepack(l.spec, l.raw);
  auto p2 = be2->prepack(l.spec, l.raw);
  Tensor y1, y2;
  std::thread t1([&] { for (int i = 0; i < 4; ++i) y1 = run_once(*be1, *p1, l); });
  std::thread t2([&] { for (int i = 0; i < 4; ++i) y2 = run_once(*be2, *p2, l); });
  t1.join();
  t2.join();
  EXPECT_EQ(bitwise_diff(want, y1), "");
  EXPECT_EQ(bitwise_diff(want, y2), "");
}

TEST(Determinism, ReferenceBitwiseAcrossRuns) {
  for (const DetCase& c : cases()) {
    const SyntheticLayer l = make_layer(c);
    auto be = make_reference_backend();
    auto packed = be->prepack(l.spec, l.raw);
    const Tensor a = run_once(*be, *packed, l);
    const Tensor b = run_once(*be, *packed, l);
    EXPECT_EQ(bitwise_diff(a, b), "") << c.name;
  }
}

}  // namespace
