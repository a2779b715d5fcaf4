// Launchers for the CUDA backend's kernels (cuda_kernels.cu). Problem structs in, launches out: no
// allocation, no synchronization, so a sequence of these is capturable in a CUDA graph. The host side
// (cuda_backend.cpp) owns buffers and decides configurations; these functions only launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_sm80_layout.h"

namespace qmoe::cuda {

// Element types as the kernels see them.
enum class Elt : int { f32 = 0, f16 = 1, bf16 = 2 };

// ---- prepack: one expert of one raw matrix (device staging) into the packed arrays ----
struct PackArgs {
  MatrixGeom geom;
  int bits = 4;              // raw code width (2, 4, 8)
  int64_t raw_rows = 0;      // rows of the raw matrix (fc1: fc1_rows; fc3: I; fc2: H)
  int64_t raw_k = 0;         // columns K of the raw matrix
  int64_t nb = 1;            // raw scale blocks per row (1 row-wise)
  int64_t bs = 0;            // block size (0 row-wise)
  int swiglu_src = -1;       // -1: plain map; else which source this call fills:
                             //   0 = gate rows, 1 = linear rows, 2 = both (one raw matrix)
  int swiglu_fusion = 0;     // 1 interleaved (gate 2i, linear 2i+1), 2 concatenated (gate i, linear I+i),
                             // 0 separate (rows i of this raw matrix)
  const uint8_t* raw_w = nullptr;   // [raw_rows, raw_k / pack]
  const void* raw_s = nullptr;      // [raw_rows, nb] of scale_elt
  const uint8_t* raw_z = nullptr;   // packed zero points or null
  int zdefault = 8;                 // written where dst_z exists but this source has no zero points
  Elt scale_elt = Elt::f32;
  uint8_t* dst_w = nullptr;  // this expert's weight vectors
  void* dst_s = nullptr;     // this expert's scales
  uint8_t* dst_z = nullptr;  // this expert's zero points (or null)
};
void launch_pack(const PackArgs& a, cudaStream_t st);

// ---- routing: logits -> (expert, weight) per (token, route) and per-expert counts ----
struct RouteArgs {
  const void* logits = nullptr;         // [T, E]
  const void* router_weights = nullptr; // [T, E] or null
  Elt elt = Elt::f32;
  int64_t T = 0;
  int E = 0, k = 1;
  bool normalize = false, sparse_mixer = false;
  float jitter_eps = 0.01f;
  int* route_e = nullptr;     // [T*k]
  float* route_w = nullptr;   // [T*k]
  int* counts = nullptr;      // [E], zero on entry (the group kernel re-zeroes it)
};
void launch_route(const RouteArgs& a, cudaStream_t st);

// ---- grouping: counts -> work items (expert, first position, count <= chunk) and slot order ----
struct GroupArgs {
  int E = 0;
  int64_t slots = 0;          // T*k
  int chunk = 8;              // tokens per work item (8 * n-tiles of the FC kernels)
  const int* route_e = nullptr;
  int* counts = nullptr;      // read, then reset to 0
  int4* items = nullptr;      // {expert, first position, count, 0}
  int* n_items = nullptr;
  int* n_pos = nullptr;       // or null: positions filled (the slots of the experts this run computes)
  int* sorted_slot = nullptr; // [slots]: position -> slot (t*k + j), grouped by expert
  // Expert parallel (cuda_ep.cpp): only experts [e_first, e_first + e_count) get positions and items,
  // whose expert field is then local (e - e_first); slots of other experts are left out. -1: all E.
  int e_first = 0;
  int e_count = -1;
};
void launch_group(const GroupArgs& a, cudaStream_t st);
// Both: one warp at T = 1; for T <= 64 (and small enough E) one single-block kernel; else
// launch_route + launch_group.
// ra.counts must be zero on entry either way and is zero afterwards.
void launch_route_group(const RouteArgs& ra, const GroupArgs& ga, cudaStream_t st);

// ---- input conversion: [T, H] of `in_elt` -> [T, ld] of compute type (ld % 16 == 0), zero padded; with
// mma_order, each 16-column group in the order the wgmma kernel reads (cuda_sm80_layout.h) ----
// pdl: launched as a programmatic dependent of the routing kernel (pdl_supported, cuda_kernels.cu).
// With `gather` (sorted_slot): output row p is input row gather[p] / k for p < *n_pos, zeros after;
// T is then the number of output rows (slots).
void launch_convert_input(const void* in, Elt in_elt, void* out, Elt out_elt, int64_t T, int64_t H,
                          int64_t ld, bool mma_order, bool pdl, cudaStream_t st, const int* gather = nullptr,
                          int k = 1, const int* n_pos = nullptr);

// ---- the grouped mixed-input GEMMs ----

struct FcArgs {
  MatrixGeom geom;
  const uint8_t* w = nullptr;  // packed weights, all experts
  int64_t experts = 0;         // experts in w
  const void* s = nullptr;     // packed scales
  Elt scale_elt = Elt::f32;
  const uint8_t* z = nullptr;  // packed zero points or null
  int zdefault = 8;
  Elt ct = Elt::f16;           // compute type of x / a (f16 or bf16)
  const int4* items = nullptr;
  const int* n_items = nullptr;
  const int* sorted_slot = nullptr;
  int max_items = 0;           // grid bound
  int nt = 1;                  // n-tiles of 8 tokens per item (1, 2, 4)
  int k = 1;                   // routes per token (slot / k = token)
  // B operand rows: fc1: x[token * x_ld]; fc2: a[pos * x_ld]
  const void* x = nullptr;
  int64_t x_ld = 0;
  // fc1 epilogue: a[pos * a_ld + i] = act(acc + bias)
  void* a = nullptr;
  int64_t a_ld = 0;
  int64_t I = 0;               // real inter size (columns >= I are written as 0)
  const float* bias_g = nullptr;  // [E][a_ld] gate (or plain) bias, or null
  const float* bias_l = nullptr;  // [E][a_ld] linear bias (swiglu), or null
  int act = 0;                 // qmoe::Activation value
  float limit = 0, alpha = 1, beta = 0;
  // fc2 epilogue: y[(split * slots + slot) * H + n]
  float* y = nullptr;
  int64_t slots = 0;
  int64_t H = 0;
  int splits = 1;              // grid split-K count (fc2 only; combine sums the splits)
  int64_t spans_per_split = 0;
  int kw = 1;                  // warps per tile inside a block (1, 2, 4; xr = 1 only): deterministic in-block split-K
  int tpw = 1;                 // 16-row tiles per warp (1, 2; 2 only with xr = 8): they share the B
                               // fragments, halving the activation reads per weight, but fewer warps
                               // fit (measured on H100: faster at 2+ tokens per expert, slower at 1)
  int xr = 8;                  // token rows staged per n-tile: 1 only when no work item holds more than
                               // one token (T = 1; needs nt = 1, tpw = 1), else 8. At 1 with 4-bit
                               // weights the block stages its token for its whole K split:
                               // token_stage_bytes(spans_per_split), which must stay within kMaxTokenStage
  int smem_per_warp = 0;       // set by the launcher
  bool pdl = false;            // launched as a programmatic dependent of the previous kernel (sm_90+)
};
// Whether an FC kernel multiplies the scales into the dequantized weights (DQ, fc_sm90.cu and
// fc_kernel): bf16 compute (bf16 layers, and fp32 ones, which pass through bf16) with bf16 scales of
// more than one block per row. Both kernel families decide it alike, so they compute the same products.
inline bool fc_uses_dq(Elt ct, Elt scale_elt, const MatrixGeom& g) {
  return ct == Elt::bf16 && scale_elt == Elt::bf16 && g.NBP > 1;
}
inline bool fc_uses_dq(const FcArgs& a) { return fc_uses_dq(a.ct, a.scale_elt, a.geom); }

// Shared memory of the token staged by an XR = 1 block of 4-bit weights over `spans` spans (64 values
// of 2 bytes each), and the most the host lets it take.
constexpr int64_t token_stage_bytes(int64_t spans) { return spans * 128; }
constexpr int64_t kMaxTokenStage = 48 * 1024;
// Whether the run's kernels may be launched as programmatic dependents (griddepcontrol): an sm_90+
// GPU running code compiled for sm_90+. Kernels after a run's first then overlap their predecessor's
// tail (cuda_kernels.cu explains the rules).
bool pdl_supported(int device);
// Once per device, before any launch or capture: sets the FC kernels' shared-memory limits.
cudaError_t init_kernels();
void launch_fc1(const FcArgs& a, cudaStream_t st);
void launch_fc2(const FcArgs& a, cudaStream_t st);

// ---- combine: out[t][h] = sum_j w_j * (sum_s y[s][t*k+j][h] + b2[e_j][h]), rounded once ----
struct CombineArgs {
  const float* y = nullptr;
  int splits = 1;
  int64_t slots = 0, T = 0, H = 0;
  int k = 1;
  const int* route_e = nullptr;
  const float* route_w = nullptr;
  const float* bias2 = nullptr;  // [E][H] or null
  void* out = nullptr;
  Elt out_elt = Elt::f32;
  bool pdl = false;  // launched as a programmatic dependent of fc2
};
void launch_combine(const CombineArgs& a, cudaStream_t st);

// Total wall-clock-free check: returns cudaGetLastError() as a string-able code.
}  // namespace qmoe::cuda
