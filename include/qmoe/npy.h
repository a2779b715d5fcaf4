// NumPy .npy files (format versions 1.0-3.0, little-endian, C order) for inputs and outputs.
//
// float32, float16 and uint8 map to qmoe dtypes directly. NumPy has no bfloat16: a bf16 tensor is
// stored as uint16 ('<u2') and read back as bf16 only when the caller says so.
#pragma once

#include <string>

#include "qmoe/tensor.h"

namespace qmoe {

struct NpyReadOptions {
  bool uint16_as_bf16 = false;  // interpret '<u2' arrays as bfloat16 bit patterns
};

// Reads a whole .npy file. Throws qmoe::Error naming the file and what is wrong (magic, header,
// dtype, Fortran order, truncated data, sizes larger than the file).
Tensor read_npy(const std::string& path, const NpyReadOptions& opt = {});
Tensor parse_npy(const void* data, size_t size, const NpyReadOptions& opt = {}, const std::string& name = "<buffer>");

// Writes a .npy file atomically (temporary file, then rename): no partial file on failure.
// bf16 is written as '<u2'.
void write_npy(const std::string& path, const TensorView& t);

}  // namespace qmoe
