#include "qmoe/routing.h"

#include <cmath>
#include <limits>

namespace qmoe {

namespace {

// Index of the largest value among those not excluded; ties go to the lower index. NaN never wins
// a comparison, so a NaN logit is picked only when nothing before it was; routing stays defined.
int64_t argmax_excluding(const float* v, int64_t n, const uint8_t* excluded) {
  int64_t best = -1;
  for (int64_t e = 0; e < n; ++e) {
    if (excluded[e]) continue;
    if (best < 0 || v[e] > v[best]) best = e;
  }
  return best;
}

// Phi-3.5-MoE's sparse mixer for one choice: softmax over the logits within a relative distance
// 2*eps of the chosen maximum (others masked out), evaluated at the chosen expert.
float sparse_mixer_weight(const float* logits, const float* scores, int64_t E, int64_t chosen) {
  const float max_val = scores[chosen];
  float denom = 0.f;
  for (int64_t e = 0; e < E; ++e) {
    if (std::isinf(scores[e]) && scores[e] < 0) continue;  // already removed
    const float factor = std::max(std::fabs(logits[e]), max_val);
    if ((max_val - logits[e]) / factor > 2 * kSparseMixerJitterEps) continue;
    denom += std::exp(scores[e] - max_val);
  }
  return 1.0f / denom;  // exp(max_val - max_val) / denom
}

}  // namespace

void route_token(const MoeSpec& spec, const float* logits, const float* router_weights, Route* out) {
  const int64_t E = spec.num_experts, k = spec.k;
  std::vector<uint8_t> used(size_t(E), 0);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = argmax_excluding(logits, E, used.data());
    used[size_t(e)] = 1;
    out[j].expert = int32_t(e);
  }

  if (spec.use_sparse_mixer) {  // k == 2 (validated)
    std::vector<float> scores(logits, logits + E);
    out[0].weight = sparse_mixer_weight(logits, scores.data(), E, out[0].expert);
    scores[size_t(out[0].expert)] = -std::numeric_limits<float>::infinity();
    out[1].weight = sparse_mixer_weight(logits, scores.data(), E, out[1].expert);
    return;
  }

  if (router_weights) {
    for (int64_t j = 0; j < k; ++j) out[j].weight = router_weights[out[j].expert];
  } else {
    float mx = logits[0];
    for (int64_t e = 1; e < E; ++e) mx = std::max(mx, logits[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += std::exp(logits[e] - mx);
    for (int64_t j = 0; j < k; ++j) out[j].weight = std::exp(logits[out[j].expert] - mx) / sum;
  }
  if (spec.normalize_routing_weights) {
    float s = 0.f;
    for (int64_t j = 0; j < k; ++j) s += out[j].weight;
    for (int64_t j = 0; j < k; ++j) out[j].weight /= s;
  }
}

std::vector<Route> route_all(const MoeSpec& spec, const MoeInputs& in) {
  const int64_t rows = input_rows(in), E = spec.num_experts, k = spec.k;
  std::vector<Route> routes(size_t(rows * k));
  std::vector<float> logits(static_cast<size_t>(E)), rw(static_cast<size_t>(E));
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t e = 0; e < E; ++e) logits[size_t(e)] = load_as_float(in.router_probs.dtype, in.router_probs.data, t * E + e);
    if (in.router_weights)
      for (int64_t e = 0; e < E; ++e)
        rw[size_t(e)] = load_as_float(in.router_weights->dtype, in.router_weights->data, t * E + e);
    route_token(spec, logits.data(), in.router_weights ? rw.data() : nullptr, &routes[size_t(t * k)]);
  }
  return routes;
}

}  // namespace qmoe
