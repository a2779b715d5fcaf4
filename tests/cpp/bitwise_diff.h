// Bitwise comparison of two tensors for tests: "" when equal, else where they first differ.
#pragma once

#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>

#include "qmoe/dtype.h"
#include "qmoe/tensor.h"

namespace qmoe::test {

// "" when bitwise equal, else the first differing element with both values.
inline std::string bitwise_diff(const Tensor& want, const Tensor& got) {
  if (want.shape() != got.shape() || want.dtype() != got.dtype()) return "shape or dtype differs";
  const size_t es = dtype_size(want.dtype());
  for (int64_t i = 0; i < want.numel(); ++i) {
    if (std::memcmp(static_cast<const uint8_t*>(want.data()) + i * es, static_cast<const uint8_t*>(got.data()) + i * es,
                    es) != 0) {
      std::ostringstream os;
      os.precision(9);
      os << "first difference at element " << i << " (row " << i / want.shape().back() << ", col "
         << i % want.shape().back() << "): " << load_as_float(want.dtype(), want.data(), i) << " vs "
         << load_as_float(got.dtype(), got.data(), i);
      return os.str();
    }
  }
  return "";
}

}  // namespace qmoe::test
