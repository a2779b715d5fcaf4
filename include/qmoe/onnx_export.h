// Writing a QMoE layer as a one-node ONNX model (`com.microsoft::QMoE`) that ONNX Runtime runs.
//
// The model holds the raw weights (contract §5) as initializers with weights_prepacked = 0, the
// attributes from the MoeSpec, and graph inputs `input` [num_tokens, H] and `router_probs`
// [num_tokens, E] (+ optional `router_weights`), output `output` [num_tokens, H], all of type T. It is
// the inverse of load_onnx(): load_onnx(export_onnx(spec, raw)) gives back the same spec and bytes.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "qmoe/raw_experts.h"
#include "qmoe/spec.h"

namespace qmoe {

struct OnnxExportOptions {
  std::string node_name = "QMoE";
  std::string input_name = "input";
  std::string router_probs_name = "router_probs";
  std::string output_name = "output";
  // Adds the optional graph input router_weights (operator input 14) when not empty.
  std::string router_weights_name;
  // Protobuf refuses messages of 2 GiB or more, so when the initializers together exceed this many
  // bytes they all go to an external-data file next to the model (ONNX's external data convention).
  uint64_t external_data_threshold = uint64_t(2) << 30;
  // File name (in the model's folder) for external data; default: "<model file name>.data".
  std::string external_data_name;
  // Stored as the model's metadata_props (e.g. the source facts of a raw safetensors file).
  std::map<std::string, std::string> metadata;
};

// Validates spec and raw, then writes the model atomically (external data first, then the model; on
// failure neither is left behind). Throws qmoe::Error naming the problem.
void export_onnx(const std::string& path, const MoeSpec& spec, const RawExperts& raw,
                 const OnnxExportOptions& opt = {});

}  // namespace qmoe
