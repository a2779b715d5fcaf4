// The option half of a random layer for the CPU backend tests: zero points on about a third of the
// matrices, biases on half, routing normalization, activation and scale dtypes. Shapes, bits, block
// size and activation stay with each test, which samples them for what it checks.
#pragma once

#include "qmoe/dtype.h"
#include "qmoe/spec.h"

namespace qmoe::test {

// pick(n): a uniform random int in [0, n) from the test's generator.
template <class Pick>
void randomize_layer_options(MoeSpec& s, Pick&& pick) {
  s.fc1_zero_points = pick(3) == 0;
  s.fc2_zero_points = pick(3) == 0;
  s.fc3_zero_points = s.has_fc3() && pick(3) == 0;
  s.fc1_bias = pick(2);
  s.fc2_bias = pick(2);
  s.fc3_bias = s.has_fc3() && pick(2);
  s.normalize_routing_weights = pick(2);
  const DType dts[] = {DType::f32, DType::f16, DType::bf16};
  s.act_dtype = dts[pick(3)];
  s.scale_dtype = dts[pick(3)];
}

}  // namespace qmoe::test
