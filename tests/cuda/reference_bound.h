// The GPU tests' bound against the scalar reference (reference_forward), derived in the header of
// cuda_backend_test.cpp. qmoe_cuda_tests and qmoe_ep_tests both hold the CUDA backend to it, so it is
// written once: a change to when the kernels round their weights (fc_uses_dq) is a change here.
#pragma once

#include <algorithm>

#include "qmoe/dtype.h"
#include "qmoe/spec.h"

namespace qmoe::test {

// Unit roundoff of a storage type: fp16 2^-11, bf16 2^-8, fp32 2^-24.
inline double unit_roundoff(DType t) { return t == DType::f16 ? 0x1p-11 : t == DType::bf16 ? 0x1p-8 : 0x1p-24; }

// Unit roundoff of the compute type the kernels use for activations `act`: fp16 2^-11, bf16 2^-8, and
// for fp32 activations, which pass through bf16, twice bf16's (2^-7).
inline double compute_roundoff(DType act) { return act == DType::f16 ? 0x1p-11 : act == DType::bf16 ? 0x1p-8 : 0x1p-7; }

// Whether the kernels feed the tensor cores s * (q - z) rounded to bf16 (DQ, fc_uses_dq): bf16 layers
// with bf16 block-wise scales where a matrix has 2+ blocks per row.
inline bool weights_rounded_to_bf16(const MoeSpec& s) {
  return s.act_dtype == DType::bf16 && s.scale_dtype == DType::bf16 && s.block_size > 0 &&
         s.block_size < std::max(s.hidden, s.inter);
}

// |out - ref| <= per_rms rms(ref) + per_ref |ref| per element, and relative L2 <= rel_l2.
struct ReferenceBound {
  double per_rms, per_ref, rel_l2;
};
inline ReferenceBound reference_bound(const MoeSpec& s) {
  const double uc = compute_roundoff(s.act_dtype), ut = unit_roundoff(s.act_dtype);
  const bool w = weights_rounded_to_bf16(s);
  return {(w ? 10 : 6) * uc, 2 * ut, (w ? 2 : 1.2) * uc + ut};
}

}  // namespace qmoe::test
