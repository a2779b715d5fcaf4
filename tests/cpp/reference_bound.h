// The per-element bound within which an fp32 CPU path agrees with the reference backend (reasoned in
// cpu_backend_test.cpp's header): both sum every dot product in fp32 in different orders, so
//   |ours - ref| <= 32 * u * (sqrt(H) + sqrt(I)) * rms(ref) + eps_T * |ref|,
// eps_T (2^-10 fp16, 2^-7 bf16, 0 fp32) the one ulp by which both results may round apart to T.
#pragma once

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>

#include "qmoe/dtype.h"
#include "qmoe/spec.h"
#include "qmoe/tensor.h"

namespace qmoe::test {

inline float eps_of(DType t) { return t == DType::f16 ? 0x1p-10f : t == DType::bf16 ? 0x1p-7f : 0.f; }

// "" when every element of `got` is within the bound of `ref`, else the first that is not. worst_ratio (fp32
// outputs only, where no rounding to T hides the error): the largest |ours - ref| / bound seen.
inline std::string beyond_reference_bound(const MoeSpec& s, const Tensor& ref, const Tensor& got,
                                          double* worst_ratio = nullptr) {
  const DType dt = ref.dtype();
  double ss = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) ss += double(load_as_float(dt, ref.data(), i)) * load_as_float(dt, ref.data(), i);
  const double rms = std::sqrt(ss / double(std::max<int64_t>(1, ref.numel())));
  const double u = 0x1p-24;
  const double tol = 32 * u * (std::sqrt(double(s.hidden)) + std::sqrt(double(s.inter))) * rms;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    const double r = load_as_float(dt, ref.data(), i), g = load_as_float(dt, got.data(), i);
    const double lim = tol + eps_of(dt) * std::fabs(r) + 1e-30;
    if (worst_ratio && dt == DType::f32) *worst_ratio = std::max(*worst_ratio, std::fabs(g - r) / lim);
    if (!(std::fabs(g - r) <= lim)) {
      std::ostringstream os;
      os << "element " << i << " (token " << i / s.hidden << ", col " << i % s.hidden << "): got " << g
         << ", reference " << r << ", |diff| " << std::fabs(g - r) << " > tol " << lim << " (rms " << rms << ")";
      return os.str();
    }
  }
  return "";
}

}  // namespace qmoe::test
