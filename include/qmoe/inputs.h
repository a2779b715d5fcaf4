// Run-time inputs of a QMoE layer (contract §2 inputs 0, 1, 14) and their validation.
#pragma once

#include <optional>

#include "qmoe/spec.h"
#include "qmoe/tensor.h"

namespace qmoe {

struct MoeInputs {
  TensorView input;                          // [rows, H] or [B, S, H], dtype T
  TensorView router_probs;                   // [rows, E] logits, dtype T
  std::optional<TensorView> router_weights;  // [rows, E] mixing weights, dtype T
};

// Number of token rows (B*S for 3-D input). Call after validate_inputs.
int64_t input_rows(const MoeInputs& in);

// Checks ranks, shapes and dtypes against the spec; throws qmoe::Error naming the input.
void validate_inputs(const MoeSpec& spec, const MoeInputs& in);

}  // namespace qmoe
