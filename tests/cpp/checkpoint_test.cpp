// Hugging Face checkpoint import: small synthetic checkpoints with the real tensor names and layouts
// of each family (written with qmoe's safetensors writer), family detection, shapes, the fused and
// MXFP4 gpt-oss layouts, sharding, quantization into each SwiGLU fusion mode, the raw QMoE file round
// trip, and error messages for what does not fit.
//
// Quantization checks are exact: the quantizer works row by row along K, so row 2i of the
// interleaved fc1 must hold the very bytes quantize_matrix gives for gate row i (no tolerance).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "qmoe/checkpoint.h"
#include "qmoe/error.h"
#include "qmoe/onnx_export.h"
#include "qmoe/onnx_model.h"
#include "qmoe/quantize.h"
#include "qmoe/safetensors.h"

#include "temp_dir.h"

using namespace qmoe;
namespace fs = std::filesystem;

namespace {

using test::TempDir;

void write_text(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// A synthetic checkpoint: named tensors with deterministic values in [-1, 1).
struct Builder {
  std::vector<std::pair<std::string, Tensor>> tensors;
  uint32_t seed = 1;

  Tensor& add(const std::string& name, DType dt, Shape shape) {
    Tensor t(dt, std::move(shape));
    std::mt19937 rng(seed++);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (int64_t i = 0; i < t.numel(); ++i) store_from_float(dt, t.data(), i, u(rng));
    tensors.emplace_back(name, std::move(t));
    return tensors.back().second;
  }
  const Tensor& get(const std::string& name) const {
    for (const auto& [n, t] : tensors)
      if (n == name) return t;
    throw std::runtime_error("test: no tensor " + name);
  }
  void write(const std::string& path) const { write_subset(path, [](const std::string&) { return true; }); }
  template <class Pred>
  void write_subset(const std::string& path, Pred keep) const {
    std::vector<NamedView> v;
    for (const auto& [n, t] : tensors)
      if (keep(n)) v.push_back({n, t.view()});
    write_safetensors(path, v);
  }
};

constexpr int64_t E = 4, H = 64, I = 32;

// Per-expert Linear.weight tensors: gate/up [I, H], down [H, I] under `base` + "{e}." + names.
void add_experts(Builder& b, const std::string& base, const char* gate, const char* up, const char* down, DType dt,
                 int64_t n = E) {
  for (int64_t e = 0; e < n; ++e) {
    const std::string p = base + std::to_string(e) + ".";
    b.add(p + gate + ".weight", dt, {I, H});
    b.add(p + up + ".weight", dt, {I, H});
    b.add(p + down + ".weight", dt, {H, I});
  }
}

void add_attention(Builder& b, int layer, bool layernorm_bias) {
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  b.add(p + "self_attn.q_proj.weight", DType::bf16, {H, H});
  b.add(p + "input_layernorm.weight", DType::bf16, {H});
  if (layernorm_bias) b.add(p + "input_layernorm.bias", DType::bf16, {H});
}

Builder mixtral(DType dt, bool phi) {
  Builder b;
  for (int L = 0; L < 2; ++L) {
    add_attention(b, L, phi);
    const std::string p = "model.layers." + std::to_string(L) + ".block_sparse_moe.";
    b.add(p + "gate.weight", dt, {E, H});
    add_experts(b, p + "experts.", "w1", "w3", "w2", dt);
  }
  b.add("model.embed_tokens.weight", DType::bf16, {100, H});
  return b;
}

// Float values of tensor `name` as stored (what the loader must reproduce).
float at(const Builder& b, const std::string& name, int64_t i) {
  const Tensor& t = b.get(name);
  return load_as_float(t.dtype(), t.data(), i);
}

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    FAIL() << "expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// Row r of expert e of a [E, N, Kb] uint8 tensor.
const uint8_t* row_bytes(const Tensor& t, int64_t e, int64_t r) {
  return t.data_as<uint8_t>() + (e * t.dim(1) + r) * t.dim(2);
}

// Scale bytes of row r of expert e ([E, N] or [E, N, nb]).
std::vector<uint8_t> scale_bytes(const Tensor& t, int64_t e, int64_t r) {
  const int64_t per_row = t.rank() == 3 ? t.dim(2) : 1;
  const size_t n = size_t(per_row) * dtype_size(t.dtype());
  const uint8_t* p = static_cast<const uint8_t*>(t.data()) + size_t(e * t.dim(1) + r) * n;
  return {p, p + n};
}

std::vector<uint8_t> scale_bytes_1(const Tensor& t, int64_t r) {  // quantize_matrix scales [N] or [N, nb]
  const int64_t per_row = t.rank() == 2 ? t.dim(1) : 1;
  const size_t n = size_t(per_row) * dtype_size(t.dtype());
  const uint8_t* p = static_cast<const uint8_t*>(t.data()) + size_t(r) * n;
  return {p, p + n};
}

// Checks fc rows [row0 + j*stride] of expert e hold quantize_matrix(src)'s row j bytes, for all j.
void expect_rows_match(const RawMatrix& m, int64_t e, const Tensor& src, const QuantizeOptions& q, int64_t row0,
                       int64_t stride, const std::string& what) {
  const QuantizedMatrix ref = quantize_matrix(src.view(), q);
  const int64_t rows = src.dim(0);
  const int64_t kb = ref.weights.dim(1);
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t r = row0 + j * stride;
    ASSERT_EQ(std::memcmp(row_bytes(m.weights, e, r), ref.weights.data_as<uint8_t>() + j * kb, size_t(kb)), 0)
        << what << " expert " << e << " row " << r << " (source row " << j << ")";
    ASSERT_EQ(scale_bytes(m.scales, e, r), scale_bytes_1(ref.scales, j)) << what << " scales expert " << e << " row " << r;
  }
}

}  // namespace

TEST(Checkpoint, MixtralDetectedWithRoutingFacts) {
  TempDir dir;
  Builder b = mixtral(DType::bf16, false);
  b.write(dir / "model.safetensors");
  CheckpointLayer L = open_checkpoint_layer(dir.str(), 1);
  EXPECT_EQ(L.family, "mixtral");
  EXPECT_EQ(L.naming, ExpertNaming::block_sparse_moe);
  EXPECT_EQ(L.prefix, "model.layers.1.");
  EXPECT_EQ(L.num_experts, E);
  EXPECT_EQ(L.hidden, H);
  EXPECT_EQ(L.inter, I);
  EXPECT_EQ(L.source_dtype, "BF16");
  EXPECT_EQ(L.k, 2);
  EXPECT_EQ(L.normalize_routing_weights, true);
  EXPECT_EQ(L.router_weight_name, "model.layers.1.block_sparse_moe.gate.weight");
  EXPECT_EQ(L.router_weight().shape(), (Shape{E, H}));
  // w1 = gate, w3 = up, w2 = down, as stored (bf16 -> fp32 is exact).
  const ExpertWeights w = L.expert(2);
  const std::string p = "model.layers.1.block_sparse_moe.experts.2.";
  for (int64_t i : {int64_t(0), int64_t(7), I * H - 1}) {
    EXPECT_EQ(w.gate.data_as<float>()[i], at(b, p + "w1.weight", i));
    EXPECT_EQ(w.up.data_as<float>()[i], at(b, p + "w3.weight", i));
    EXPECT_EQ(w.down.data_as<float>()[i], at(b, p + "w2.weight", i));
  }
  EXPECT_FALSE(w.gate_bias.has_value());
  EXPECT_THROW(L.expert(E), Error);
  EXPECT_NE(L.summary().find("mixtral layer 1: E=4 H=64 I=32 BF16"), std::string::npos) << L.summary();
}

TEST(Checkpoint, PhiMoeByLayerNormBias) {
  TempDir dir;
  mixtral(DType::f16, true).write(dir / "model.safetensors");
  CheckpointLayer L = open_checkpoint_layer(dir / "model.safetensors", 0);
  EXPECT_EQ(L.family, "phimoe");
  EXPECT_TRUE(L.use_sparse_mixer);
  EXPECT_EQ(L.k, 2);
  EXPECT_EQ(L.source_dtype, "F16");
  CheckpointQuantizeOptions opt;
  const MoeSpec s = checkpoint_spec(L, opt);
  EXPECT_TRUE(s.use_sparse_mixer);
  EXPECT_EQ(s.k, 2);
}

TEST(Checkpoint, QwenMoeFromConfigAndDenseLayerError) {
  TempDir dir;
  Builder b;
  add_attention(b, 0, false);
  b.add("model.layers.0.mlp.gate_proj.weight", DType::f32, {I, H});  // layer 0 is dense
  add_attention(b, 1, false);
  b.add("model.layers.1.mlp.gate.weight", DType::f32, {E, H});
  add_experts(b, "model.layers.1.mlp.experts.", "gate_proj", "up_proj", "down_proj", DType::f32);
  b.write(dir / "model.safetensors");
  write_text(dir / "config.json", R"({"model_type":"qwen3_moe","num_experts_per_tok":3,"norm_topk_prob":true,"num_experts":4})");
  CheckpointLayer L = open_checkpoint_layer(dir.str(), 1);
  EXPECT_EQ(L.family, "qwen3_moe");
  EXPECT_EQ(L.naming, ExpertNaming::mlp_experts);
  EXPECT_EQ(L.k, 3);
  EXPECT_EQ(L.normalize_routing_weights, true);
  EXPECT_EQ(L.source_dtype, "F32");
  EXPECT_EQ(L.expert(3).down.data_as<float>()[5], at(b, "model.layers.1.mlp.experts.3.down_proj.weight", 5));
  EXPECT_EQ(checkpoint_moe_layers(dir.str()), (std::vector<int64_t>{1}));
  expect_error([&] { open_checkpoint_layer(dir.str(), 0); }, "layer 0 has no MoE experts");
  expect_error([&] { open_checkpoint_layer(dir.str(), 7); }, "layers with experts: 1");
}

TEST(Checkpoint, OlmoeAndUnknownRoutingNeedsCaller) {
  TempDir dir;
  Builder b;
  add_experts(b, "model.layers.0.mlp.experts.", "gate_proj", "up_proj", "down_proj", DType::bf16);
  b.add("model.layers.0.mlp.gate.weight", DType::bf16, {E, H});
  b.write(dir / "model.safetensors");
  // Without config.json the names fit Qwen3-MoE and OLMoE alike: k must come from the caller.
  CheckpointLayer L = open_checkpoint_layer(dir.str(), 0);
  EXPECT_EQ(L.family, "mlp_experts");
  EXPECT_FALSE(L.k.has_value());
  CheckpointQuantizeOptions opt;
  expect_error([&] { checkpoint_spec(L, opt); }, "pass k explicitly");
  opt.k = 2;
  expect_error([&] { checkpoint_spec(L, opt); }, "norm_topk_prob");
  opt.normalize_routing_weights = false;
  EXPECT_EQ(checkpoint_spec(L, opt).k, 2);
  write_text(dir / "config.json", R"({"model_type":"olmoe","num_experts_per_tok":2,"norm_topk_prob":false})");
  L = open_checkpoint_layer(dir.str(), 0);
  EXPECT_EQ(L.family, "olmoe");
  EXPECT_EQ(L.k, 2);
  EXPECT_EQ(L.normalize_routing_weights, false);
}

TEST(Checkpoint, Qwen2MoeBySharedExpertName) {
  TempDir dir;
  Builder b;
  add_experts(b, "model.layers.0.mlp.experts.", "gate_proj", "up_proj", "down_proj", DType::bf16);
  b.add("model.layers.0.mlp.shared_expert.gate_proj.weight", DType::bf16, {I, H});
  b.add("model.layers.0.mlp.shared_expert_gate.weight", DType::bf16, {1, H});
  b.write(dir / "model.safetensors");
  CheckpointLayer L = open_checkpoint_layer(dir.str(), 0);
  EXPECT_EQ(L.family, "qwen2_moe");
  EXPECT_EQ(L.num_experts, E);  // the shared expert is not a routed expert
  EXPECT_EQ(L.normalize_routing_weights, false);
}

TEST(Checkpoint, DeepSeekV3Sharded) {
  TempDir dir;
  Builder b;
  add_attention(b, 3, false);
  b.add("model.layers.3.mlp.gate.weight", DType::f32, {E, H});
  b.add("model.layers.3.mlp.gate.e_score_correction_bias", DType::f32, {E});
  add_experts(b, "model.layers.3.mlp.experts.", "gate_proj", "up_proj", "down_proj", DType::bf16);
  b.add("model.layers.3.mlp.shared_experts.gate_proj.weight", DType::bf16, {I, H});
  b.add("model.layers.3.mlp.shared_experts.up_proj.weight", DType::bf16, {I, H});
  b.add("model.layers.3.mlp.shared_experts.down_proj.weight", DType::bf16, {H, I});
  // Experts 0-1 in shard 1, the rest in shard 2: one expert's three matrices never span shards here,
  // but the layer does.
  auto in_first = [](const std::string& n) {
    return n.find("experts.0.") != std::string::npos || n.find("experts.1.") != std::string::npos ||
           n.find("self_attn") != std::string::npos;
  };
  b.write_subset(dir / "model-00001-of-00002.safetensors", in_first);
  b.write_subset(dir / "model-00002-of-00002.safetensors", [&](const std::string& n) { return !in_first(n); });
  std::string wm;
  for (const auto& [n, t] : b.tensors)
    wm += (wm.empty() ? "" : ",") + ("\"" + n + "\":\"model-0000" + (in_first(n) ? "1" : "2") + "-of-00002.safetensors\"");
  write_text(dir / "model.safetensors.index.json", "{\"metadata\":{},\"weight_map\":{" + wm + "}}");
  write_text(dir / "config.json",
             R"({"model_type":"deepseek_v3","num_experts_per_tok":2,"norm_topk_prob":true,"scoring_func":"sigmoid",)"
             R"("topk_method":"noaux_tc","routed_scaling_factor":2.5,"n_routed_experts":4})");
  CheckpointLayer L = open_checkpoint_layer(dir.str(), 3);
  EXPECT_EQ(L.family, "deepseek_v3");
  EXPECT_EQ(L.num_experts, E);
  EXPECT_EQ(L.router_bias_name, "model.layers.3.mlp.gate.e_score_correction_bias");
  std::string notes;
  for (const auto& n : L.notes) notes += n + "\n";
  EXPECT_NE(notes.find("sigmoid"), std::string::npos) << notes;
  EXPECT_NE(notes.find("routed_scaling_factor=2.5"), std::string::npos) << notes;
  EXPECT_NE(notes.find("shared expert"), std::string::npos) << notes;
  EXPECT_EQ(L.expert(3).up.data_as<float>()[9], at(b, "model.layers.3.mlp.experts.3.up_proj.weight", 9));
  // Without config.json the correction bias still marks V3.
  fs::remove(dir / "config.json");
  EXPECT_EQ(open_checkpoint_layer(dir / "model.safetensors.index.json", 3).family, "deepseek_v3");
}

TEST(Checkpoint, GptOssFusedLayoutAndQuantization) {
  TempDir dir;
  Builder b;
  const std::string p = "model.layers.0.mlp.";
  b.add(p + "router.weight", DType::bf16, {E, H});
  b.add(p + "router.bias", DType::bf16, {E});
  b.add(p + "experts.gate_up_proj", DType::bf16, {E, H, 2 * I});
  b.add(p + "experts.gate_up_proj_bias", DType::bf16, {E, 2 * I});
  b.add(p + "experts.down_proj", DType::bf16, {E, I, H});
  b.add(p + "experts.down_proj_bias", DType::bf16, {E, H});
  b.write(dir / "model.safetensors");
  write_text(dir / "config.json", R"({"model_type":"gpt_oss","num_experts_per_tok":2,"swiglu_limit":7.0})");
  CheckpointLayer L = open_checkpoint_layer(dir.str(), 0);
  EXPECT_EQ(L.family, "gpt_oss");
  EXPECT_EQ(L.naming, ExpertNaming::gpt_oss_fused);
  EXPECT_EQ(L.num_experts, E);
  EXPECT_EQ(L.hidden, H);
  EXPECT_EQ(L.inter, I);
  EXPECT_TRUE(L.has_bias);
  EXPECT_EQ(L.k, 2);  // config.json wins over the family's 4
  EXPECT_EQ(L.swiglu_limit, 7.0f);
  EXPECT_EQ(L.activation_alpha, 1.702f);
  EXPECT_EQ(L.activation_beta, 1.0f);
  EXPECT_EQ(L.router_bias_name, p + "router.bias");

  // gate_up_proj[e][h][2i] = gate[i][h], [2i+1] = up[i][h]; down_proj[e][i][h] = down[h][i].
  const int64_t e = 3;
  const ExpertWeights w = L.expert(e);
  for (int64_t i : {int64_t(0), int64_t(5), I - 1})
    for (int64_t h : {int64_t(0), int64_t(17), H - 1}) {
      EXPECT_EQ(w.gate.data_as<float>()[i * H + h], at(b, p + "experts.gate_up_proj", (e * H + h) * 2 * I + 2 * i));
      EXPECT_EQ(w.up.data_as<float>()[i * H + h], at(b, p + "experts.gate_up_proj", (e * H + h) * 2 * I + 2 * i + 1));
      EXPECT_EQ(w.down.data_as<float>()[h * I + i], at(b, p + "experts.down_proj", (e * I + i) * H + h));
    }
  EXPECT_EQ(w.gate_bias->data_as<float>()[4], at(b, p + "experts.gate_up_proj_bias", e * 2 * I + 8));
  EXPECT_EQ(w.up_bias->data_as<float>()[4], at(b, p + "experts.gate_up_proj_bias", e * 2 * I + 9));
  EXPECT_EQ(w.down_bias->data_as<float>()[11], at(b, p + "experts.down_proj_bias", e * H + 11));

  CheckpointQuantizeOptions opt;
  opt.quant.bits = 4;
  opt.quant.block_size = 32;
  int64_t calls = 0, last = 0;
  opt.progress = [&](int64_t done, int64_t total) {
    ++calls;
    last = done;
    EXPECT_EQ(total, E);
  };
  const RawLayer r = quantize_checkpoint_layer(L, opt);
  EXPECT_EQ(calls, E);
  EXPECT_EQ(last, E);
  const MoeSpec& s = r.spec;
  EXPECT_EQ(s.swiglu_fusion, SwigluFusion::interleaved);
  EXPECT_EQ(s.activation, Activation::swiglu);
  EXPECT_EQ(s.swiglu_limit, 7.0f);
  EXPECT_EQ(s.activation_alpha, 1.702f);
  EXPECT_EQ(s.activation_beta, 1.0f);
  EXPECT_TRUE(s.normalize_routing_weights);
  EXPECT_TRUE(s.fc1_bias && s.fc2_bias);
  EXPECT_FALSE(r.raw.fc3.has_value());
  EXPECT_EQ(r.raw.fc1.weights.shape(), (Shape{E, 2 * I, H / 2}));
  EXPECT_EQ(r.raw.fc1.scales.shape(), (Shape{E, 2 * I, H / 32}));
  for (int64_t x = 0; x < E; ++x) {
    const ExpertWeights wx = L.expert(x);
    expect_rows_match(r.raw.fc1, x, wx.gate, opt.quant, 0, 2, "fc1 gate");
    expect_rows_match(r.raw.fc1, x, wx.up, opt.quant, 1, 2, "fc1 up");
    expect_rows_match(r.raw.fc2, x, wx.down, opt.quant, 0, 1, "fc2");
  }
  // Interleaved bias: fc1_experts_bias[e][2i] = gate bias, [2i+1] = up bias (T = float32).
  EXPECT_EQ(r.raw.fc1.bias->data_as<float>()[e * 2 * I + 8], w.gate_bias->data_as<float>()[4]);
  EXPECT_EQ(r.raw.fc1.bias->data_as<float>()[e * 2 * I + 9], w.up_bias->data_as<float>()[4]);
  EXPECT_EQ(r.raw.fc2.bias->data_as<float>()[e * H + 11], w.down_bias->data_as<float>()[11]);
  ASSERT_TRUE(r.router_weight && r.router_bias);
  EXPECT_EQ(r.metadata.at("source_family"), "gpt_oss");
}

TEST(Checkpoint, GptOssMxfp4Decoding) {
  TempDir dir;
  Builder b;
  const std::string p = "model.layers.0.mlp.experts.";
  const int64_t G = H / 32, Gi = I / 32;
  b.tensors.reserve(8);  // the references below must survive later add() calls
  Tensor& gub = b.add(p + "gate_up_proj_blocks", DType::u8, {E, 2 * I, G, 16});
  Tensor& gus = b.add(p + "gate_up_proj_scales", DType::u8, {E, 2 * I, G});
  Tensor& dnb = b.add(p + "down_proj_blocks", DType::u8, {E, H, Gi, 16});
  Tensor& dns = b.add(p + "down_proj_scales", DType::u8, {E, H, Gi});
  std::mt19937 rng(7);
  for (Tensor* t : {&gub, &dnb})
    for (int64_t i = 0; i < t->numel(); ++i) t->data_as<uint8_t>()[i] = uint8_t(rng());
  for (Tensor* t : {&gus, &dns})
    for (int64_t i = 0; i < t->numel(); ++i) t->data_as<uint8_t>()[i] = uint8_t(120 + rng() % 12);  // 2^-7..2^4
  b.add(p + "gate_up_proj_bias", DType::bf16, {E, 2 * I});
  b.add(p + "down_proj_bias", DType::bf16, {E, H});
  b.write(dir / "model.safetensors");
  CheckpointLayer L = open_checkpoint_layer(dir.str(), 0);
  EXPECT_EQ(L.naming, ExpertNaming::gpt_oss_mxfp4);
  EXPECT_EQ(L.family, "gpt_oss");
  EXPECT_EQ(L.hidden, H);
  EXPECT_EQ(L.inter, I);
  EXPECT_EQ(L.k, 4);
  const float lut[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.f, -.5f, -1, -1.5f, -2, -3, -4, -6};
  // Element c of row r: byte (c % 32) / 2 of block c / 32, low nibble for even c, times 2^(scale-127).
  auto mx = [&](const Tensor& blocks, const Tensor& scales, int64_t row, int64_t groups, int64_t c) {
    const uint8_t byte = blocks.data_as<uint8_t>()[(row * groups + c / 32) * 16 + (c % 32) / 2];
    const int code = c % 2 ? byte >> 4 : byte & 15;
    return std::ldexp(lut[code], int(scales.data_as<uint8_t>()[row * groups + c / 32]) - 127);
  };
  const int64_t e = 2;
  const ExpertWeights w = L.expert(e);
  for (int64_t i = 0; i < I; ++i)
    for (int64_t h = 0; h < H; ++h) {
      ASSERT_EQ(w.gate.data_as<float>()[i * H + h], mx(gub, gus, e * 2 * I + 2 * i, G, h)) << i << "," << h;
      ASSERT_EQ(w.up.data_as<float>()[i * H + h], mx(gub, gus, e * 2 * I + 2 * i + 1, G, h)) << i << "," << h;
      ASSERT_EQ(w.down.data_as<float>()[h * I + i], mx(dnb, dns, e * H + h, Gi, i)) << h << "," << i;
    }
}

TEST(Checkpoint, FusionModesAndRawFileRoundTrip) {
  TempDir dir;
  Builder b = mixtral(DType::bf16, false);
  b.write(dir / "model.safetensors");
  const CheckpointLayer L = open_checkpoint_layer(dir.str(), 0);
  for (SwigluFusion fusion : {SwigluFusion::separate, SwigluFusion::interleaved, SwigluFusion::concatenated})
    for (bool symmetric : {true, false}) {
      SCOPED_TRACE("fusion " + std::to_string(int(fusion)) + " symmetric " + std::to_string(symmetric));
      CheckpointQuantizeOptions opt;
      opt.fusion = fusion;
      opt.quant.bits = symmetric ? 8 : 2;
      opt.quant.block_size = symmetric ? 0 : 16;
      opt.quant.symmetric = symmetric;
      opt.quant.scale_dtype = DType::f16;
      opt.act_dtype = DType::f16;
      const RawLayer r = quantize_checkpoint_layer(L, opt);
      EXPECT_EQ(r.spec.swiglu_fusion, fusion);
      EXPECT_EQ(r.raw.fc3.has_value(), fusion == SwigluFusion::separate);
      EXPECT_EQ(r.spec.fc1_zero_points, !symmetric);
      for (int64_t e = 0; e < E; ++e) {
        const ExpertWeights w = L.expert(e);
        switch (fusion) {
          case SwigluFusion::separate:
            expect_rows_match(r.raw.fc1, e, w.gate, opt.quant, 0, 1, "fc1");
            expect_rows_match(*r.raw.fc3, e, w.up, opt.quant, 0, 1, "fc3");
            break;
          case SwigluFusion::interleaved:
            expect_rows_match(r.raw.fc1, e, w.gate, opt.quant, 0, 2, "fc1 gate");
            expect_rows_match(r.raw.fc1, e, w.up, opt.quant, 1, 2, "fc1 up");
            break;
          case SwigluFusion::concatenated:
            expect_rows_match(r.raw.fc1, e, w.gate, opt.quant, 0, 1, "fc1 gate");
            expect_rows_match(r.raw.fc1, e, w.up, opt.quant, I, 1, "fc1 up");
            break;
        }
        expect_rows_match(r.raw.fc2, e, w.down, opt.quant, 0, 1, "fc2");
      }
      // Raw file round trip: same spec, same bytes, source facts kept.
      const std::string path = dir / "raw.safetensors";
      write_raw_safetensors(path, r);
      const RawLayer back = read_raw_safetensors(path);
      EXPECT_EQ(back.spec.to_string(), r.spec.to_string());
      EXPECT_EQ(back.spec.k, 2);
      EXPECT_TRUE(back.spec.normalize_routing_weights);
      EXPECT_EQ(std::isinf(back.spec.swiglu_limit), true);
      auto same = [](const Tensor& a, const Tensor& c) {
        return a.shape() == c.shape() && a.dtype() == c.dtype() && std::memcmp(a.data(), c.data(), a.nbytes()) == 0;
      };
      EXPECT_TRUE(same(back.raw.fc1.weights, r.raw.fc1.weights));
      EXPECT_TRUE(same(back.raw.fc1.scales, r.raw.fc1.scales));
      EXPECT_TRUE(same(back.raw.fc2.weights, r.raw.fc2.weights));
      if (!symmetric) EXPECT_TRUE(same(*back.raw.fc2.zero_points, *r.raw.fc2.zero_points));
      if (r.raw.fc3) EXPECT_TRUE(same(back.raw.fc3->weights, r.raw.fc3->weights));
      ASSERT_TRUE(back.router_weight.has_value());
      EXPECT_TRUE(same(*back.router_weight, *r.router_weight));
      EXPECT_EQ(back.metadata.at("source_family"), "mixtral");
      EXPECT_EQ(back.metadata.at("source_layer"), "0");
      const auto meta = SafetensorsFile::open(path).metadata();
      EXPECT_EQ(meta.at("symmetric"), symmetric ? "1" : "0");
      EXPECT_EQ(meta.at("expert_weight_bits"), symmetric ? "8" : "2");
      EXPECT_EQ(meta.at("activation_type"), "swiglu");
      EXPECT_EQ(meta.at("swiglu_limit"), "inf");
    }
}

TEST(Checkpoint, DequantizedLayerIsCloseToSource) {
  // The interleaving is a layout fact: dequantized fc1 row 2i must approximate gate row i within one
  // quantization step (symmetric 8-bit: |error| <= |scale| = max|row| / 128 at the clamped end).
  TempDir dir;
  mixtral(DType::f32, false).write(dir / "model.safetensors");
  const CheckpointLayer L = open_checkpoint_layer(dir.str(), 1);
  CheckpointQuantizeOptions opt;
  opt.quant.bits = 8;
  const RawLayer r = quantize_checkpoint_layer(L, opt);
  const Tensor deq = dequantize_experts(r.raw.fc1, 8, 0, H);
  for (int64_t e = 0; e < E; ++e) {
    const ExpertWeights w = L.expert(e);
    for (int64_t i = 0; i < I; ++i) {
      float mx = 0;
      for (int64_t h = 0; h < H; ++h) mx = std::max(mx, std::fabs(w.gate.data_as<float>()[i * H + h]));
      for (int64_t h = 0; h < H; ++h) {
        const float got = deq.data_as<float>()[(e * 2 * I + 2 * i) * H + h];
        ASSERT_LE(std::fabs(got - w.gate.data_as<float>()[i * H + h]), mx / 128 * 1.0001f) << e << " " << i << " " << h;
      }
    }
  }
}

TEST(Checkpoint, ErrorsNameWhatWasFound) {
  TempDir dir;
  {
    Builder b;
    b.add("model.layers.0.mlp.gate_proj.weight", DType::bf16, {I, H});
    b.write(dir / "model.safetensors");
    expect_error([&] { open_checkpoint_layer(dir.str(), 0); }, "no MoE experts found among 1 tensors (e.g. model.layers.0.mlp.gate_proj.weight)");
  }
  {
    Builder b;
    b.add("model.layers.0.mlp.experts.0.w_in.weight", DType::bf16, {I, H});
    b.write(dir / "model.safetensors");
    expect_error([&] { open_checkpoint_layer(dir.str(), 0); }, "not in a recognised naming (found: model.layers.0.mlp.experts.0.w_in.weight");
  }
  {
    Builder b;
    add_experts(b, "model.layers.0.mlp.experts.", "gate_proj", "up_proj", "down_proj", DType::bf16);
    b.tensors.erase(b.tensors.begin() + 3, b.tensors.begin() + 6);  // expert 1 missing
    b.write(dir / "model.safetensors");
    expect_error([&] { open_checkpoint_layer(dir.str(), 0); }, "numbered 0..3 with 3 present");
  }
  {
    Builder b;
    add_experts(b, "model.layers.0.mlp.experts.", "gate_proj", "up_proj", "down_proj", DType::bf16);
    b.tensors[7].second = Tensor(DType::bf16, {I, H + 2});  // expert 2 up_proj
    b.write(dir / "model.safetensors");
    expect_error([&] { open_checkpoint_layer(dir.str(), 0); }, "experts.2.up_proj.weight': expected shape [32, 64], got [32, 66]");
  }
  {
    // FP8 weights (as DeepSeek-V3 ships them) are refused with advice, by reading the header only.
    const std::string hdr = R"({"model.layers.0.mlp.experts.0.gate_proj.weight":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[0,4]}})";
    std::string file(8, '\0');
    for (int i = 0; i < 8; ++i) file[size_t(i)] = char(uint8_t(hdr.size() >> (8 * i)));
    write_text(dir / "model.safetensors", file + hdr + std::string(4, '\0'));
    expect_error([&] { open_checkpoint_layer(dir.str(), 0); }, "dtype F8_E4M3");
  }
  {
    Builder b = mixtral(DType::bf16, false);
    b.write(dir / "model.safetensors");
    write_text(dir / "config.json", R"({"model_type":"mixtral","num_experts_per_tok":9})");
    expect_error([&] { open_checkpoint_layer(dir.str(), 0); }, "says 9 experts per token, but layer 0 has 4 experts");
    write_text(dir / "config.json", "{");
    expect_error([&] { open_checkpoint_layer(dir.str(), 0); }, "config.json: not valid JSON");
    write_text(dir / "config.json", R"({"model_type":"mixtral","num_experts_per_tok":"2"})");
    expect_error([&] { open_checkpoint_layer(dir.str(), 0); }, "config.json: 'num_experts_per_tok' must be an integer, got \"2\"");
    write_text(dir / "config.json", R"({"text_config":{"norm_topk_prob":1}})");
    expect_error([&] { open_checkpoint_layer(dir.str(), 0); }, "'norm_topk_prob' must be true or false, got 1");
    fs::remove(dir / "config.json");
  }
}

TEST(Checkpoint, RawFileRejectsInconsistentFiles) {
  TempDir dir;
  mixtral(DType::bf16, false).write(dir / "model.safetensors");
  CheckpointQuantizeOptions opt;
  const RawLayer r = quantize_checkpoint_layer(open_checkpoint_layer(dir.str(), 0), opt);
  const std::string good = dir / "raw.safetensors";
  write_raw_safetensors(good, r);
  const SafetensorsFile f = SafetensorsFile::open(good);

  // Rewrites the file with edited metadata and/or tensors.
  auto rewrite = [&](std::map<std::string, std::string> meta, const std::string& drop, const NamedView* extra) {
    std::vector<NamedView> t;
    std::vector<Tensor> keep;
    for (const std::string& n : f.names()) {
      if (n == drop) continue;
      keep.push_back(f.tensor(n));
      t.push_back({n, keep.back().view()});
    }
    if (extra) t.push_back(*extra);
    const std::string p = dir / "bad.safetensors";
    write_safetensors(p, t, meta);
    return p;
  };
  auto meta = f.metadata();
  auto with = [&](const std::string& k, const std::string& v) {
    auto m = meta;
    m[k] = v;
    return m;
  };
  expect_error([&] { read_raw_safetensors(rewrite(with("expert_weight_bits", "3"), "", nullptr)); }, "expert_weight_bits: expected 2, 4 or 8, got 3");
  expect_error([&] { read_raw_safetensors(rewrite(with("hidden_size", "32"), "", nullptr)); }, "fc1_experts_weights: expected shape");
  expect_error([&] { read_raw_safetensors(rewrite(with("k", "x"), "", nullptr)); }, "'k'] = 'x' is not an integer");
  expect_error([&] { read_raw_safetensors(rewrite(with("inter_size", "4611686018427387904"), "", nullptr)); }, "outside [0, 2^31]");
  expect_error([&] { read_raw_safetensors(rewrite(with("num_experts", "-1"), "", nullptr)); }, "outside [0, 2^31]");
  expect_error([&] { read_raw_safetensors(rewrite(with("format", "other"), "", nullptr)); }, "format is 'other'");
  expect_error([&] { read_raw_safetensors(rewrite(with("symmetric", "0"), "", nullptr)); }, "symmetric = 0");
  expect_error([&] { read_raw_safetensors(rewrite(with("swiglu_fusion", "0"), "", nullptr)); }, "fc1_experts_weights: expected shape");
  expect_error([&] { read_raw_safetensors(rewrite(meta, "fc2_scales", nullptr)); }, "fc2_scales is missing");
  Tensor junk(DType::f32, {3});
  const NamedView extra{"junk", junk.view()};
  expect_error([&] { read_raw_safetensors(rewrite(meta, "", &extra)); }, "unexpected tensor 'junk'");
  auto m2 = meta;
  m2.erase("k");
  expect_error([&] { read_raw_safetensors(rewrite(m2, "", nullptr)); }, "__metadata__ has no 'k'");
  EXPECT_NO_THROW(read_raw_safetensors(rewrite(meta, "", nullptr)));
}

// ---- ONNX export: load_onnx (src/io) must give back the same spec and bytes ----

namespace {

void expect_same_layer(const MoeSpec& a, const RawExperts& ra, const MoeSpec& b, const RawExperts& rb) {
  EXPECT_EQ(a.to_string(), b.to_string());
  auto same = [](const Tensor& x, const Tensor& y, const char* what) {
    ASSERT_EQ(x.dtype(), y.dtype()) << what;
    ASSERT_EQ(shape_numel(x.shape()), shape_numel(y.shape())) << what;  // [E, N, 1] vs [E, N] is the same
    EXPECT_EQ(std::memcmp(x.data(), y.data(), x.nbytes()), 0) << what;
  };
  same(ra.fc1.weights, rb.fc1.weights, "fc1 weights");
  same(ra.fc1.scales, rb.fc1.scales, "fc1 scales");
  same(ra.fc2.weights, rb.fc2.weights, "fc2 weights");
  same(ra.fc2.scales, rb.fc2.scales, "fc2 scales");
  ASSERT_EQ(ra.fc1.bias.has_value(), rb.fc1.bias.has_value());
  if (ra.fc1.bias) same(*ra.fc1.bias, *rb.fc1.bias, "fc1 bias");
  ASSERT_EQ(ra.fc2.zero_points.has_value(), rb.fc2.zero_points.has_value());
  if (ra.fc2.zero_points) same(*ra.fc2.zero_points, *rb.fc2.zero_points, "fc2 zero points");
  ASSERT_EQ(ra.fc3.has_value(), rb.fc3.has_value());
  if (ra.fc3) same(ra.fc3->weights, rb.fc3->weights, "fc3 weights");
}

}  // namespace

TEST(OnnxExport, RoundTripsThroughTheLoader) {
  TempDir dir;
  Builder b;
  const std::string p = "model.layers.0.mlp.";
  b.add(p + "router.weight", DType::bf16, {E, H});
  b.add(p + "experts.gate_up_proj", DType::bf16, {E, H, 2 * I});
  b.add(p + "experts.gate_up_proj_bias", DType::bf16, {E, 2 * I});
  b.add(p + "experts.down_proj", DType::bf16, {E, I, H});
  b.add(p + "experts.down_proj_bias", DType::bf16, {E, H});
  b.write(dir / "model.safetensors");
  const CheckpointLayer L = open_checkpoint_layer(dir.str(), 0);
  for (SwigluFusion fusion : {SwigluFusion::interleaved, SwigluFusion::separate})
    for (bool external : {false, true}) {
      SCOPED_TRACE("fusion " + std::to_string(int(fusion)) + " external " + std::to_string(external));
      CheckpointQuantizeOptions opt;
      opt.fusion = fusion;
      opt.quant.bits = 4;
      opt.quant.block_size = 16;
      opt.quant.symmetric = fusion == SwigluFusion::interleaved;
      opt.act_dtype = DType::f16;
      opt.quant.scale_dtype = DType::f16;
      const RawLayer r = quantize_checkpoint_layer(L, opt);
      OnnxExportOptions eo;
      eo.metadata = r.metadata;
      if (external) eo.external_data_threshold = 0;
      eo.router_weights_name = external ? "router_weights" : "";
      const std::string path = dir / "layer.onnx";
      export_onnx(path, r.spec, r.raw, eo);
      EXPECT_EQ(fs::exists(dir / "layer.onnx.data"), external);
      const OnnxLayer back = load_onnx(path);
      expect_same_layer(r.spec, r.raw, back.spec, back.raw);
      EXPECT_EQ(back.input_name, "input");
      EXPECT_EQ(back.router_probs_name, "router_probs");
      EXPECT_EQ(back.router_weights_name, external ? "router_weights" : "");
      EXPECT_EQ(back.output_name, "output");
      fs::remove(dir / "layer.onnx.data");
    }
}

TEST(OnnxExport, RefusesInvalidInputAndLeavesNothing) {
  TempDir dir;
  MoeSpec s;
  s.num_experts = 2;
  s.hidden = 16;
  s.inter = 16;
  RawExperts raw;  // empty: validate_raw must refuse it
  expect_error([&] { export_onnx(dir / "x.onnx", s, raw); }, "fc1_experts_weights: missing");
  EXPECT_FALSE(fs::exists(dir / "x.onnx"));
  EXPECT_TRUE(fs::is_empty(dir.str()));
}

namespace {

// A safetensors file from raw byte blobs with any dtype string (the writer only knows qmoe's dtypes).
void write_raw_st(const std::string& path, const std::vector<std::tuple<std::string, std::string, Shape, std::string>>& ts) {
  std::string hdr = "{", data;
  for (const auto& [name, dt, shape, bytes] : ts) {
    std::string dims;
    for (int64_t d : shape) dims += (dims.empty() ? "" : ",") + std::to_string(d);
    hdr += (hdr.size() > 1 ? "," : "") + ("\"" + name + "\":{\"dtype\":\"" + dt + "\",\"shape\":[" + dims +
                                          "],\"data_offsets\":[" + std::to_string(data.size()) + "," +
                                          std::to_string(data.size() + bytes.size()) + "]}");
    data += bytes;
  }
  hdr += "}";
  hdr.append((8 - hdr.size() % 8) % 8, ' ');
  std::string len(8, '\0');
  for (int i = 0; i < 8; ++i) len[size_t(i)] = char(uint8_t(uint64_t(hdr.size()) >> (8 * i)));
  write_text(path, len + hdr + data);
}

// E4M3 decoded by building the fp32 bit pattern (independent of the library's ldexp form).
float e4m3_ref(uint8_t b) {
  const uint32_t s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  if (e == 0) return (s ? -1.f : 1.f) * float(m) / 512.f;
  return bits_to_float((s << 31) | ((e - 7 + 127) << 23) | (m << 20));
}

}  // namespace

TEST(Checkpoint, DeepSeekFp8BlockScaledExperts) {
  EXPECT_EQ(e4m3_ref(0x38), 1.0f);
  EXPECT_EQ(e4m3_ref(0x7E), 448.0f);
  TempDir dir;
  // Block 24 x 40 does not divide I=32 or H=64: partial blocks on both axes.
  const int64_t bo = 24, bi = 40;
  std::mt19937 rng(5);
  std::vector<std::tuple<std::string, std::string, Shape, std::string>> ts;
  std::map<std::string, std::pair<std::string, std::vector<float>>> src;  // name -> (fp8 bytes, scales)
  for (int64_t e = 0; e < E; ++e)
    for (auto [proj, out, in] : {std::tuple{"gate_proj", I, H}, std::tuple{"up_proj", I, H}, std::tuple{"down_proj", H, I}}) {
      const std::string name = "model.layers.2.mlp.experts." + std::to_string(e) + "." + proj + ".weight";
      std::string q(size_t(out * in), '\0');
      for (char& ch : q) {
        uint8_t b;
        do b = uint8_t(rng());
        while ((b & 0x7f) == 0x7f);  // skip NaN encodings
        ch = char(b);
      }
      const Shape ss{(out + bo - 1) / bo, (in + bi - 1) / bi};
      std::vector<float> sc(size_t(ss[0] * ss[1]));
      for (float& v : sc) v = 0.001f * float(1 + rng() % 100);
      ts.emplace_back(name, "F8_E4M3", Shape{out, in}, q);
      ts.emplace_back(name + "_scale_inv", "F32", ss, std::string(reinterpret_cast<const char*>(sc.data()), sc.size() * 4));
      src[name] = {q, sc};
    }
  write_raw_st(dir / "model.safetensors", ts);
  write_text(dir / "config.json",
             R"({"model_type":"deepseek_v3","num_experts_per_tok":2,"quantization_config":{"quant_method":"fp8","weight_block_size":[24,40]}})");
  const CheckpointLayer L = open_checkpoint_layer(dir.str(), 2);
  EXPECT_EQ(L.source_dtype, "F8_E4M3");
  EXPECT_EQ(L.fp8_block_out, bo);
  EXPECT_EQ(L.fp8_block_in, bi);
  const ExpertWeights w = L.expert(3);
  auto check = [&](const Tensor& got, const std::string& proj, int64_t out, int64_t in) {
    const auto& [q, sc] = src.at("model.layers.2.mlp.experts.3." + proj + ".weight");
    const int64_t scols = (in + bi - 1) / bi;
    for (int64_t i = 0; i < out; ++i)
      for (int64_t j = 0; j < in; ++j)
        ASSERT_EQ(got.data_as<float>()[i * in + j], e4m3_ref(uint8_t(q[size_t(i * in + j)])) * sc[size_t((i / bo) * scols + j / bi)])
            << proj << " " << i << "," << j;
  };
  check(w.gate, "gate_proj", I, H);
  check(w.up, "up_proj", I, H);
  check(w.down, "down_proj", H, I);
  // Scales of the wrong shape for the configured block are refused.
  write_text(dir / "config.json", R"({"model_type":"deepseek_v3","num_experts_per_tok":2})");  // block 128 -> [1, 1]
  expect_error([&] { open_checkpoint_layer(dir.str(), 2); }, "gate_proj.weight_scale_inv': expected shape [1, 1], got [2, 2]");
}

TEST(Checkpoint, MisalignedSourceTensorsReadInPlace) {
  // A 3-byte tensor first puts every bf16 tensor at an odd offset; values must still come out right
  // (read through the bytes, no whole-tensor copy).
  TempDir dir;
  Builder b;
  const std::string p = "model.layers.0.mlp.experts.";
  b.add(p + "gate_up_proj", DType::bf16, {E, H, 2 * I});
  b.add(p + "gate_up_proj_bias", DType::bf16, {E, 2 * I});
  b.add(p + "down_proj", DType::bf16, {E, I, H});
  std::vector<std::tuple<std::string, std::string, Shape, std::string>> ts;
  ts.emplace_back("odd", "U8", Shape{3}, std::string(3, '\x01'));
  for (const auto& [n, t] : b.tensors)
    ts.emplace_back(n, "BF16", t.shape(), std::string(static_cast<const char*>(t.data()), t.nbytes()));
  write_raw_st(dir / "model.safetensors", ts);
  const CheckpointLayer L = open_checkpoint_layer(dir.str(), 0);
  const ExpertWeights w = L.expert(1);
  EXPECT_EQ(w.gate.data_as<float>()[3 * H + 5], at(b, p + "gate_up_proj", (1 * H + 5) * 2 * I + 6));
  EXPECT_EQ(w.up.data_as<float>()[3 * H + 5], at(b, p + "gate_up_proj", (1 * H + 5) * 2 * I + 7));
  EXPECT_EQ(w.down.data_as<float>()[5 * I + 3], at(b, p + "down_proj", (1 * I + 3) * H + 5));
  EXPECT_EQ(w.up_bias->data_as<float>()[3], at(b, p + "gate_up_proj_bias", 2 * I + 7));
}
