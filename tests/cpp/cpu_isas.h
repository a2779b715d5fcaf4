// The CPU backend's instruction sets this machine can run, for tests that check every kernel path.
#pragma once

#include <string>
#include <vector>

namespace qmoe::test {

// What the backend's AVX-512 kernels need (F/BW/VL), and what its bf16 and int8 compute modes add.
inline bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
inline bool has_avx512_bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }
inline bool has_avx512_vnni() { return has_avx512() && __builtin_cpu_supports("avx512vnni"); }
// What the int8 mode's byte-permute kernels add (avx512_vnni_kernels(true)).
inline bool has_avx512_vnni_vbmi() { return has_avx512_vnni() && __builtin_cpu_supports("avx512vbmi"); }

inline std::vector<std::string> isas() {
  std::vector<std::string> v{"portable"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) v.push_back("avx2");
  if (has_avx512()) v.push_back("avx512");
  return v;
}

}  // namespace qmoe::test
