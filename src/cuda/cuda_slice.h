// Internal to src/cuda: the CUDA backend's entry points for one rank's slice of an expert-parallel
// layer (used by cuda_ep.cpp; defined at the end of cuda_backend.cpp so the slice runs through the
// backend's own configuration and FC dispatch).
//
// A slice is an ordinary cuda-sm80 packed object for experts [first, first + count) of a layer (its
// spec is local_spec(global, range)) that also remembers the global spec: routing runs over all E
// experts with the global k and routing flags, grouping keeps only the slice's experts, and the
// combine writes an fp32 partial output, sum over this slice's routes of w_j (y_j + b2[e_j]), instead
// of the final output (0 for a token none of whose routes land here).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "qmoe/backend.h"
#include "qmoe/expert_parallel.h"

namespace qmoe {

// Packs experts `range` of a layer; `raw_slice` holds only those experts (slice_experts()). Throws
// qmoe::Error when `backend` is not the cuda backend or the global E exceeds what grouping supports.
std::unique_ptr<PackedExperts> cuda_prepack_slice(Backend& backend, const MoeSpec& global, RawExperts raw_slice,
                                                  const ExpertRange& range);

struct CudaSliceRunArgs {
  const void* input = nullptr;  // [rows, H], activation dtype
  // Either logits [rows, E_global] (routing runs here) or routes already made elsewhere:
  const void* router_probs = nullptr;
  const void* router_weights = nullptr;  // optional, [rows, E_global]
  const int* route_e = nullptr;          // [rows * k] global expert ids, or null
  const float* route_w = nullptr;        // [rows * k] mixing weights, with route_e
  int* counts = nullptr;  // with route_e: per-expert counts of route_e over all E_global, filled by the
                          // caller (reset to 0 by the run); unused otherwise
  float* partial = nullptr;  // [rows, H] fp32 out, every element written
  int64_t rows = 0;
  cudaStream_t stream = nullptr;
};
// The capturable core for a slice: no allocation, no host synchronization once the workspace holds
// `rows` (cuda_reserve_workspace(backend, slice, rows)).
void cuda_run_slice(Backend& backend, const PackedExperts& slice, const CudaSliceRunArgs& args);

}  // namespace qmoe
