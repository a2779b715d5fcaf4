// Loading a QMoE layer from an ONNX model file: one com.microsoft::QMoE node whose weights are
// initializers, stored inline or in ONNX external-data files.
#pragma once

#include <string>

#include "qmoe/raw_experts.h"
#include "qmoe/spec.h"

namespace qmoe {

// How fc1/fc2 bytes are laid out in the file (contract §7). `detect` decides from the attribute
// weights_prepacked and the declared shapes, and refuses an ambiguous file rather than guess.
enum class WeightsLayout { detect, raw, ort_cuda };

struct OnnxLoadOptions {
  WeightsLayout layout = WeightsLayout::detect;
};

struct OnnxLayer {
  MoeSpec spec;
  RawExperts raw;  // always in the raw layout (ORT CUDA layout converted on load)
  std::string node_name;
  std::string input_name, router_probs_name, router_weights_name, output_name;
};

// Throws qmoe::Error naming the file and the problem (not ONNX, other operators, missing or
// mis-shaped initializers, unsupported attributes, ...).
OnnxLayer load_onnx(const std::string& path, const OnnxLoadOptions& opt = {});

}  // namespace qmoe
