// The random tests' seed: fresh per run (tests print it with every failure), or QMOE_TEST_SEED=<seed>
// to replay one.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <random>

namespace qmoe::test {

inline uint64_t base_seed() {
  static const uint64_t seed = [] {
    if (const char* s = std::getenv("QMOE_TEST_SEED")) return uint64_t(std::strtoull(s, nullptr, 10));
    return uint64_t(std::random_device{}()) << 32 | std::random_device{}();
  }();
  return seed;
}

}  // namespace qmoe::test
