// Tensor allocation: every owning tensor starts zero-filled and 64-byte aligned, whichever allocator
// its size picks (large ones come from mmap with huge-page advice, except under AddressSanitizer).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>

#include "qmoe/error.h"
#include "qmoe/tensor.h"

using namespace qmoe;

namespace {

void expect_zeroed_aligned_writable(DType dtype, Shape shape) {
  Tensor t(dtype, shape);
  ASSERT_FALSE(t.empty());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % 64, 0u) << shape_str(shape);
  const auto* b = t.data_as<uint8_t>();
  EXPECT_TRUE(std::all_of(b, b + t.nbytes(), [](uint8_t v) { return v == 0; })) << shape_str(shape);
  if (t.nbytes()) {
    auto* w = t.data_as<uint8_t>();
    w[0] = 1, w[t.nbytes() - 1] = 2;  // first and last byte writable
    EXPECT_EQ(w[0] + w[t.nbytes() - 1], 3);
  }
}

}  // namespace

TEST(Tensor, SmallAndLargeBuffersStartZeroed) {
  expect_zeroed_aligned_writable(DType::f32, {0});
  expect_zeroed_aligned_writable(DType::u8, {3, 5});
  // Around the 32 MiB switch to mmap'd huge-page buffers, including sizes that are not a multiple
  // of 2 MiB.
  expect_zeroed_aligned_writable(DType::u8, {(int64_t(32) << 20) - 64});
  expect_zeroed_aligned_writable(DType::u8, {int64_t(32) << 20});
  expect_zeroed_aligned_writable(DType::bf16, {3, (int64_t(11) << 20) + 7});
}

TEST(Tensor, LargeBufferOutlivesItsFirstHandle) {
  Tensor copy;
  {
    Tensor t(DType::u8, {int64_t(40) << 20});
    t.data_as<uint8_t>()[12345] = 7;
    copy = t.reshaped({int64_t(40), int64_t(1) << 20});
  }
  EXPECT_EQ(copy.data_as<uint8_t>()[12345], 7);
}

TEST(Tensor, RefusesImpossibleSizes) {
  EXPECT_THROW(Tensor(DType::f32, {int64_t(1) << 62, 8}), Error);
  EXPECT_THROW(Tensor(DType::f32, {-1}), Error);
}
