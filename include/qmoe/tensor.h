// Tensors at qmoe's boundary: a dtype, a shape and bytes.
//
// `Tensor` owns (or shares ownership of) its bytes through a shared_ptr, so the same type can hold a
// buffer qmoe allocated (64-byte aligned, zero-filled), a memory-mapped file region, or a NumPy
// array kept alive by a keepalive handle. `TensorView` is a non-owning view used for run-time inputs.
// Releasing a Tensor (reset()) is how qmoe frees raw weights after prepack.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qmoe/dtype.h"

namespace qmoe {

using Shape = std::vector<int64_t>;

// Number of elements of a shape; throws qmoe::Error on a negative dim or on overflow.
int64_t shape_numel(const Shape& shape);

struct TensorView {
  DType dtype = DType::f32;
  Shape shape;
  const void* data = nullptr;

  int rank() const { return int(shape.size()); }
  int64_t numel() const { return shape_numel(shape); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
};

class Tensor {
 public:
  Tensor() = default;
  // Allocates a zero-filled, 64-byte aligned buffer.
  Tensor(DType dtype, Shape shape);
  // Wraps memory owned elsewhere; `owner` keeps it alive (may be null for static data).
  static Tensor wrap(DType dtype, Shape shape, void* data, std::shared_ptr<void> owner);
  // Copies a view into a new owning tensor.
  static Tensor copy_of(const TensorView& v);

  bool empty() const { return !data_; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return int(shape_.size()); }
  int64_t dim(int i) const { return shape_.at(size_t(i)); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }

  void* data() { return data_.get(); }
  const void* data() const { return data_.get(); }
  template <class T> T* data_as() { return static_cast<T*>(data()); }
  template <class T> const T* data_as() const { return static_cast<const T*>(data()); }

  TensorView view() const { return TensorView{dtype_, shape_, data_.get()}; }
  // Same bytes, new shape with the same element count (e.g. [E, N, 1] -> [E, N]).
  Tensor reshaped(Shape shape) const;
  // Drops this handle's reference to the bytes.
  void reset() { *this = Tensor(); }

 private:
  DType dtype_ = DType::f32;
  Shape shape_;
  std::shared_ptr<void> data_;
};

}  // namespace qmoe
