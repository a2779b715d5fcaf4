// Routing (contract §4.1): for each token, which k experts and with what mixing weight.
//
// This is the scalar definition every backend must match: selection by the k largest logits with
// ties going to the lower expert index; weights from a softmax over all E logits (or gathered from
// router_weights), optionally normalized over the selected k; or the sparse mixer (k = 2).
#pragma once

#include <cstdint>
#include <vector>

#include "qmoe/inputs.h"
#include "qmoe/spec.h"

namespace qmoe {

struct Route {
  int32_t expert;
  float weight;
};

// Routes of one token: k entries in selection order (largest logit first).
// `logits` and `router_weights` (nullable) are fp32 rows of length E.
void route_token(const MoeSpec& spec, const float* logits, const float* router_weights, Route* out);

// Routes of every row: result[t * k + j]. Inputs must be validated.
std::vector<Route> route_all(const MoeSpec& spec, const MoeInputs& in);

// The sparse mixer's threshold (Phi-3.5-MoE's jitter_eps): an expert is masked out of a choice's
// softmax when (max - logit) / max(|logit|, max) > 2 * kSparseMixerJitterEps.
inline constexpr float kSparseMixerJitterEps = 0.01f;

}  // namespace qmoe
