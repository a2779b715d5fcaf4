// The scalar reference QMoE (contract §4), written straight from the contract: the oracle every
// other backend is tested against. fp32 arithmetic throughout; the output is rounded to T once.
#pragma once

#include "qmoe/inputs.h"
#include "qmoe/raw_experts.h"
#include "qmoe/spec.h"
#include "qmoe/tensor.h"

namespace qmoe {

// The contract's scalar activations (§4.3): every backend's CPU-side epilogue calls these, so equal
// FC1 outputs give bitwise equal activations (the CPU backend's bf16 and int8 accuracy options run
// SwiGLU with a vector e^x instead, docs/DESIGN.md). `activation_scalar` takes any non-SwiGLU activation;
// `swiglu_scalar` takes gate g and linear half u (biases added) with the spec's limit/alpha/beta.
float activation_scalar(Activation a, float v);
float swiglu_scalar(const MoeSpec& spec, float g, float u);

// Applies the spec's activation to an FC1 output row `h` (fc1_rows() values, bias added), writing
// I values to `a`. For SwiGLU with fc3, `h` holds the gate and `h3` the linear half (else null).
void apply_activation(const MoeSpec& spec, const float* h, const float* h3, float* a);

// Dequantizes expert e of a raw matrix into a dense fp32 [N, K] row-major buffer.
void dequantize_expert(const MoeSpec& spec, Fc fc, const RawMatrix& m, int64_t e, float* out);

// Validates spec, raw and inputs, then computes the layer. Returns a tensor shaped like the input.
Tensor reference_forward(const MoeSpec& spec, const RawExperts& raw, const MoeInputs& inputs);

}  // namespace qmoe
