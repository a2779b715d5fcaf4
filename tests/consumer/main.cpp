// Quantizes a two-expert layer, runs it on the reference and CPU backends and checks they agree:
// proves the installed headers, library and CMake package are complete and usable.
#include <cmath>
#include <cstdio>
#include <random>

#include "qmoe/layer.h"
#include "qmoe/quantize.h"

int main() {
  qmoe::MoeSpec spec;
  spec.num_experts = 2, spec.k = 1, spec.hidden = 64, spec.inter = 32, spec.bits = 4, spec.block_size = 32;
  spec.activation = qmoe::Activation::silu;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 0.1f);
  auto random = [&](qmoe::Shape shape) {
    qmoe::Tensor t(qmoe::DType::f32, shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.data_as<float>()[i] = nd(rng);
    return t;
  };
  const qmoe::QuantizeOptions q{.bits = 4, .block_size = 32};
  qmoe::RawExperts raw;
  raw.fc1 = qmoe::quantize_experts(random({2, 32, 64}).view(), q);
  raw.fc2 = qmoe::quantize_experts(random({2, 64, 32}).view(), q);
  qmoe::Tensor x = random({3, 64}), logits = random({3, 2});
  const qmoe::MoeInputs in{x.view(), logits.view(), std::nullopt};

  qmoe::MoeLayer ref(spec, raw, {.backend = "reference"}), cpu(spec, raw, {.backend = "cpu"});
  const qmoe::Tensor a = ref.run(in), b = cpu.run(in);
  double err = 0, norm = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    err += std::pow(a.data_as<float>()[i] - b.data_as<float>()[i], 2);
    norm += std::pow(a.data_as<float>()[i], 2);
  }
  const double rel = std::sqrt(err / norm);
  std::printf("consumer: %s; cpu vs reference rel err %.2e\n", spec.to_string().c_str(), rel);
  return norm > 0 && rel < 1e-5 ? 0 : 1;
}
