// A tiny reference run for fuzzers that end with a valid (spec, raw) pair: proves the parsed layer is
// self-consistent enough for the oracle to read every byte the spec says it has. Only for small layers
// (the bound keeps one execution in the millisecond range).
#pragma once

#include <cstdint>

#include "qmoe/inputs.h"
#include "qmoe/raw_experts.h"
#include "qmoe/reference.h"
#include "qmoe/spec.h"
#include "qmoe/tensor.h"

namespace qmoe_fuzz {

inline uint64_t touch_bytes(const qmoe::Tensor& t) {
  uint64_t s = 0;
  if (t.empty()) return 0;
  const auto* p = static_cast<const uint8_t*>(t.data());
  for (size_t i = 0; i < t.nbytes(); ++i) s += p[i];
  return s;
}

inline uint64_t touch_raw(const qmoe::RawExperts& r) {
  uint64_t s = 0;
  auto m = [&](const qmoe::RawMatrix& x) {
    s += touch_bytes(x.weights) + touch_bytes(x.scales);
    if (x.zero_points) s += touch_bytes(*x.zero_points);
    if (x.bias) s += touch_bytes(*x.bias);
  };
  m(r.fc1);
  m(r.fc2);
  if (r.fc3) m(*r.fc3);
  return s;
}

// Runs reference_forward on `tokens` rows of deterministic input when E*(fc1_rows+I)*H is small.
// Returns false when the layer was too big to try.
inline bool tiny_reference_run(const qmoe::MoeSpec& s, const qmoe::RawExperts& raw, int64_t tokens, uint32_t salt) {
  if (s.num_experts > 4096 || s.hidden > 65536 || s.inter > 65536) return false;  // (harness: no overflow below)
  const int64_t work = s.num_experts * (s.fc1_rows() + 2 * s.inter) * s.hidden;
  if (work <= 0 || work > (int64_t(1) << 20) || tokens > 64) return false;
  qmoe::Tensor x(s.act_dtype, {tokens, s.hidden});
  qmoe::Tensor logits(s.act_dtype, {tokens, s.num_experts});
  uint32_t st = salt * 2654435761u + 1;
  auto next = [&] {
    st = st * 1664525u + 1013904223u;
    return float(int32_t(st >> 8) % 2001 - 1000) / 500.0f;
  };
  for (int64_t i = 0; i < x.numel(); ++i) qmoe::store_from_float(s.act_dtype, x.data(), i, next());
  for (int64_t i = 0; i < logits.numel(); ++i) qmoe::store_from_float(s.act_dtype, logits.data(), i, next());
  qmoe::MoeInputs in;
  in.input = x.view();
  in.router_probs = logits.view();
  qmoe::Tensor y = qmoe::reference_forward(s, raw, in);
  if (y.shape() != x.shape() || y.dtype() != x.dtype()) {
    __builtin_fprintf(stderr, "FINDING: reference_forward output shape/dtype differs from the input's\n");
    __builtin_trap();
  }
  touch_bytes(y);
  return true;
}

}  // namespace qmoe_fuzz
