// Seeded random MoE layers: float weights, their quantized raw form, and inputs.
//
// What `qmoe demo`, benchmarks and tests use when no real model is at hand. The float weights are
// kept next to the quantized ones so the unquantized fp32 layer can be computed (float_forward):
// that is the yardstick for the quantization error, as opposed to the reference backend, which is
// the yardstick for kernel correctness on the quantized weights.
//
// Random numbers come from a counter-based generator (SplitMix64 + Box-Muller written here) rather
// than <random>'s distributions, whose output differs between standard libraries: a seed names the
// same layer on every machine.
#pragma once

#include <cstdint>
#include <optional>

#include "qmoe/inputs.h"
#include "qmoe/raw_experts.h"
#include "qmoe/spec.h"
#include "qmoe/tensor.h"

namespace qmoe {

// Unquantized weights of a layer, fp32, PyTorch Linear layout.
struct FloatExperts {
  Tensor fc1;                 // [E, fc1_rows, H]
  Tensor fc2;                 // [E, H, I]
  std::optional<Tensor> fc3;  // [E, I, H] when spec.has_fc3()
  // Biases as fp32 [E, N]; present where the spec asks for them. Values are already rounded to T,
  // so the float and quantized layers add exactly the same bias.
  std::optional<Tensor> fc1_bias, fc2_bias, fc3_bias;

  size_t weight_bytes() const;  // fp32 bytes of fc1/fc2/fc3 (no biases)
};

struct SyntheticOptions {
  uint64_t seed = 0;
  int64_t tokens = 16;          // rows of the generated input
  int64_t batch = 0;            // > 0: input is 3-D [batch, tokens / batch, H]
  bool router_weights = false;  // also generate router_weights (positive, input 14)
};

// Random fp32 weights for a (valid) spec: N(0, 1/K) entries (Kaiming-like for a K-wide input, so
// activations keep unit scale through FC1 and FC2), biases N(0, 0.1^2) where the spec has them.
FloatExperts make_float_experts(const MoeSpec& spec, uint64_t seed);

// Quantizes float weights with the spec's bits, block size and scale dtype (qmoe::quantize_experts;
// asymmetric with zero points for each matrix whose spec flag is set) and attaches the biases
// converted to T. The result passes validate_raw(spec, ...).
RawExperts quantize_float_experts(const MoeSpec& spec, const FloatExperts& w);

// The unquantized layer in fp32: routing from route_all, activation from apply_activation (the
// reference's own definitions), dense fp32 GEMVs. Returns fp32 with the input's shape whatever T is.
Tensor float_forward(const MoeSpec& spec, const FloatExperts& w, const MoeInputs& inputs);

// A whole layer: weights, quantized weights and inputs in T.
struct SyntheticLayer {
  MoeSpec spec;
  FloatExperts weights;
  RawExperts raw;
  Tensor input;                         // [tokens, H] or [batch, tokens/batch, H], dtype T
  Tensor router_probs;                  // [tokens, E] logits, N(0, 1), dtype T
  std::optional<Tensor> router_weights; // [tokens, E], uniform (0.05, 1), dtype T

  MoeInputs inputs() const;  // views of the tensors above
};

// Validates the spec, then builds everything from one seed (weights and inputs use separate
// streams, so changing `tokens` does not change the weights).
SyntheticLayer make_synthetic_layer(const MoeSpec& spec, const SyntheticOptions& opt = {});

// Relative L2 error ||a - b|| / ||b|| of two float tensors of equal element count (any float
// dtypes), computed in double. Throws qmoe::Error on a size mismatch; returns |a| when b is all zero.
double relative_error(const TensorView& a, const TensorView& b);

}  // namespace qmoe
