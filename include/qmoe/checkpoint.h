// Hugging Face MoE checkpoints in, raw QMoE safetensors out (and back).
//
// open_checkpoint_layer() finds the routed experts of one decoder layer in the tensor naming of a real
// model family (docs/CHECKPOINTS.md lists them), reads the routing facts from config.json when the
// folder has one, and gives per-expert float access without converting the whole layer (a
// DeepSeek-V3 layer is ~45 GB in fp32). quantize_checkpoint_layer() turns it into a MoeSpec plus
// RawExperts expert by expert, and write_raw_safetensors()/read_raw_safetensors() store that pair
// with every spec fact in `__metadata__`, so `qmoe export-onnx` needs nothing but the file.
//
// All families here use SwiGLU experts (act = silu(gate) * up, gpt-oss with clamp/alpha/beta). In the
// exported layer, fc1 holds both halves interleaved (swiglu_fusion = 1: gate at even rows), the only
// mode ONNX Runtime's CPU kernel runs; fc3 (fusion 0) and concatenation (2) are available on request.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "qmoe/quantize.h"
#include "qmoe/raw_experts.h"
#include "qmoe/safetensors.h"
#include "qmoe/spec.h"

namespace qmoe {

// How the experts are named and stored; the family refines it (from config.json or tell-tale names).
enum class ExpertNaming : uint8_t {
  block_sparse_moe,  // {P}block_sparse_moe.experts.{e}.w1|w2|w3.weight (Mixtral, Phi-3.5-MoE)
  mlp_experts,       // {P}mlp.experts.{e}.gate_proj|up_proj|down_proj.weight (Qwen-MoE, OLMoE, DeepSeek)
  gpt_oss_fused,     // {P}mlp.experts.gate_up_proj [E, H, 2I] (+ bias), down_proj [E, I, H] (+ bias)
  gpt_oss_mxfp4,     // the same as MXFP4 blocks/scales: gate_up_proj_blocks [E, 2I, H/32, 16] U8, ...
};

// Float weights of one expert, fp32, PyTorch Linear.weight layout [out, in].
struct ExpertWeights {
  Tensor gate;  // [I, H]
  Tensor up;    // [I, H]
  Tensor down;  // [H, I]
  std::optional<Tensor> gate_bias, up_bias, down_bias;  // [I], [I], [H] (gpt-oss only)
};

struct CheckpointLayer {
  SafetensorsCheckpoint checkpoint;
  std::string source;  // the path given to open_checkpoint_layer
  int64_t layer = 0;
  ExpertNaming naming = ExpertNaming::mlp_experts;
  // "mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss",
  // or "mlp_experts" when the names fit but neither config.json nor the names tell which model it is.
  std::string family;
  std::string prefix;  // e.g. "model.layers.3."
  int64_t num_experts = 0, hidden = 0, inter = 0;
  std::string source_dtype;  // safetensors dtype of the expert weights, e.g. "BF16"
  // Block-scaled FP8 experts (DeepSeek-V3/R1, Qwen3 "-FP8"): F8_E4M3 weights with a "<name>_scale_inv"
  // tensor [ceil(out/bo), ceil(in/bi)] multiplying each bo x bi block; 0 when not FP8.
  int64_t fp8_block_out = 0, fp8_block_in = 0;
  bool has_bias = false;     // expert biases present (gpt-oss)

  // Routing, from config.json or the family's fixed facts; unset = unknown (the caller must say).
  std::optional<int64_t> k;
  std::optional<bool> normalize_routing_weights;
  bool use_sparse_mixer = false;  // Phi-3.5-MoE
  // SwiGLU parameters (gpt-oss: limit 7, alpha 1.702, beta 1; others: +inf, 1, 0).
  float swiglu_limit = std::numeric_limits<float>::infinity();
  float activation_alpha = 1.0f, activation_beta = 0.0f;

  std::string router_weight_name, router_bias_name;  // empty when absent
  // Where the model's routing differs from what QMoE computes from router logits (DeepSeek-V3's
  // sigmoid scores, routed scaling factors, router bias, ...); shown by the CLI and stored as metadata.
  std::vector<std::string> notes;

  // Tensor names read for the experts, with "{e}" for the expert index, e.g.
  // "model.layers.3.block_sparse_moe.experts.{e}.w1.weight".
  std::vector<std::string> source_names;

  // Reads and converts one expert to fp32. Throws on e out of range.
  ExpertWeights expert(int64_t e) const;
  // Router weight [E, H] (and bias [E]) as stored; empty Tensor when absent.
  Tensor router_weight() const;
  Tensor router_bias() const;
  // One line, e.g. "mixtral layer 3: E=8 H=4096 I=14336 BF16 k=2 normalize".
  std::string summary() const;
};

// Opens `path` (a checkpoint folder, a .safetensors file or a model.safetensors.index.json) and finds
// the experts of decoder layer `layer`. Throws qmoe::Error listing what was found when no family
// matches, when the layer has no experts (naming the layers that have), or on inconsistent shapes.
CheckpointLayer open_checkpoint_layer(const std::string& path, int64_t layer);

// Indices of the decoder layers that have MoE experts in any recognised naming, ascending (headers
// only; e.g. for `qmoe inspect` or to quantize every MoE layer). Empty when there are none.
std::vector<int64_t> checkpoint_moe_layers(const std::string& path);

struct CheckpointQuantizeOptions {
  QuantizeOptions quant;                     // bits, block_size, symmetric, scale dtype (T2)
  DType act_dtype = DType::f32;              // T of the exported layer (biases are stored in it)
  SwigluFusion fusion = SwigluFusion::interleaved;
  std::optional<int64_t> k;                  // override / supply the routing facts
  std::optional<bool> normalize_routing_weights;
  // Called after each expert with (experts done, E); for the CLI's progress bar.
  std::function<void(int64_t, int64_t)> progress;
};

// A quantized layer with the facts to rebuild it: what write_raw_safetensors stores.
struct RawLayer {
  MoeSpec spec;
  RawExperts raw;
  std::map<std::string, std::string> metadata;  // source facts (family, names, notes), strings
  std::optional<Tensor> router_weight;          // [E, H] as in the checkpoint (not used by QMoE)
  std::optional<Tensor> router_bias;            // [E]
};

// The MoeSpec a checkpoint layer quantizes to under `opt` (throws when k or the routing
// normalisation are unknown and not given).
MoeSpec checkpoint_spec(const CheckpointLayer& layer, const CheckpointQuantizeOptions& opt);

// Quantizes every expert with qmoe's ORT-exact quantizer (quantize_matrix per expert, so peak memory
// is the raw result plus one expert in fp32).
RawLayer quantize_checkpoint_layer(const CheckpointLayer& layer, const CheckpointQuantizeOptions& opt);

// Writes raw QMoE tensors (fc1_experts_weights, fc1_scales, fc1_zero_points, fc1_experts_bias, fc2_...,
// fc3_..., router_weight, router_bias) and `__metadata__`: format "qmoe.raw" version 1, every spec
// field (keys named like the ONNX attributes: k, activation_type, expert_weight_bits, block_size,
// swiglu_fusion, swiglu_limit, activation_alpha, activation_beta, normalize_routing_weights,
// use_sparse_mixer, num_experts, hidden_size, inter_size, symmetric, act_dtype) plus layer.metadata.
// Atomic. Validates the raw tensors against the spec first.
void write_raw_safetensors(const std::string& path, const RawLayer& layer);

// Reads a file written by write_raw_safetensors (tensors stay memory-mapped) and validates every
// tensor against the spec rebuilt from the metadata. Throws naming the key or tensor at fault.
RawLayer read_raw_safetensors(const std::string& path);

}  // namespace qmoe
