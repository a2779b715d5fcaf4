#include "qmoe/tensor.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "qmoe/error.h"

namespace qmoe {

namespace {

// Buffers of at least this size come from alloc_huge (a layer's raw weights: hundreds of MB), except
// under AddressSanitizer, which watches the bounds of heap blocks but not of mmap'd ones.
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kHugeAllocMin = SIZE_MAX;
#else
constexpr size_t kHugeAllocMin = size_t(32) << 20;
#endif

// A zero-filled buffer of `bytes` straight from mmap, 2 MiB aligned and advised for transparent huge
// pages; null when that is unavailable. The kernel hands out zeroed pages (no memset pass), and
// faulting in and releasing hundreds of MB goes in 2 MiB pages instead of 4 KiB ones: freeing a
// 768 MB buffer of 4 KiB pages took 42 ms on the H100 host, most of a mixtral layer's prepack
// spread (docs/PERF-cuda.md, "Prepack spread").
std::shared_ptr<void> alloc_huge(size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t huge = size_t(2) << 20;
  const size_t len = (bytes + huge - 1) / huge * huge;
  void* base = ::mmap(nullptr, len + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return nullptr;
  // Trim the mapping to a 2 MiB aligned span of len bytes.
  const uintptr_t b = reinterpret_cast<uintptr_t>(base), a = (b + huge - 1) & ~(huge - 1);
  if (a > b) ::munmap(base, a - b);
  ::munmap(reinterpret_cast<void*>(a + len), b + huge - a);
  void* p = reinterpret_cast<void*>(a);
  ::madvise(p, len, MADV_HUGEPAGE);  // advice only: without it the pages are 4 KiB, still correct
  return std::shared_ptr<void>(p, [len](void* q) { ::munmap(q, len); });
#else
  (void)bytes;
  return nullptr;
#endif
}

}  // namespace

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
  if (bytes >= kHugeAllocMin && (data_ = alloc_huge(bytes))) return;
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
