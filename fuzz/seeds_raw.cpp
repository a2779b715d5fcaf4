// Seed files for fuzz_safetensors: raw QMoE safetensors written with write_raw_safetensors.
#include <string>
#include <vector>

#include "qmoe/checkpoint.h"
#include "qmoe/synthetic.h"

namespace qmoe_fuzz {

std::vector<qmoe::MoeSpec> seed_specs();

void write_raw_seeds(const std::string& dir) {
  int n = 0;
  for (const qmoe::MoeSpec& s : seed_specs()) {
    qmoe::SyntheticLayer l = qmoe::make_synthetic_layer(s, {.seed = uint64_t(n + 7), .tokens = 2});
    qmoe::RawLayer r;
    r.spec = s;
    r.raw = l.raw;
    r.metadata = {{"family", "synthetic"}, {"source", "qmoe fuzz seed"}};
    if (n == 0) {
      r.router_weight = qmoe::Tensor(qmoe::DType::f32, {s.num_experts, s.hidden});
      r.router_bias = qmoe::Tensor(qmoe::DType::f32, {s.num_experts});
    }
    qmoe::write_raw_safetensors(dir + "/raw_" + std::to_string(n) + ".safetensors", r);
    ++n;
  }
}

}  // namespace qmoe_fuzz
