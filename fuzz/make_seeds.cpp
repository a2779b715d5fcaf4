// make_seeds OUT_DIR: writes the seeds that need qmoe's own writers (packed files, raw QMoE
// safetensors) into OUT_DIR/packed_file and OUT_DIR/safetensors. fuzz/make_corpus.py runs it after
// writing the seeds Python can make by itself. Specs are tiny so each seed is a few KB.
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "qmoe/error.h"
#include "qmoe/spec.h"

namespace qmoe_fuzz {
void write_packed_seeds(const std::string& dir);
void write_raw_seeds(const std::string& dir);

std::vector<qmoe::MoeSpec> seed_specs() {
  std::vector<qmoe::MoeSpec> v;
  qmoe::MoeSpec a;  // E=2 k=1 H=16 I=32 int4 row-wise relu f32
  a.num_experts = 2, a.hidden = 16, a.inter = 32, a.k = 1, a.bits = 4;
  v.push_back(a);
  qmoe::MoeSpec b = a;  // swiglu interleaved, block-wise int8, fp16, zero points and biases
  b.activation = qmoe::Activation::swiglu, b.swiglu_fusion = qmoe::SwigluFusion::interleaved;
  b.bits = 8, b.block_size = 16, b.k = 2, b.normalize_routing_weights = true;
  b.act_dtype = qmoe::DType::f16, b.scale_dtype = qmoe::DType::f16;
  b.fc1_bias = b.fc2_bias = true, b.fc1_zero_points = b.fc2_zero_points = true;
  b.swiglu_limit = 7.f, b.activation_alpha = 1.702f, b.activation_beta = 1.f;
  v.push_back(b);
  qmoe::MoeSpec c = a;  // swiglu with separate fc3, int2, bf16, sparse mixer
  c.activation = qmoe::Activation::swiglu, c.swiglu_fusion = qmoe::SwigluFusion::separate;
  c.bits = 2, c.k = 2, c.num_experts = 3, c.use_sparse_mixer = true;
  c.act_dtype = qmoe::DType::bf16, c.scale_dtype = qmoe::DType::bf16, c.fc3_bias = true, c.fc3_zero_points = true;
  v.push_back(c);
  qmoe::MoeSpec d = a;  // E=1, gelu, block 32 int4, concatenated not allowed for gelu -> fusion 0
  d.num_experts = 1, d.activation = qmoe::Activation::gelu, d.block_size = 32, d.hidden = 64, d.inter = 32;
  v.push_back(d);
  return v;
}
}  // namespace qmoe_fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds OUT_DIR\n");
    return 2;
  }
  const std::string out = argv[1];
  try {
    std::filesystem::create_directories(out + "/packed_file");
    std::filesystem::create_directories(out + "/safetensors");
    qmoe_fuzz::write_packed_seeds(out + "/packed_file");
    qmoe_fuzz::write_raw_seeds(out + "/safetensors");
  } catch (const qmoe::Error& e) {
    std::fprintf(stderr, "make_seeds: %s\n", e.what());
    return 1;
  }
  return 0;
}
