// Launchers for the expert-parallel kernels (ep_kernels.cu): the partial combine of a rank's expert
// slice, the all-to-all dispatch plan and packing, the source-side sum of returned partials, and the
// fp32 -> T conversion after the all-reduce. Like cuda_kernels.h: problem structs in, launches out,
// no allocation, no synchronization. The NCCL calls between them live in cuda_ep.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_kernels.h"

namespace qmoe::cuda {

// out[t][h] (fp32, a.out) = sum over routes j of token t whose expert lies in [e_first, e_first + e_count)
// of w_j * (sum_s y[s][t*k+j][h] + b2[e_j - e_first][h]); 0 where none does. Same order of operations
// as launch_combine (splits ascending, then bias, then routes ascending). a.out_elt must be f32.
void launch_combine_partial(const CombineArgs& a, int e_first, int e_count, cudaStream_t st);

// All-to-all dispatch plan for one rank's token slice (one block): dest mask of token t = the owners
// of its k experts; send_pos[t * world + g] = the token's row in the send buffer (rows for rank g are
// contiguous, rank-ascending, tokens ascending within a rank) or -1; send_counts[g] = rows for rank g.
struct EpPlanArgs {
  const int* route_e = nullptr;  // [n * k] global expert ids
  int64_t n = 0;                 // tokens in the slice
  int k = 1;
  int64_t E = 0;                 // global experts (owner_of_expert's split)
  int world = 1;
  int* send_pos = nullptr;       // [n * world]
  int* send_counts = nullptr;    // [world]
};
void launch_ep_plan(const EpPlanArgs& a, cudaStream_t st);

// Copies each token row (row_bytes bytes of x[t]) and its k routes to every send position planned for it.
struct EpPackArgs {
  const uint8_t* x = nullptr;    // [n, row_bytes] the slice's input rows
  int64_t row_bytes = 0;
  const int* route_e = nullptr;  // [n * k]
  const float* route_w = nullptr;
  int64_t n = 0;
  int k = 1, world = 1;
  const int* send_pos = nullptr;
  uint8_t* send_x = nullptr;     // [rows sent, row_bytes]
  int* send_e = nullptr;         // [rows sent * k]
  float* send_w = nullptr;
};
void launch_ep_pack(const EpPackArgs& a, cudaStream_t st);

// counts[route_e[i]] += 1 for i < slots (integer atomics; counts has the global E entries, zero on entry).
void launch_ep_count(const int* route_e, int64_t slots, int* counts, cudaStream_t st);

// out[t][h] (T = out_elt) = sum over g ascending with send_pos[t * world + g] >= 0 of
// back[send_pos[...]][h] (fp32), rounded once; t < n.
struct EpGatherSumArgs {
  const float* back = nullptr;   // [rows sent, H]
  const int* send_pos = nullptr;
  int64_t n = 0, H = 0;
  int world = 1;
  void* out = nullptr;           // [n, H]
  Elt out_elt = Elt::f32;
};
void launch_ep_gather_sum(const EpGatherSumArgs& a, cudaStream_t st);

// out[i] = round_T(in[i]) for i < n (after the all-reduce of fp32 partials).
void launch_ep_convert(const float* in, void* out, Elt out_elt, int64_t n, cudaStream_t st);

}  // namespace qmoe::cuda
