// The quantizer and dequantizer of the raw format (contract §5-6).
//
// quantize_* follows ONNX Runtime's quantize_matmul_{2,4,8}bits rules bit for bit (symmetric: scale =
// -v*/2^(bits-1) from the signed extreme, stored in T2 before the reciprocal is taken; asymmetric:
// min/max including 0, zero point rounded half away from zero), so qmoe and ORT produce identical bytes.
#pragma once

#include <optional>

#include "qmoe/raw_experts.h"
#include "qmoe/tensor.h"

namespace qmoe {

struct QuantizeOptions {
  int bits = 4;                    // 2, 4 or 8
  int64_t block_size = 0;          // 0 = one scale per row; else a power of two >= 16
  bool symmetric = true;           // false: per-block zero points are written
  DType scale_dtype = DType::f32;  // T2
};

// Quantizes float weights [N, K] (fp32/fp16/bf16; PyTorch Linear.weight layout) to raw bytes
// [N, K/pack], scales [N] or [N, nb] and, when asymmetric, zero points [ceil(N/pack)] (row-wise) or
// [N, ceil(nb/pack)] (block-wise); unused zero-point slots hold 2^(bits-1), as ORT writes them.
// K must be a multiple of pack; block_size need not divide K. Throws qmoe::Error on bad options or
// shapes, on non-finite weights and on a scale that overflows scale_dtype. Large inputs are split
// over threads; the bytes do not depend on the thread count.
struct QuantizedMatrix {
  Tensor weights;
  Tensor scales;
  std::optional<Tensor> zero_points;
};
QuantizedMatrix quantize_matrix(const TensorView& w, const QuantizeOptions& opt);

// Quantizes every expert of float weights [E, N, K]; the result has the raw [E, ...] shapes (no bias).
RawMatrix quantize_experts(const TensorView& w, const QuantizeOptions& opt);

// Dequantizes raw weights of all experts to fp32 [E, N, K] (K = columns of the matrix):
// W = scale * (code - zero point), the zero point defaulting to 2^(bits-1). block_size 0 = row-wise
// (scales [E, N] or [E, N, 1], zero points [E, ceil(N/pack)]); else scales [E, N, ceil(K/bs)] and zero
// points [E, N, ceil(nb/pack)]. Bias is ignored. Throws qmoe::Error naming the mismatched tensor.
Tensor dequantize_experts(const RawMatrix& m, int bits, int64_t block_size, int64_t K);

// The same for one matrix as returned by quantize_matrix: fp32 [N, K], K = weights.dim(1) * pack.
Tensor dequantize_matrix(const QuantizedMatrix& q, int bits, int64_t block_size);

}  // namespace qmoe
