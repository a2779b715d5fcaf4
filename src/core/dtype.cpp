#include "qmoe/dtype.h"

#include "qmoe/error.h"

namespace qmoe {

DType parse_dtype(std::string_view name) {
  if (name == "float32" || name == "fp32" || name == "f32") return DType::f32;
  if (name == "float16" || name == "fp16" || name == "f16") return DType::f16;
  if (name == "bfloat16" || name == "bf16") return DType::bf16;
  if (name == "uint8" || name == "u8") return DType::u8;
  throw Error("dtype: expected one of float32, float16, bfloat16, uint8, got '" + std::string(name) + "'");
}

}  // namespace qmoe
