// MoeSpec: the problem a QMoE layer solves (contract §2-3), independent of where the weights live.
//
// A spec is built from C++ code, an ONNX node's attributes or CLI flags, checked once by validate(),
// and then trusted by every backend. Shapes of the weight tensors follow from it (fc1_rows() etc.), so
// raw and packed weights are validated against the spec, never against each other.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "qmoe/dtype.h"

namespace qmoe {

enum class Activation : uint8_t { relu, gelu, silu, swiglu, identity };

// How SwiGLU's gate and linear halves are stored (attribute swiglu_fusion).
enum class SwigluFusion : uint8_t {
  separate = 0,      // gate in fc1 [I rows], linear half in fc3 [I rows]
  interleaved = 1,   // fc1 has 2I rows: gate at even rows, linear at odd rows
  concatenated = 2,  // fc1 has 2I rows: gate rows [0, I), linear rows [I, 2I)
};

std::string_view activation_name(Activation a);
// Accepts exactly the contract's names; throws qmoe::Error naming the attribute otherwise.
Activation parse_activation(std::string_view name);

struct MoeSpec {
  int64_t num_experts = 0;  // E
  int64_t hidden = 0;       // H
  int64_t inter = 0;        // I
  int64_t k = 1;            // experts per token
  int bits = 4;             // 2, 4 or 8
  int64_t block_size = 0;   // 0 = one scale per row; else >= 16, power of two
  Activation activation = Activation::relu;
  SwigluFusion swiglu_fusion = SwigluFusion::separate;
  float swiglu_limit = std::numeric_limits<float>::infinity();
  float activation_alpha = 1.0f;
  float activation_beta = 0.0f;
  bool normalize_routing_weights = false;
  bool use_sparse_mixer = false;
  DType act_dtype = DType::f32;    // T: input, router_probs, biases, router_weights, output
  DType scale_dtype = DType::f32;  // T2: scales

  // Which optional tensors the layer has. Zero points and biases are per matrix.
  bool fc1_bias = false, fc2_bias = false, fc3_bias = false;
  bool fc1_zero_points = false, fc2_zero_points = false, fc3_zero_points = false;

  bool is_swiglu() const { return activation == Activation::swiglu; }
  // fc3 holds SwiGLU's linear half only in the separate layout.
  bool has_fc3() const { return is_swiglu() && swiglu_fusion == SwigluFusion::separate; }
  // Rows of fc1: 2I when both SwiGLU halves are fused into it, else I.
  int64_t fc1_rows() const { return is_swiglu() && !has_fc3() ? 2 * inter : inter; }
  bool block_wise() const { return block_size > 0; }
  int pack() const { return 8 / bits; }  // codes per byte
  // Scale blocks along a K-long row: ceil(K / block_size), or 1 row-wise.
  int64_t blocks(int64_t K) const { return block_wise() ? (K + block_size - 1) / block_size : 1; }
  int default_zero_point() const { return 1 << (bits - 1); }

  // Throws qmoe::Error naming the first invalid field with expected and actual values.
  void validate() const;
  // One line, e.g. "E=8 k=2 H=4096 I=14336 int4 block=128 swiglu(fusion=1) T=float16 T2=float16".
  std::string to_string() const;
};

}  // namespace qmoe
