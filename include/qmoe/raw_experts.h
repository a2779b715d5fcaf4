// The portable raw weight format (contract §5): what exporters write and what qmoe accepts.
//
// Per matrix (fc1, fc2, fc3) and expert e, with N output rows and K input columns:
//   weights      uint8 [E, N, K/pack]   code of column c at bit (c % pack) * bits of byte c / pack
//   scales       T2    [E, N] row-wise, or [E, N, ceil(K/bs)] block-wise
//   zero_points  uint8 [E, ceil(N/pack)] row-wise, or [E, N, ceil(nb/pack)] block-wise (optional)
//   bias         T     [E, N] (optional)
// Dequantized value: W[n][c] = scale(n, c) * (code(n, c) - zero(n, c)), zero defaulting to 2^(bits-1).
// A RawExperts is plain data; validate_raw() checks it against a spec before anything reads it.
#pragma once

#include <optional>

#include "qmoe/spec.h"
#include "qmoe/tensor.h"

namespace qmoe {

struct RawMatrix {
  Tensor weights;
  Tensor scales;
  std::optional<Tensor> zero_points;
  std::optional<Tensor> bias;

  size_t nbytes() const;  // all tensors together
};

struct RawExperts {
  RawMatrix fc1;                // [E, fc1_rows, H/pack]
  RawMatrix fc2;                // [E, H, I/pack]
  std::optional<RawMatrix> fc3; // [E, I, H/pack]; SwiGLU's linear half when swiglu_fusion = 0

  size_t nbytes() const;
};

// Which matrix of a layer, for error messages and shape rules.
enum class Fc : uint8_t { fc1 = 1, fc2 = 2, fc3 = 3 };
// Output rows N and input columns K of a matrix under a spec.
int64_t fc_rows(const MoeSpec& spec, Fc fc);
int64_t fc_cols(const MoeSpec& spec, Fc fc);

// Expected shapes of each raw tensor (the contract's table, §2 and §5).
Shape raw_weight_shape(const MoeSpec& spec, Fc fc);
Shape raw_scale_shape(const MoeSpec& spec, Fc fc);
Shape raw_zero_point_shape(const MoeSpec& spec, Fc fc);
Shape raw_bias_shape(const MoeSpec& spec, Fc fc);

// Checks presence, dtypes and shapes of every tensor against the spec (which must be valid).
// Row-wise scales may come as [E, N, 1]. Throws qmoe::Error naming the tensor, e.g.
// "fc2_scales: expected shape [8, 64, 4], got [8, 64, 2]".
void validate_raw(const MoeSpec& spec, const RawExperts& raw);

// Reads the unsigned code of element (n, c) of expert e's matrix (no bounds checks: validate first).
inline int raw_code(const uint8_t* expert_weights, int64_t K, int bits, int64_t n, int64_t c) {
  const int pack = 8 / bits;
  const uint8_t byte = expert_weights[n * (K / pack) + c / pack];
  return (byte >> ((c % pack) * bits)) & ((1 << bits) - 1);
}

}  // namespace qmoe
