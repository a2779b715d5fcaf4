// ONNX Runtime's CUDA prepacked weight layout (CUTLASS fpA_intB for SM80; contract §7), for import.
//
// Files made for ORT's CUDA execution provider hold fc1/fc2 in this layout, declared as [E, K, N/pack].
// qmoe converts them to the raw layout on load; the forward transform exists for tests and for
// writing such files.
#pragma once

#include "qmoe/tensor.h"

namespace qmoe {

// Raw [E, N, K/pack] uint8 -> ORT CUDA layout, declared shape [E, K, N/pack].
Tensor raw_to_ort_cuda(const Tensor& raw, int64_t N, int64_t K, int bits);
// ORT CUDA layout [E, K, N/pack] -> raw [E, N, K/pack]. Throws qmoe::Error on shapes the layout
// cannot hold (it needs N and K in whole tiles).
Tensor ort_cuda_to_raw(const Tensor& packed, int64_t N, int64_t K, int bits);

}  // namespace qmoe
