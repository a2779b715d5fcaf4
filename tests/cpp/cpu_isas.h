// The CPU backend's instruction sets this machine can run, for tests that check every kernel path.
#pragma once

#include <string>
#include <vector>

namespace qmoe::test {

inline std::vector<std::string> isas() {
  std::vector<std::string> v{"portable"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) v.push_back("avx2");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    v.push_back("avx512");
  return v;
}

}  // namespace qmoe::test
