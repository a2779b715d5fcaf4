#include "qmoe/tensor.h"

#include <cstdlib>
#include <cstring>
#include <limits>

#include "qmoe/error.h"

namespace qmoe {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw Error("shape " + shape_str(shape) + " has a negative dimension");
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d)
      throw Error("shape " + shape_str(shape) + " has too many elements");
    n *= d;
  }
  return n;
}

Tensor::Tensor(DType dtype, Shape shape) : dtype_(dtype), shape_(std::move(shape)) {
  const int64_t n = shape_numel(shape_);
  const size_t elem = dtype_size(dtype_);
  if (n > 0 && size_t(n) > std::numeric_limits<size_t>::max() / elem / 2)
    throw Error("tensor of shape " + shape_str(shape_) + " is too large to allocate");
  // Round up to the alignment so aligned_alloc's size rule holds; keep at least one byte so an
  // empty tensor still has a non-null buffer (empty() means "absent", not "zero elements").
  const size_t bytes = (std::max<size_t>(size_t(n) * elem, 1) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw Error("out of memory allocating " + std::to_string(bytes) + " bytes for tensor " + shape_str(shape_));
  std::memset(p, 0, bytes);
  data_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
}

Tensor Tensor::wrap(DType dtype, Shape shape, void* data, std::shared_ptr<void> owner) {
  shape_numel(shape);  // validates
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.data_ = std::shared_ptr<void>(std::move(owner), data);  // aliasing constructor
  if (!t.data_) throw Error("Tensor::wrap: null data pointer for shape " + shape_str(t.shape_));
  return t;
}

Tensor Tensor::copy_of(const TensorView& v) {
  Tensor t(v.dtype, v.shape);
  if (v.nbytes()) std::memcpy(t.data(), v.data, v.nbytes());
  return t;
}

Tensor Tensor::reshaped(Shape shape) const {
  if (shape_numel(shape) != numel())
    throw Error("cannot reshape " + shape_str(shape_) + " to " + shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

}  // namespace qmoe
