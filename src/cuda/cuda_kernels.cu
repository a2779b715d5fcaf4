// The CUDA backend's kernels: prepack, routing, grouping, the two grouped mixed-input GEMMs, combine.
//
// A run is five launches (six with an input conversion): route -> group -> fc1 -> fc2 -> combine;
// four for T <= 64, where routing and grouping are one single-block kernel (route_group_kernel).
// fc1 and fc2 are one templated weight-streaming kernel (fc_kernel): a warp owns one (or two) 16-row
// tiles of one expert's packed matrix and streams them along K, one 16-byte cp.async per lane per
// span and tile (layout in cuda_sm80_layout.h) into a per-warp shared-memory ring (8 spans in
// flight), dequantizes in registers (lop3/prmt magic numbers; fp16 int4 folds the high-nibble shift
// into an fma with 1/16) and runs mma.sync m16n8k16 with up to NT*8 tokens as the B operand. The
// activations are staged per block: with several tokens per work item (XR = 8) the block's 4 warps
// own tiles of the same item and K range and share one activation stage per span (one block barrier
// per span); at T = 1 (XR = 1) with 4-bit weights the block stages its token once for its whole K
// range, and as a lane then reads back only the weight bytes it copied, the loop needs no barrier at
// all (8-bit: the token's span rides in each warp's stage). Copy addresses are loop-carried (32-bit
// shared addresses, pointers advanced per span): ~80 SASS instructions per 512-byte span at T = 1
// (bf16 int4; ~115 before these steps). Split-K: at T = 1 inside a block (kw warps per tile, summed
// in shared memory in a fixed order) and, for fc2, across blocks (summed by the combine kernel in a
// fixed order). Scales are applied per scale block in fp32 AFTER the mma (the
// mma sums exact integer-valued weights times x), so the only roundings are fp32 accumulation and the
// fc1 activation being stored as fp16/bf16 for fc2; except in bf16 with bf16 block-wise scales (DQ,
// fc_uses_dq), where the weights enter the mma as s * (q - z) rounded to bf16. Determinism: no float atomics anywhere; the
// grouping uses integer atomics only to place rows, and every row's result is independent of its
// position in a tile (each mma output column depends only on its own B column), so outputs are
// bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdio>
#include <algorithm>
#include <type_traits>
#include <utility>

#include "cuda_kernels.h"
#include "timeline.h"
#include "fc_common.cuh"

namespace qmoe::cuda {

namespace {

using namespace dev;

// ----------------------------------------------------------------------------------------------
// programmatic dependent launch (PTX ISA "griddepcontrol", sm_90+)
// ----------------------------------------------------------------------------------------------
// A run is route(+group) -> [convert] -> fc1 -> fc2 -> combine. The kernels after the first are
// launched with the programmatic-serialization attribute (launch_k, pdl = true), so each may be
// scheduled while its predecessor still runs: its launch latency and prologue hide behind the
// predecessor's tail. The rules that keep this correct:
//   - a PDL-launched kernel calls pdl_wait() before it reads anything its predecessors write and
//     before it exits (every block), so "the previous kernel has finished" stays transitive along
//     the chain: fc2 may read the work items (written by the routing kernel) before its own wait,
//     because fc1's blocks trigger only after their wait returned;
//   - the first kernel of a run is launched normally, so it waits for all earlier work in the
//     stream (including the previous run's combine, which reads the routes this run overwrites).
// Below sm_90 both helpers compile to nothing and the host never sets the attribute (pdl_supported).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Timeline marks (timeline.h): thread 0 of the block records when it reached `point`.
#ifdef QMOE_CUDA_TIMELINE
__device__ unsigned long long g_timeline[kTlPoints][2];
__device__ __forceinline__ void tl_mark(int point) {
  if (threadIdx.x != 0) return;
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  atomicMin(&g_timeline[point][0], t);
  atomicMax(&g_timeline[point][1], t);
}
#else
__device__ __forceinline__ void tl_mark(int) {}
#endif

// Launches `kernel`; with pdl, with the programmatic-serialization attribute (see pdl_wait above).
template <class... P, class... A>
void launch_k(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t st, bool pdl, A&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);  // errors: cudaGetLastError after the run
}

constexpr int kWarps = 4;        // warps per FC block
// Scale blocks per tile held in shared memory at a time: 32 at XR = 1 (a refill is a dependent global
// round trip in the stream), 16 at XR = 8, where the smaller area lets another block fit per SM.
template <int XR> constexpr int kScaleChunk = XR == 1 ? 32 : 16;
// fp32 scales (the widest) and uint8 zero points of kScaleChunk blocks of one tile
template <int XR> constexpr int kScaleBytes = kScaleChunk<XR> * kTileRows * 5;

// Pipeline depth: 8 spans in flight per warp at XR = 1 (4 KB of weights) and for 8-bit weights, which
// are bound by bytes in flight; 4 for 4-bit weights at XR = 8, where a warp streams two tiles and one
// more block per SM pays more than a deeper ring (H200, same call, 8 -> 4 stages with 16 instead of
// 32 scale blocks held: qwen3-30b-a3b int4 b128 T=64 169 -> 150 us, gpt-oss-20b T=16 171 -> 155,
// deepseek-v3-like T=64 1757 -> 1625, mixtral T=8 258 -> 242; 8-bit weights 2-7% slower with 4 or 6).
template <int SB, int XR> constexpr int kStages = XR == 1 || SB == 8 ? 8 : 4;

// One pipeline stage of one warp: the span's 512 weight bytes of each of its TPW tiles (then, for
// 8-bit weights at XR = 1, the token's span). The activations are staged per block:
//
// XR = 8 (kBlockX): the block's 4 warps own 4 (or 8, TPW = 2) tiles of the same work item and K range,
//   so they share one activation stage per span: NT*8 token rows of the span (SPAN values, 2 bytes
//   each) stored with a 32-byte pad, copied by the whole block (one or two 16-byte copies per thread)
//   and guarded by one block barrier per span. Lanes (g, t) read 8 bytes at g*stride + 8t; stride =
//   160 (4-bit) or 96 (8-bit) bytes puts the 16 lanes of each 64-bit access phase in distinct banks.
//   Each warp used to stage all NT*8 rows itself: at NT = 2 four times as many activation bytes as
//   weight bytes per tile, and 3 blocks per SM. Sharing them (H200, same call, graph us): mixtral
//   int4 b128 T=8 317 -> 257, T=64 691 -> 547; int4 b32 T=8 516 -> 376; qwen3-30b-a3b int4 b128
//   T=8 94 -> 77; deepseek-v3-like int4 b32 T=64 3699 -> 2642; int8 4-20% faster.
//
// XR = 1 (one token per work item: decode, T = 1), with 8-byte groups of a token's span permuted so
// that lane t's B operands of all k-steps are contiguous (group 4j + t at byte 8 * (KSTEPS * t + j));
// every lane reads them, so all 8 B columns of the mma carry the same token:
//   4-bit weights (kBlockToken): the stage holds only the weights; the block stages its token once,
//     before the loop, for its whole K range, so a span costs one 16-byte copy per lane and no warp
//     barrier (a lane reads back only the bytes it copied). The decode loop is bound by instruction
//     issue there; measured on an H100: mixtral 96.3 -> 93.7 us, deepseek-v3-like 104.8 -> 93.7 us;
//   8-bit weights: the stage holds the token's span too (640 bytes), copied by 16 lanes with the span.
//     Staging the token for the block made mixtral 10% slower (148 -> 162 us): its 14 KB of token
//     leave 5 blocks per SM instead of 7, and 8-bit decode is bound by bytes in flight, not issue.
template <int SB, int NT, int TPW, int XR = 8> struct StageLayout {
  static constexpr bool kBlockToken = XR == 1 && SB == 4;
  static constexpr bool kBlockX = XR == 8;
  static constexpr int kTokenBytes = (SB == 4 ? 64 : 32) * 2;
  static constexpr int kTokenStride = kTokenBytes + 32;
  static constexpr int kChunksPerRow = kTokenBytes / 16;           // 16-byte copies per token row
  static constexpr int kXChunks = NT * 8 * kChunksPerRow;           // kBlockX: copies per block stage
  static constexpr int kXCopies = (kXChunks + kWarps * 32 - 1) / (kWarps * 32);  // ... per thread
  static constexpr int kXStageBytes = kBlockX ? NT * 8 * kTokenStride : 0;  // per block stage
  static constexpr int kXOffset = TPW * kSpanBytes;                 // after the TPW weight vectors
  static constexpr int kBytes = kXOffset + (XR == 1 && !kBlockToken ? kTokenBytes : 0);
  static_assert(XR == 8 || (XR == 1 && NT == 1 && TPW == 1), "one staged token row only at NT = TPW = 1");
};
static_assert(StageLayout<4, 1, 1, 1>::kTokenBytes == token_stage_bytes(1),
              "token_stage_bytes (cuda_kernels.h) is the block's token stage");


// ----------------------------------------------------------------------------------------------
// prepack
// ----------------------------------------------------------------------------------------------

// Tile row f of tile mt -> raw row of the matrix this call packs; false if the row is not this
// call's (another source fills it) . `valid` false marks padding (code 0, scale 0).
__device__ bool raw_row_of(const PackArgs& a, int64_t mt, int f, int64_t& raw, bool& valid) {
  if (a.swiglu_src < 0) {
    const int64_t n = 16 * mt + f;
    valid = n < a.geom.N;
    raw = n;
    return true;
  }
  const int part = f >> 3;  // 0 gate, 1 linear
  const int64_t i = 8 * mt + (f & 7);
  valid = i < a.geom.N;
  if (a.swiglu_src != 2 && a.swiglu_src != part) return false;
  switch (a.swiglu_fusion) {
    case 1: raw = 2 * i + part; break;
    case 2: raw = part * a.geom.N + i; break;
    default: raw = i; break;
  }
  return true;
}

__device__ int raw_code_dev(const PackArgs& a, int64_t row, int64_t c) {
  const int pack = 8 / a.bits;
  const uint8_t byte = a.raw_w[row * (a.raw_k / pack) + c / pack];
  return (byte >> ((c % pack) * a.bits)) & ((1 << a.bits) - 1);
}

__global__ void pack_weights_kernel(PackArgs a) {
  const int64_t total = a.geom.MT * a.geom.S * kSpanBytes;
  const int sk = span_k(a.geom.sbits);
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int byte = int(idx % kVecBytes);
    const int lane = int((idx / kVecBytes) % kLanes);
    const int64_t s = (idx / kSpanBytes) % a.geom.S;
    const int64_t mt = idx / kSpanBytes / a.geom.S;
    uint8_t out = a.dst_w[idx];
    const int nparts = a.geom.sbits == 4 ? 2 : 1;
    for (int hi = 0; hi < nparts; ++hi) {
      int f, kk;
      element_of(a.geom.sbits, lane, byte, hi, f, kk);
      int64_t raw;
      bool valid;
      if (!raw_row_of(a, mt, f, raw, valid)) continue;
      const int64_t c = s * sk + kk;
      const int code = (valid && c < a.geom.K) ? raw_code_dev(a, raw, c) : 0;
      if (a.geom.sbits == 8) {
        out = uint8_t(code);
      } else {
        out = uint8_t((out & (hi ? 0x0f : 0xf0)) | (code << (4 * hi)));
      }
    }
    a.dst_w[idx] = out;
  }
}

__global__ void pack_scales_kernel(PackArgs a) {
  const int64_t total = a.geom.MT * a.geom.NBP * kTileRows;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int f = int(idx % kTileRows);
    const int64_t b = (idx / kTileRows) % a.geom.NBP;
    const int64_t mt = idx / kTileRows / a.geom.NBP;
    int64_t raw;
    bool valid;
    if (!raw_row_of(a, mt, f, raw, valid)) continue;
    valid = valid && b < a.nb;
    switch (a.scale_elt) {
      case Elt::f32:
        static_cast<float*>(a.dst_s)[idx] = valid ? static_cast<const float*>(a.raw_s)[raw * a.nb + b] : 0.f;
        break;
      default:  // f16 / bf16: copy the 2-byte pattern
        static_cast<uint16_t*>(a.dst_s)[idx] = valid ? static_cast<const uint16_t*>(a.raw_s)[raw * a.nb + b] : 0;
        break;
    }
    if (a.dst_z) {
      int code = a.raw_z ? 0 : a.zdefault;
      if (valid && a.raw_z) {
        const int zpack = 8 / a.bits;
        int64_t byte;
        int shift;
        if (a.bs > 0) {
          const int64_t per_row = (a.nb + zpack - 1) / zpack;
          byte = raw * per_row + b / zpack;
          shift = int(b % zpack) * a.bits;
        } else {
          byte = raw / zpack;
          shift = int(raw % zpack) * a.bits;
        }
        code = (a.raw_z[byte] >> shift) & ((1 << a.bits) - 1);
      }
      a.dst_z[idx] = uint8_t(code);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// routing (one warp per token) -- the same selection as route_token() in src/core/routing.cpp
// ----------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sparse mixer weight of `chosen` (see routing.cpp): 1 / sum over unmasked e of exp(score_e - max).
__device__ float sparse_mixer_weight_dev(const RouteArgs& a, const float* lg, int chosen, int removed) {
  const float max_val = lg[chosen];
  float denom = 0.f;
  for (int e = threadIdx.x & 31; e < a.E; e += 32) {
    const float l = lg[e];
    if (e == removed) continue;                    // score set to -inf
    if (isinf(l) && l < 0) continue;               // already -inf
    const float al = fabsf(l);
    const float factor = (al < max_val) ? max_val : al;  // std::max(|l|, max_val)
    if ((max_val - l) / factor > 2 * a.jitter_eps) continue;
    denom += expf(l - max_val);
  }
  return 1.0f / warp_sum(denom);
}

// Shared memory a routing warp works in: E logits (fp32), the chosen-expert mask, and the k chosen
// experts and weights. Keeping the choices here, rather than re-reading route_e / route_w from global
// memory one dependent load at a time on one lane, took qwen3-30b-a3b (E 128, k 8) at T = 64 from
// 231.6 to 217.0 us per layer on an H100 (docs/PERF-cuda.md).
__host__ __device__ constexpr int route_words_per_warp(int E, int k) { return E + ((E + 31) >> 5) + 2 * k; }
__device__ __forceinline__ const int* route_choices(const uint32_t* wsm, int E) {
  return reinterpret_cast<const int*>(wsm + E + ((E + 31) >> 5));
}

// One warp routes token t in `wsm` (route_words_per_warp words of this warp's shared memory).
// counts: per-expert counters (global for route_kernel, shared for route_group_kernel; null: none).
// On return the k choices stay in wsm, at route_choices(wsm, E), in route order.
__device__ void route_token_dev(const RouteArgs& a, int64_t t, int lane, uint32_t* wsm, int* counts) {
  const int E = a.E, k = a.k, words = (E + 31) >> 5;
  float* lg = reinterpret_cast<float*>(wsm);
  uint32_t* mask = wsm + E;
  int* sel_sm = reinterpret_cast<int*>(mask + words);
  float* w_sm = reinterpret_cast<float*>(sel_sm + k);
  __syncwarp();  // a warp routing several tokens reuses its shared memory
  for (int i = lane; i < words; i += 32) mask[i] = 0;
  for (int e = lane; e < E; e += 32) lg[e] = load_elt(a.logits, t * E + e, a.elt);
  __syncwarp();
  const int64_t row = t * E;
  // Sequential argmax semantics: best starts at the first non-excluded expert; a later one wins only
  // with a strictly larger value (NaN never wins, a NaN first stays). Equivalent: if the first is NaN
  // pick it, else the lowest index of the largest non-NaN value. Keys: fp32 mapped to an
  // order-preserving uint32 (-0 folded into +0 so equal floats tie), 0 for experts taken or absent.
  // Without NaN (and E <= 256) each round is two warp reductions over keys held in registers: the
  // largest key, then the lowest expert holding it; the taken expert's key becomes 0.
  constexpr int kPerLane = 8;
  uint32_t keys[kPerLane];
  float vals[kPerLane];  // this lane's logits, experts lane + 32 i
  bool nan = false;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int e = lane + 32 * i;
    keys[i] = 0, vals[i] = 0.f;
    if (e < E) {
      vals[i] = lg[e];
      const float v = vals[i] + 0.0f;
      nan |= v != v;
      const uint32_t u = __float_as_uint(v);
      keys[i] = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    }
  }
  const bool fast = E <= 32 * kPerLane && !__any_sync(0xffffffffu, nan);
  float mine = 0.f;  // fast path: lane j < 32 holds route j's logit (-0 read as +0)
  for (int j = 0; fast && j < k; ++j) {
    uint32_t bk = 0;
    int bi = 0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (keys[i] > bk) bk = keys[i], bi = i;
    const uint32_t mkey = __reduce_max_sync(0xffffffffu, bk);
    const int sel = int(__reduce_min_sync(0xffffffffu, bk == mkey ? uint32_t(lane + 32 * bi) : 0xffffffffu));
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (lane + 32 * i == sel) keys[i] = 0;
    if (lane == j) mine = __uint_as_float((mkey & 0x80000000u) ? (mkey & 0x7fffffffu) : ~mkey);
    if (lane == 0) sel_sm[j] = sel;
  }
  for (int j = 0; !fast && j < k; ++j) {
    // The general case: a mask of taken experts in shared memory, three reductions per round.
    int first = INT_MAX, bi = INT_MAX;
    uint32_t bk = 0;  // below every real key (ord(-inf) = 0x007fffff)
    for (int e = lane; e < E; e += 32) {
      if ((mask[e >> 5] >> (e & 31)) & 1u) continue;
      const float v = lg[e] + 0.0f;
      if (first == INT_MAX) first = e;
      if (v == v) {
        const uint32_t u = __float_as_uint(v);
        const uint32_t key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
        if (bi == INT_MAX || key > bk) bk = key, bi = e;
      }
    }
    first = __reduce_min_sync(0xffffffffu, first);
    const uint32_t mkey = __reduce_max_sync(0xffffffffu, bk);
    bi = __reduce_min_sync(0xffffffffu, (bi != INT_MAX && bk == mkey) ? bi : INT_MAX);
    const float fv = lg[first];
    const int sel = (fv != fv || bi == INT_MAX) ? first : bi;
    if (lane == 0) mask[sel >> 5] |= 1u << (sel & 31), sel_sm[j] = sel;
    __syncwarp();
  }
  __syncwarp();  // sel_sm, written by lane 0, is read by every lane below
  tl_mark(kTlRouteSelected);
  if (a.sparse_mixer) {  // k == 2
    const int e0 = sel_sm[0], e1 = sel_sm[1];
    const float w0 = sparse_mixer_weight_dev(a, lg, e0, -1);
    const float w1 = sparse_mixer_weight_dev(a, lg, e1, e0);
    if (lane == 0) w_sm[0] = w0, w_sm[1] = w1;
  } else if (a.router_weights) {
    for (int j = lane; j < k; j += 32) w_sm[j] = load_elt(a.router_weights, row + sel_sm[j], a.elt);
  } else if (fast && k <= 32) {
    // The same softmax from registers: the largest logit is route 0's (no NaN here; exp(l - mx) is
    // the same for mx = -0 or +0), each lane sums its own logits in the same order as below.
    const float mx = __shfl_sync(0xffffffffu, mine, 0);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (lane + 32 * i < E) sum += expf(vals[i] - mx);
    sum = warp_sum(sum);
    if (lane < k) w_sm[lane] = expf(mine - mx) / sum;
  } else {
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, lg[e]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int e = lane; e < E; e += 32) sum += expf(lg[e] - mx);
    sum = warp_sum(sum);
    for (int j = lane; j < k; j += 32) w_sm[j] = expf(lg[sel_sm[j]] - mx) / sum;
  }
  __syncwarp();
  // Normalization: the sum in route order (as the reference adds them), one lane; then every lane
  // writes its routes.
  float norm = 1.f;
  const bool normalize = a.normalize && !a.sparse_mixer;
  if (normalize && lane == 0) {
    norm = 0.f;
    for (int j = 0; j < k; ++j) norm += w_sm[j];
  }
  norm = __shfl_sync(0xffffffffu, norm, 0);
  for (int j = lane; j < k; j += 32) {
    const int e = sel_sm[j];
    a.route_e[t * k + j] = e;
    a.route_w[t * k + j] = normalize ? w_sm[j] / norm : w_sm[j];
    if (counts) atomicAdd(&counts[e], 1);
  }
}

__global__ void route_kernel(RouteArgs a) {
  extern __shared__ uint32_t route_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * (blockDim.x >> 5) + warp;
  if (t >= a.T) return;
  // Per warp: the token's logits as fp32 (read from global once, coalesced) and the chosen mask.
  route_token_dev(a, t, lane, route_smem + size_t(warp) * route_words_per_warp(a.E, a.k), a.counts);
}

// ----------------------------------------------------------------------------------------------
// grouping (one block): per-expert offsets, work items, slot order
// ----------------------------------------------------------------------------------------------

// The grouping proper, by one block; gsm[0..E) holds the per-expert counts on entry (3E ints).
__device__ void group_body(const GroupArgs& a, int* gsm) {
  int* cnt = gsm;            // [E] counts, later cursors
  int* off = gsm + a.E;      // [E] first position
  int* ioff = gsm + 2 * a.E; // [E] first item
  const int E = a.E;
  const int lo = a.e_first, hi = a.e_count < 0 ? E : a.e_first + a.e_count;  // experts this run computes
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int run_p = 0, run_i = 0;
    for (int base = 0; base < E; base += 32) {
      const int e = base + lane;
      const int c = (e >= lo && e < hi) ? cnt[e] : 0;
      const int ni = (c + a.chunk - 1) / a.chunk;
      int ip = c, ii = ni;  // inclusive scans
      for (int o = 1; o < 32; o <<= 1) {
        const int vp = __shfl_up_sync(0xffffffffu, ip, o), vi = __shfl_up_sync(0xffffffffu, ii, o);
        if (lane >= o) ip += vp, ii += vi;
      }
      if (e < E) off[e] = run_p + ip - c, ioff[e] = run_i + ii - ni;
      run_p += __shfl_sync(0xffffffffu, ip, 31);
      run_i += __shfl_sync(0xffffffffu, ii, 31);
    }
    if (lane == 0) {
      *a.n_items = run_i;
      if (a.n_pos) *a.n_pos = run_p;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int c = (e >= lo && e < hi) ? cnt[e] : 0;
    for (int i = 0, p = 0; p < c; ++i, p += a.chunk)
      a.items[ioff[e] + i] = make_int4(e - lo, off[e] + p, min(a.chunk, c - p), 0);
    cnt[e] = 0;
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < a.slots; s += blockDim.x) {
    const int e = a.route_e[s];
    if (e < lo || e >= hi) continue;
    const int p = off[e] + atomicAdd(&cnt[e], 1);
    a.sorted_slot[p] = int(s);
  }
}

__global__ void group_kernel(GroupArgs a) {
  extern __shared__ int gsm[];
  pdl_launch_dependents();  // the next kernel's blocks may be scheduled now; they wait for this one
  for (int e = threadIdx.x; e < a.E; e += blockDim.x) {
    gsm[e] = a.counts[e];
    a.counts[e] = 0;  // ready for the next run (routing adds into it)
  }
  __syncthreads();
  group_body(a, gsm);
}

// Few tokens: routing and grouping in one block (one launch instead of two). The counts live in
// shared memory, so the global counters are neither touched nor reset (they stay 0). Route results
// written to global memory by one warp are read by others after __syncthreads (block-scope visibility).
__global__ void __launch_bounds__(1024, 1) route_group_kernel(RouteArgs ra, GroupArgs ga, int route_warps) {
  extern __shared__ int rgsm[];
  tl_mark(kTlRouteStart);
  pdl_launch_dependents();  // the next kernel's blocks may be scheduled now; they wait for this one
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int E = ra.E, per_warp = route_words_per_warp(E, ra.k);
  for (int e = threadIdx.x; e < E; e += blockDim.x) rgsm[e] = 0;
  __syncthreads();
  if (warp < route_warps) {
    uint32_t* wsm = reinterpret_cast<uint32_t*>(rgsm + 3 * E) + size_t(warp) * per_warp;
    for (int64_t t = warp; t < ra.T; t += route_warps) route_token_dev(ra, t, lane, wsm, rgsm);
  }
  __syncthreads();
  tl_mark(kTlRouteRouted);
  group_body(ga, rgsm);
  tl_mark(kTlRouteEnd);
}

// One token: routing and grouping by one warp. The k chosen experts are distinct, so each one in
// [e_first, e_first + e_count) is a work item of one slot, placed at its rank among them (ascending
// expert order, as group_body places them). At T = 1 the 1024-thread kernel above spent 1.3 us of
// qwen3-30b-a3b's 4.5 us of routing on the grouping's scans and barriers.
__global__ void route_one_kernel(RouteArgs ra, GroupArgs ga) {
  extern __shared__ uint32_t r1sm[];
  tl_mark(kTlRouteStart);
  pdl_launch_dependents();  // the next kernel's blocks may be scheduled now; they wait for this one
  const int lane = threadIdx.x, k = ra.k;
  route_token_dev(ra, 0, lane, r1sm, nullptr);
  __syncwarp();  // the choices, written by lane 0, are read by every lane
  tl_mark(kTlRouteRouted);
  const int* sel = route_choices(r1sm, ra.E);  // route order: slot j is route j of token 0
  const int lo = ga.e_first, hi = ga.e_count < 0 ? ra.E : ga.e_first + ga.e_count;
  int mine = 0;
  for (int j = lane; j < k; j += 32) {
    const int e = sel[j];
    if (e < lo || e >= hi) continue;
    int p = 0;
    for (int m = 0; m < k; ++m) p += sel[m] >= lo && sel[m] < e;
    ga.items[p] = make_int4(e - lo, p, 1, 0);
    ga.sorted_slot[p] = j;
    ++mine;
  }
  mine = __reduce_add_sync(0xffffffffu, mine);
  if (lane == 0) {
    *ga.n_items = mine;
    if (ga.n_pos) *ga.n_pos = mine;
  }
  tl_mark(kTlRouteEnd);
}

// ----------------------------------------------------------------------------------------------
// input conversion
// ----------------------------------------------------------------------------------------------

// mma_order: column c goes to position 16 (c / 16) + mma_col_of(c % 16) (for the wgmma kernel).
// One thread per 16-column group of a row: with `vec` (the input's rows 16-byte aligned, H % 16 == 0)
// a group is read with 16-byte loads; the output (the compute type, f16 or bf16) is written with two
// 16-byte stores. One element per thread took qwen3-30b-a3b's 2048 x 2048 input 23 us on an H100.
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi, Elt oe) {
  uint32_t r;
  if (oe == Elt::f16) {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&r, &v, 4);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &v, 4);
  }
  return r;
}

__global__ void convert_kernel(const void* in, Elt ie, void* out, Elt oe, int64_t T, int64_t H, int64_t ld,
                               bool mma_order, bool vec, const int* gather, int k, const int* n_pos) {
  pdl_wait();  // the gather reads the grouping's order; without it the chain must stay transitive
  pdl_launch_dependents();
  const int64_t gpr = ld / 16, total = T * gpr;  // 16-column groups per row (ld % 16 == 0)
  const int64_t filled = gather ? *n_pos : T;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = i / gpr, c0 = (i % gpr) * 16;
    const int64_t t = p >= filled ? -1 : gather ? gather[p] / k : p;  // input row, -1: zeros
    float v[16];
    if (t < 0) {
#pragma unroll
      for (int j = 0; j < 16; ++j) v[j] = 0.f;
    } else if (vec && c0 < H) {
      if (ie == Elt::f32) {
        const float4* src = reinterpret_cast<const float4*>(static_cast<const float*>(in) + t * H + c0);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 f = __ldg(src + q);
          v[4 * q] = f.x, v[4 * q + 1] = f.y, v[4 * q + 2] = f.z, v[4 * q + 3] = f.w;
        }
      } else {
        const uint4* src = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(in) + t * H + c0);
        uint32_t w[8];
        const uint4 a = __ldg(src), b = __ldg(src + 1);
        w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          float2 f;
          if (ie == Elt::f16) {
            __half2 h;
            memcpy(&h, &w[q], 4);
            f = __half22float2(h);
          } else {
            __nv_bfloat162 h;
            memcpy(&h, &w[q], 4);
            f = __bfloat1622float2(h);
          }
          v[2 * q] = f.x, v[2 * q + 1] = f.y;
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < 16; ++j) v[j] = c0 + j < H ? load_elt(in, t * H + c0 + j, ie) : 0.f;
    }
    // Pair q (columns 2q, 2q + 1) lands at pair (q & 1) * 4 + q / 2 in mma order (mma_col_of).
    uint32_t o[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) o[mma_order ? (q & 1) * 4 + (q >> 1) : q] = pack_pair(v[2 * q], v[2 * q + 1], oe);
    uint4* dst = reinterpret_cast<uint4*>(static_cast<uint16_t*>(out) + p * ld + c0);
    dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
    dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
  }
}

// ----------------------------------------------------------------------------------------------
// the FC kernels
// ----------------------------------------------------------------------------------------------


// Copies `nblk` scale blocks (16 scales each) and, if present, their zero points of one tile into
// the warp's shared-memory slice.
__device__ __forceinline__ void fill_scales(uint8_t* ssm, uint8_t* zsm, const void* s, const uint8_t* z, int64_t off,
                                         int nblk, int es, int lane) {
  __syncwarp();
  const uint32_t* src = reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(s) + off * es);
  const int n4 = nblk * kTileRows * es / 4;
  for (int i = lane; i < n4; i += 32) reinterpret_cast<uint32_t*>(ssm)[i] = __ldg(src + i);
  if (z) {
    const uint32_t* zs = reinterpret_cast<const uint32_t*>(z + off);
    for (int i = lane; i < nblk * kTileRows / 4; i += 32) reinterpret_cast<uint32_t*>(zsm)[i] = __ldg(zs + i);
  }
  __syncwarp();
}

struct BlockParams {
  float s0, s1;
  int z0, z1;
};
// Scale and zero point of tile rows g and g+8 of one block, from the warp's shared-memory slice
// (`i` = block offset * 16 + g). Runs once per scale block.
__device__ __forceinline__ BlockParams block_params(const uint8_t* ssm, const uint8_t* zsm, int i, int es, Elt se,
                                                 bool has_z, int zdef) {
  BlockParams p;
  if (es == 4) {
    p.s0 = reinterpret_cast<const float*>(ssm)[i];
    p.s1 = reinterpret_cast<const float*>(ssm)[i + 8];
  } else {
    const uint16_t h0 = reinterpret_cast<const uint16_t*>(ssm)[i], h1 = reinterpret_cast<const uint16_t*>(ssm)[i + 8];
    if (se == Elt::f16) p.s0 = __half2float(__ushort_as_half(h0)), p.s1 = __half2float(__ushort_as_half(h1));
    else p.s0 = __bfloat162float(__ushort_as_bfloat16(h0)), p.s1 = __bfloat162float(__ushort_as_bfloat16(h1));
  }
  p.z0 = has_z ? zsm[i] : zdef;
  p.z1 = has_z ? zsm[i + 8] : zdef;
  return p;
}

// XR: token rows staged per n-tile (8, or 1 when every work item holds one token; see StageLayout).
// At XR = 1 the block is small enough for 7 per SM, at XR = 8 for 3..6 (3 at NT * TPW = 8); the bound
// keeps registers from undoing that.
// DQ (bf16 with bf16 block-wise scales, as in fc_sm90.cu): the dequantizer multiplies each weight by
// its scale, so the mma take s * (q - z) rounded once to bf16 and no scale block is folded; both kernel
// families then compute the same products, so a layer's result does not depend on which one runs
// beyond the order of its fp32 sums.
template <class CT, int SB, int NT, bool FC1, int TPW, int XR, bool DQ = false>
__global__ void __launch_bounds__(kWarps * 32, XR == 1 ? 7 : NT * TPW >= 8 ? 3 : 4) fc_kernel(const FcArgs a) {
  constexpr int SPAN = SB == 4 ? 64 : 32;
  constexpr int KSTEPS = SPAN / 16;
  constexpr int STAGES = kStages<SB, XR>;  // spans in flight per warp
  using SL = StageLayout<SB, NT, TPW, XR>;
  constexpr bool BX = SL::kBlockX;     // the block shares its activation stages (one K range, kw = 1)
  // TPW: 16-row tiles per warp, sharing the B fragments (see FcArgs::tpw).
  const int item = blockIdx.x;
  constexpr int tl = FC1 ? kTlFc1Start : kTlFc2Start;  // + 1 waited, + 2 staged, + 3 looped, + 4 reduced
  tl_mark(tl);
  // fc1 reads the routing kernel's output from here on; fc2 only the work items until its wait below
  // (they come from the routing kernel, finished before fc1's blocks passed their wait).
  if constexpr (FC1) pdl_wait(), pdl_launch_dependents(), tl_mark(tl + 1);
  if (item >= *a.n_items) {  // whole block: no barrier is skipped by part of it
    pdl_wait();
    return;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Intra-block split-K: KW warps share one 16-row tile, each streaming 1/KW of the K range; their
  // sums meet in shared memory in a fixed order (deterministic) before the epilogue.
  const int KW = BX ? 1 : a.kw;
  const int kq = warp % KW;
  const int64_t mt0 = (int64_t(blockIdx.y) * (kWarps / KW) + warp / KW) * TPW;
  const MatrixGeom& G = a.geom;
  const bool active = mt0 < G.MT;  // inactive warps still reach the block barrier
  const int4 it = a.items[item];
  const int e = it.x, p0 = it.y, cnt = it.z;
  const int g = lane >> 2, t = lane & 3;

  // B rows: fc1 reads token sorted_slot / k, fc2 the item's own rows of fc1's output.
  auto x_row = [&](int idx) {
    const int pos = p0 + idx;
    const int64_t r = FC1 ? int64_t(a.sorted_slot[pos] / a.k) : int64_t(pos);
    return reinterpret_cast<const uint8_t*>(static_cast<const CT*>(a.x) + r * a.x_ld);
  };
  // XR = 1: the item's one token. BX: the 16-byte pieces of each span this thread copies into the
  // block's stage (piece idx of the stage: row idx / kChunksPerRow; null past the item's tokens, which
  // are zero-filled).
  const uint8_t* xrow[SL::kXCopies];
  uint32_t xdst[SL::kXCopies];
#pragma unroll
  for (int c = 0; c < SL::kXCopies; ++c) {
    const int idx = XR == 1 ? 0 : int(threadIdx.x) + c * kWarps * 32;
    const int row = XR == 1 ? 0 : idx / SL::kChunksPerRow, piece = idx % SL::kChunksPerRow;
    xdst[c] = row * SL::kTokenStride + piece * 16;
    xrow[c] = row < cnt && idx < (XR == 1 ? 1 : SL::kXChunks) ? x_row(row) + piece * 16 : nullptr;
  }

  // Span indices fit 32 bits (K < 2^31 / 64 is far beyond any layer); 32-bit loop state keeps the
  // decode loop's address arithmetic and register count down.
  int s_begin = int(blockIdx.z * a.spans_per_split);
  int s_end = int(min(G.S, int64_t(s_begin) + a.spans_per_split));
  {
    const int per = (s_end - s_begin + KW - 1) / KW;
    s_begin = min(s_end, s_begin + kq * per);
    s_end = min(s_end, s_begin + per);
  }
  if (!active && !BX) s_end = s_begin;  // BX: such a warp still copies and meets the barriers
  // Tile u of this warp; a tile past the end (odd MT) re-reads tile mt0 and is never stored.
  const uint4* wp[TPW];
  int64_t sbase[TPW];
#pragma unroll
  for (int u = 0; u < TPW; ++u) {
    const int64_t mtc = (active && mt0 + u < G.MT) ? mt0 + u : (active ? mt0 : 0);
    wp[u] = reinterpret_cast<const uint4*>(a.w) + (int64_t(e) * G.MT + mtc) * G.S * kLanes + lane;
    sbase[u] = (int64_t(e) * G.MT + mtc) * G.NBP * kTileRows;
  }

  // At NT = 1 two partial accumulators, even and odd k-steps, so consecutive mma.sync do not wait on
  // each other (ncu showed "wait" stalls dominating the decode loop); with more n-tiles their mma
  // already alternate, and one set keeps the registers for the B fragments.
  constexpr int PARTS = NT == 1 ? 2 : 1;
  float acc[TPW][NT][4], part[PARTS][TPW][NT][4];
#pragma unroll
  for (int u = 0; u < TPW; ++u)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        acc[u][nt][r] = 0.f;
#pragma unroll
        for (int q = 0; q < PARTS; ++q) part[q][u][nt][r] = 0.f;
      }
  // n-tiles holding at least one of the item's tokens: the others' mma and B loads are skipped
  // (their output columns are never stored; an item of a chunk of 32 often holds 9..24 tokens).
  const int nt_used = (cnt + 7) >> 3;

  // Scales and zero points of this warp's tile reach shared memory in chunks of kScaleChunk<XR> blocks,
  // copied by the whole warp with coalesced 4-byte loads (fill_scales, once per kScaleChunk<XR> blocks);
  // a scale block then costs a shared-memory read instead of a dependent DRAM round trip.
  extern __shared__ __align__(16) uint8_t fc_smem[];
  const int es = a.scale_elt == Elt::f32 ? 4 : 2;
  uint8_t* ssm = fc_smem + warp * a.smem_per_warp;  // TPW x kScaleBytes<XR>, then the ring
  uint8_t* ring = ssm + TPW * kScaleBytes<XR>;      // STAGES x StageLayout::kBytes
  int chunk0 = -1;  // first block held in shared memory
  const int64_t ks = int64_t(s_begin) * KSTEPS;  // global k-step
  int blk = int(ks / G.kpb);
  int kc = int(ks % G.kpb);
  ZeroRep<CT, SB> zr[TPW];
  float sc0[TPW], sc1[TPW];
  uint32_t sp0[TPW], sp1[TPW];  // DQ: the block's scales of rows g and g + 8 as bf16 pairs (s, s)
  auto load_block = [&](int b) {
    const bool refill = b >= chunk0 + kScaleChunk<XR> || chunk0 < 0;
    if (refill) chunk0 = b;
#pragma unroll
    for (int u = 0; u < TPW; ++u) {
      uint8_t* us = ssm + u * kScaleBytes<XR>;
      uint8_t* uz = us + kScaleChunk<XR> * kTileRows * 4;
      if (refill)
        fill_scales(us, uz, a.s, a.z, sbase[u] + int64_t(b) * kTileRows,
                    int(min(int64_t(kScaleChunk<XR>), G.NBP - b)), es, lane);
      const int i = int(b - chunk0) * kTileRows + g;
      const BlockParams bp = block_params(us, uz, i, es, a.scale_elt, a.z != nullptr, a.zdefault);
      sc0[u] = bp.s0, sc1[u] = bp.s1;
      if constexpr (DQ) {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(us) + i;
        sp0[u] = scale_pair(h), sp1[u] = scale_pair(h + 8);
      }
      zr[u].set(bp.z0, bp.z1);
    }
  };
  auto flush = [&]() {
#pragma unroll
    for (int u = 0; u < TPW; ++u)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          float p = part[0][u][nt][r];
          if constexpr (PARTS == 2) p += part[1][u][nt][r], part[1][u][nt][r] = 0.f;
          acc[u][nt][r] = fmaf(r < 2 ? sc0[u] : sc1[u], p, acc[u][nt][r]);
          part[0][u][nt][r] = 0.f;
        }
  };

  // Software pipeline through shared memory (cp.async, PTX ISA "cp.async"): STAGES spans in flight
  // per warp, each stage = this warp's 512 weight bytes + the span's activations of its NT*8
  // tokens. Register rings were tried first: unrolled they made >100 KB kernels (instruction-cache
  // misses), rolled they need register moves that wait on the newest load (one load in flight).
  // Shared memory is indexed at run time, so the loop stays rolled and small.
  // The activations are fc1's output. With the block's token staged apart (kBlockToken), fc2 first
  // starts its weight and scale loads (they depend only on the work items, see fc_kernel's top), so
  // their latency overlaps fc1's last blocks; it waits just before copying the token.
  if constexpr (!FC1 && !SL::kBlockToken) pdl_wait(), pdl_launch_dependents(), tl_mark(tl + 1);
  // Loop-carried copy state: source pointers advance by one span per issue, the stage address
  // cycles through the ring (span s_begin + i uses stage i % STAGES). Being loop-carried, these stay
  // in registers instead of being recomputed from the kernel parameters every span (ptxas did that
  // under the XR = 1 register bound). Shared addresses are 32-bit state-space addresses.
  const uint32_t ring_sa = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  const uint32_t ring_end = ring_sa + STAGES * SL::kBytes;
  const uint8_t* wnext[TPW];
#pragma unroll
  for (int u = 0; u < TPW; ++u) wnext[u] = reinterpret_cast<const uint8_t*>(wp[u] + int64_t(s_begin) * kLanes);
  const uint32_t wdst = lane * 16;
  // XR = 1: xsrc[0] is never null (an item holds >= 1 token). kBlockToken: the block's token over its
  // split's spans [s_lo, s_hi), after the warps' areas, one 8-byte group per copy (permuted as in a
  // stage), copied after the first weight stages were issued; lane t reads span s's at
  // xrd1 + (s - s_begin) * kTokenBytes. Else lane 4j + t' copies group 4j + t' of each span into the
  // stage, and lane t reads its operands at stage + xrd1.
  const uint8_t* xnext = XR == 1 ? xrow[0] + int64_t(s_begin) * SL::kTokenBytes + 8 * lane : nullptr;
  const uint32_t xdst1 = SL::kXOffset + 8 * (KSTEPS * (lane & 3) + (lane >> 2));
  uint32_t xrd1 = SL::kXOffset + 8 * KSTEPS * t;
  uint32_t st_w = ring_sa;  // stage of the next span to issue
  // BX: the block's activation stages follow the warps' areas; stage i of the ring holds span i's rows.
  uint8_t* const xring = fc_smem + kWarps * a.smem_per_warp;
  const uint32_t xring_sa = static_cast<uint32_t>(__cvta_generic_to_shared(xring));
  auto issue = [&](int s) {
    if (s < s_end) {
      [[maybe_unused]] const uint32_t su = uint32_t(s);
      const uint32_t st = st_w;
#pragma unroll
      for (int u = 0; u < TPW; ++u) cp_async16_stream_sa(st + u * kSpanBytes + wdst, wnext[u]);
      if constexpr (XR == 1 && !SL::kBlockToken) {
        if (lane < 4 * KSTEPS) cp_async8_sa(st + xdst1, xnext);
      } else if constexpr (BX) {
        const uint32_t xst = xring_sa + (st - ring_sa) / SL::kBytes * SL::kXStageBytes;
#pragma unroll
        for (int c = 0; c < SL::kXCopies; ++c) {
          if (SL::kXChunks % (kWarps * 32) != 0 && int(threadIdx.x) + c * kWarps * 32 >= SL::kXChunks) continue;
          const uint8_t* src = xrow[c] ? xrow[c] + size_t(su) * SL::kTokenBytes : static_cast<const uint8_t*>(a.x);
          cp_async16_zfill_sa(xst + xdst[c], src, xrow[c] ? 16 : 0);
        }
      }
    }
    cp_async_commit();  // always, so group counting stays uniform at the tail
#pragma unroll
    for (int u = 0; u < TPW; ++u) wnext[u] += kSpanBytes;
    if constexpr (XR == 1 && !SL::kBlockToken) xnext += SL::kTokenBytes;
    st_w = st_w + SL::kBytes == ring_end ? ring_sa : st_w + SL::kBytes;
  };
  const int s_lo = int(blockIdx.z * a.spans_per_split), s_hi = int(min(G.S, int64_t(s_lo) + a.spans_per_split));
  const uint32_t xs_sa = xring_sa;  // kBlockToken: the token stage (no activation ring at XR = 1)
  auto copy_token = [&]() {
    constexpr int kGroups = SL::kTokenBytes / 8;  // per span
    for (int i = threadIdx.x; i < (s_hi - s_lo) * kGroups; i += kWarps * 32) {
      const int sp = i / kGroups, b = i % kGroups;
      cp_async8_sa(xs_sa + sp * SL::kTokenBytes + 8 * (KSTEPS * (b & 3) + (b >> 2)),
                   xrow[0] + int64_t(s_lo + sp) * SL::kTokenBytes + 8 * b);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) issue(s_begin + i);
  // fc1 may copy its token now (past its wait at the top), so that the copy's latency overlaps the
  // scales' loads below; fc2 first waits for fc1.
  if constexpr (SL::kBlockToken && FC1) copy_token();
  if (s_begin < s_end) load_block(blk);  // after the first stages are in flight
  if constexpr (SL::kBlockToken) {
    if constexpr (!FC1) pdl_wait(), pdl_launch_dependents(), tl_mark(tl + 1), copy_token();
    xrd1 = xs_sa + (s_begin - s_lo) * SL::kTokenBytes + 8 * KSTEPS * t;
    cp_async_wait<0>();  // this thread's share of the token (and the first stages) have landed
    __syncthreads();     // ... and every thread's; all warps of the block get here
    tl_mark(tl + 2);
  }
  uint32_t st_r = 0;  // byte offset in the ring of the stage of the span being computed

  // Three compile-time variants so scale-block boundaries cost no per-k-step test:
  //   KB = 0: blocks hold whole spans (kpb % KSTEPS == 0): one boundary test per span;
  //   KB = 1 or 2: kpb == KB k-steps (bs = 16 or 32 inside an int4 span): boundaries at fixed k-steps.
  auto main_loop = [&](auto kb_tag) {
    constexpr int KB = decltype(kb_tag)::value;
#pragma unroll 1
    for (int s = s_begin; s < s_end; ++s) {
      cp_async_wait<STAGES - 2>();  // this thread's copies of span s have landed
      // ... and every lane's (x pieces are read by other lanes; BX: by other warps). The barrier also
      // says every warp is done with span s - 1, whose stage the issue below refills.
      if constexpr (BX) __syncthreads();
      else if constexpr (!SL::kBlockToken) __syncwarp();
      issue(s + STAGES - 1);
      [[maybe_unused]] const uint8_t* xst = xring + st_r / SL::kBytes * SL::kXStageBytes;
      const uint32_t st_sa = ring_sa + st_r;
      st_r = st_r + SL::kBytes == STAGES * SL::kBytes ? 0 : st_r + SL::kBytes;
      uint4 v[TPW];
#pragma unroll
      for (int u = 0; u < TPW; ++u) v[u] = lds128(st_sa + u * kSpanBytes + wdst);
      uint2 bx[NT][KSTEPS];
      if constexpr (XR == 1) {
        const uint32_t xb = SL::kBlockToken ? xrd1 : st_sa + xrd1;
#pragma unroll
        for (int j = 0; j < KSTEPS; j += 2) {
          const uint4 v2 = lds128(xb + 8 * j);
          bx[0][j] = make_uint2(v2.x, v2.y);
          bx[0][j + 1] = make_uint2(v2.z, v2.w);
        }
        if constexpr (SL::kBlockToken) xrd1 += SL::kTokenBytes;
      } else {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int j = 0; j < KSTEPS; ++j)
            if (nt == 0 || nt < nt_used)
              bx[nt][j] = *reinterpret_cast<const uint2*>(xst + (nt * 8 + g) * SL::kTokenStride + (16 * j + 4 * t) * 2);
      }
#pragma unroll
      for (int j = 0; j < KSTEPS; ++j) {
#pragma unroll
        for (int u = 0; u < TPW; ++u) {
          uint32_t af[4];
          dequant<CT, SB>(v[u], j, zr[u], af);
          if constexpr (DQ) scale_fragment<CT>(af, sp0[u], sp1[u]);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            if (nt == 0 || nt < nt_used) CtTraits<CT>::mma(part[j % PARTS][u][nt], af, bx[nt][j].x, bx[nt][j].y);
        }
        if constexpr (KB > 0) {
          if ((j + 1) % KB == 0) {
            if constexpr (!DQ) flush();
            ++blk;
            if (s < s_end - 1 || j < KSTEPS - 1) load_block(blk);
          }
        }
      }
      if constexpr (KB == 0) {
        kc += KSTEPS;
        if (kc == G.kpb) {
          if constexpr (!DQ) flush();
          kc = 0;
          ++blk;
          if (s < s_end - 1) load_block(blk);
        }
      }
    }
    cp_async_wait<0>();
  };
  if (G.kpb % KSTEPS == 0) {
    main_loop(std::integral_constant<int, 0>{});
  } else if (G.kpb == 1) {
    main_loop(std::integral_constant<int, 1>{});
    kc = 0;
  } else {
    main_loop(std::integral_constant<int, 2>{});
    kc = 0;
  }
  if constexpr (DQ) {  // the sums are final: acc = parts
#pragma unroll
    for (int u = 0; u < TPW; ++u) sc0[u] = sc1[u] = 1.f;
    flush();
  } else if (kc != 0) {
    flush();
  }
  tl_mark(tl + 3);

  if (KW > 1) {
    // Each warp's partial sums go to the start of its own ring, idle now (its copies have landed:
    // cp_async_wait<0> above; __syncwarp: all its lanes are done reading). No static shared array,
    // so that 7 blocks of the XR = 1 variant fit an SM's shared memory.
    constexpr int kRed = TPW * NT * 4 * 32;  // floats per warp
    static_assert(kRed * 4 <= kStages<SB, XR> * SL::kBytes, "the ring holds the split-K partial sums");
    auto red = [&](int w) {
      return reinterpret_cast<float*>(fc_smem + w * a.smem_per_warp + TPW * kScaleBytes<XR>);
    };
    __syncwarp();
    float* mine = red(warp);
#pragma unroll
    for (int u = 0; u < TPW; ++u)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) mine[((u * NT + nt) * 4 + r) * 32 + lane] = acc[u][nt][r];
    __syncthreads();
    if (kq != 0) return;
#pragma unroll
    for (int u = 0; u < TPW; ++u)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          float v = acc[u][nt][r];
          for (int q = 1; q < KW; ++q) v += red(warp + q)[((u * NT + nt) * 4 + r) * 32 + lane];  // fixed order
          acc[u][nt][r] = v;
        }
  }
  tl_mark(tl + 4);
  if (!active) return;

  // fc2: the rows of y that this thread's tokens go to, all loaded before the first store (with the
  // load inside the store loop, each store waited on its own load).
  int y_slot[FC1 ? 1 : NT][2];
  if constexpr (!FC1) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int idx = nt * 8 + 2 * t + c;
        y_slot[nt][c] = idx < cnt ? a.sorted_slot[p0 + idx] : 0;
      }
  }
#pragma unroll
  for (int u = 0; u < TPW; ++u) {
    const int64_t mt = mt0 + u;
    if (mt >= G.MT) break;
    if constexpr (FC1) {
      const bool swiglu = G.map == RowMap::swiglu;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int idx = nt * 8 + 2 * t + c;
          if (idx >= cnt) continue;
          CT* arow = static_cast<CT*>(a.a) + int64_t(p0 + idx) * a.a_ld;
          if (swiglu) {
            const int64_t i = 8 * mt + g;
            float v = 0.f;
            if (i < a.I) {
              float gt = acc[u][nt][c], ln = acc[u][nt][2 + c];
              if (a.bias_g) gt += a.bias_g[int64_t(e) * a.a_ld + i];
              if (a.bias_l) ln += a.bias_l[int64_t(e) * a.a_ld + i];
              v = swiglu_dev(gt, ln, a.limit, a.alpha, a.beta);
            }
            arow[i] = CtTraits<CT>::from_float(v);
          } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int64_t n = 16 * mt + g + 8 * h;
              float v = 0.f;
              if (n < a.I) {
                v = acc[u][nt][2 * h + c];
                if (a.bias_g) v += a.bias_g[int64_t(e) * a.a_ld + n];
                v = act_dev(a.act, v);
              }
              arow[n] = CtTraits<CT>::from_float(v);
            }
          }
        }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int idx = nt * 8 + 2 * t + c;
          if (idx >= cnt) continue;
          float* yrow = a.y + (int64_t(blockIdx.z) * a.slots + y_slot[nt][c]) * a.H;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t n = 16 * mt + g + 8 * h;
            if (n < a.H) yrow[n] = acc[u][nt][2 * h + c];
          }
        }
      }
    }
  }
}

template <int SB, int NT, int TPW, int XR> constexpr int fc_smem_per_warp() {
  return TPW * kScaleBytes<XR> + kStages<SB, XR> * StageLayout<SB, NT, TPW, XR>::kBytes;
}
// The block's shared memory besides the token stage of kBlockToken: the warps' areas, then the
// activation stages of kBlockX.
template <int SB, int NT, int TPW, int XR> constexpr int fc_smem_fixed() {
  return kWarps * fc_smem_per_warp<SB, NT, TPW, XR>() + kStages<SB, XR> * StageLayout<SB, NT, TPW, XR>::kXStageBytes;
}

template <class CT, int SB, int NT, bool FC1, int TPW, int XR, bool DQ>
void launch_fc_kernel(const FcArgs& a, dim3 grid, cudaStream_t st) {
  FcArgs b = a;
  b.smem_per_warp = fc_smem_per_warp<SB, NT, TPW, XR>();
  // 26..63 KB (kBlockToken: plus the token's stage, 128 bytes per span): needs the opt-in above 48 KB
  const size_t smem = size_t(fc_smem_fixed<SB, NT, TPW, XR>()) +
                     (StageLayout<SB, NT, TPW, XR>::kBlockToken ? size_t(token_stage_bytes(a.spans_per_split)) : 0);
  launch_k(fc_kernel<CT, SB, NT, FC1, TPW, XR, DQ>, grid, dim3(kWarps * 32), smem, st, b.pdl, b);
}
template <class CT, int SB, int NT, bool FC1, int TPW, int XR = 8>
void launch_fc_one(const FcArgs& a, dim3 grid, cudaStream_t st) {
  if constexpr (std::is_same_v<CT, __nv_bfloat16>) {
    if (fc_uses_dq(a)) return launch_fc_kernel<CT, SB, NT, FC1, TPW, XR, true>(a, grid, st);
  }
  launch_fc_kernel<CT, SB, NT, FC1, TPW, XR, false>(a, grid, st);
}

template <class CT, int SB, int NT, bool FC1, int TPW, int XR, bool DQ>
cudaError_t set_smem_attr_dq(int optin) {
  // The block's token stage grows with K (launch_fc_one), so allow all the device has.
  cudaError_t e = cudaFuncSetAttribute(fc_kernel<CT, SB, NT, FC1, TPW, XR, DQ>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       StageLayout<SB, NT, TPW, XR>::kBlockToken ? optin
                                                                                 : fc_smem_fixed<SB, NT, TPW, XR>());
  // All FC kernels are bounded by shared memory (XR = 1: 7 blocks of ~30 KB); ask for the largest
  // shared-memory carveout so the occupancy does not depend on the driver's default choice.
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(fc_kernel<CT, SB, NT, FC1, TPW, XR, DQ>, cudaFuncAttributePreferredSharedMemoryCarveout,
                             int(cudaSharedmemCarveoutMaxShared));
  return e;
}
template <class CT, int SB, int NT, bool FC1, int TPW, int XR = 8>
cudaError_t set_smem_attr(int optin) {
  cudaError_t e = set_smem_attr_dq<CT, SB, NT, FC1, TPW, XR, false>(optin);
  if constexpr (std::is_same_v<CT, __nv_bfloat16>)
    if (e == cudaSuccess) e = set_smem_attr_dq<CT, SB, NT, FC1, TPW, XR, true>(optin);
  return e;
}
template <class CT, int SB, bool FC1>
cudaError_t set_smem_attrs_nt(int optin) {
  cudaError_t e = set_smem_attr<CT, SB, 1, FC1, 1, 1>(optin);
  if (e == cudaSuccess) e = set_smem_attr<CT, SB, 1, FC1, 1>(optin);
  if (e == cudaSuccess) e = set_smem_attr<CT, SB, 1, FC1, 2>(optin);
  if (e == cudaSuccess) e = set_smem_attr<CT, SB, 2, FC1, 1>(optin);
  if (e == cudaSuccess) e = set_smem_attr<CT, SB, 2, FC1, 2>(optin);
  if (e == cudaSuccess) e = set_smem_attr<CT, SB, 4, FC1, 1>(optin);
  if (e == cudaSuccess) e = set_smem_attr<CT, SB, 4, FC1, 2>(optin);
  return e;
}

template <bool FC1, class CT, int SB>
void launch_fc_nt(const FcArgs& a, cudaStream_t st) {
  const int tpw = (a.xr == 8 && a.tpw == 2) ? 2 : 1;  // two tiles per warp only with block-shared x
  const int tiles_per_block = kWarps / a.kw * tpw;
  const dim3 grid(unsigned(a.max_items), unsigned((a.geom.MT + tiles_per_block - 1) / tiles_per_block),
                  unsigned(a.splits));
  switch (a.nt * 4 + tpw) {
    case 5: a.xr == 1 ? launch_fc_one<CT, SB, 1, FC1, 1, 1>(a, grid, st) : launch_fc_one<CT, SB, 1, FC1, 1>(a, grid, st); break;
    case 6: launch_fc_one<CT, SB, 1, FC1, 2>(a, grid, st); break;
    case 9: launch_fc_one<CT, SB, 2, FC1, 1>(a, grid, st); break;
    case 10: launch_fc_one<CT, SB, 2, FC1, 2>(a, grid, st); break;
    case 17: launch_fc_one<CT, SB, 4, FC1, 1>(a, grid, st); break;
    case 18: launch_fc_one<CT, SB, 4, FC1, 2>(a, grid, st); break;
    default: break;  // the host checks nt and tpw
  }
}

template <bool FC1>
void launch_fc(const FcArgs& a, cudaStream_t st) {
  if (a.max_items == 0) return;
  dispatch_fc_variant(a.ct, a.geom.sbits, [&]<class CT, int SB>() { launch_fc_nt<FC1, CT, SB>(a, st); });
}

__global__ void combine_kernel(CombineArgs a) {
  tl_mark(kTlCombineStart);
  pdl_wait();
  tl_mark(kTlCombineWaited);
  const int64_t h = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (h >= a.H) return;
  for (int64_t t = blockIdx.y; t < a.T; t += gridDim.y) {
    float out = 0.f;
    // Routes in groups of 8 with all their loads issued before the first add: the sums keep the
    // fixed order (splits ascending, then bias, then routes ascending) while the loads overlap.
    for (int j0 = 0; j0 < a.k; j0 += 8) {
      float y[8], w[8];
      int ex[8];
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        y[jj] = 0.f, w[jj] = 0.f, ex[jj] = 0;
        if (j0 + jj < a.k) {
          const int64_t slot = t * a.k + j0 + jj;
          ex[jj] = a.route_e[slot];
          w[jj] = a.route_w[slot];
          y[jj] = a.y[slot * a.H + h];
        }
      }
      for (int s = 1; s < a.splits; ++s)
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
          if (j0 + jj < a.k) y[jj] += a.y[(s * a.slots + t * a.k + j0 + jj) * a.H + h];
#pragma unroll
      for (int jj = 0; jj < 8; ++jj)
        if (j0 + jj < a.k) {
          if (a.bias2) y[jj] += a.bias2[int64_t(ex[jj]) * a.H + h];
          out += w[jj] * y[jj];
        }
    }
    store_elt(a.out, t * a.H + h, a.out_elt, out);
  }
  tl_mark(kTlCombineEnd);
}

int grid_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return int(b < 1 ? 1 : (b > 65535 * 16 ? 65535 * 16 : b));
}

}  // namespace

void launch_pack(const PackArgs& a, cudaStream_t st) {
  pack_weights_kernel<<<grid_for(a.geom.weight_bytes_per_expert(), 256), 256, 0, st>>>(a);
  pack_scales_kernel<<<grid_for(a.geom.scale_count_per_expert(), 256), 256, 0, st>>>(a);
}

void launch_route(const RouteArgs& a, cudaStream_t st) {
  if (a.T == 0) return;
  const size_t per_warp = size_t(route_words_per_warp(a.E, a.k)) * 4;
  const int warps = int(std::max<size_t>(1, std::min<size_t>(4, 48 * 1024 / per_warp)));
  const size_t smem = size_t(warps) * per_warp;
  route_kernel<<<unsigned((a.T + warps - 1) / warps), warps * 32, smem, st>>>(a);
}

void launch_group(const GroupArgs& a, cudaStream_t st) {
  group_kernel<<<1, 1024, size_t(3) * a.E * sizeof(int), st>>>(a);
}

void launch_route_group(const RouteArgs& ra, const GroupArgs& ga, cudaStream_t st) {
  if (ra.T == 0) return;
  if (ra.T == 1) {
    route_one_kernel<<<1, 32, size_t(route_words_per_warp(ra.E, ra.k)) * 4, st>>>(ra, ga);
    return;
  }
  const int route_warps = int(std::min<int64_t>(32, ra.T));
  const size_t smem = (size_t(3) * ra.E + size_t(route_warps) * route_words_per_warp(ra.E, ra.k)) * 4;
  if (ra.T > 64 || smem > 48 * 1024) {
    launch_route(ra, st);
    launch_group(ga, st);
    return;
  }
  route_group_kernel<<<1, 1024, smem, st>>>(ra, ga, route_warps);
}

void launch_convert_input(const void* in, Elt ie, void* out, Elt oe, int64_t T, int64_t H, int64_t ld,
                          bool mma_order, bool pdl, cudaStream_t st, const int* gather, int k, const int* n_pos) {
  if (T == 0) return;
  const bool vec = H % 16 == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0;
  launch_k(convert_kernel, dim3(grid_for(T * (ld / 16), 256)), dim3(256), 0, st, pdl, in, ie, out, oe, T, H, ld,
           mma_order, vec, gather, k, n_pos);
}

bool pdl_supported(int device) {
  int major = 0;
  cudaFuncAttributes fa{};
  // The kernels carry griddepcontrol only where they were compiled for sm_90+ (a PTX JIT of an older
  // target would not wait), so both the GPU and the code actually loaded must be sm_90+.
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9 &&
         cudaFuncGetAttributes(&fa, combine_kernel) == cudaSuccess && fa.ptxVersion >= 90;
}

cudaError_t init_kernels() {
  // Raises the dynamic shared-memory limit of every FC kernel once, outside any stream capture.
  int device = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return e;
  return for_each_fc_variant([&]<class CT, int SB, bool FC1>() { return set_smem_attrs_nt<CT, SB, FC1>(optin); });
}

void launch_fc1(const FcArgs& a, cudaStream_t st) { launch_fc<true>(a, st); }
void launch_fc2(const FcArgs& a, cudaStream_t st) { launch_fc<false>(a, st); }

const char* timeline_point_name(int point) {
  static const char* const names[kTlPoints] = {
      "route.start", "route.selected", "route.routed", "route.end", "fc1.start", "fc1.waited", "fc1.staged",
      "fc1.looped", "fc1.reduced", "fc2.start", "fc2.waited", "fc2.staged", "fc2.looped", "fc2.reduced",
      "combine.start", "combine.waited", "combine.end"};
  return point >= 0 && point < kTlPoints ? names[point] : "?";
}
#ifdef QMOE_CUDA_TIMELINE
bool timeline_enabled() { return true; }
void timeline_reset() {
  uint64_t v[kTlPoints][2];
  for (auto& p : v) p[0] = UINT64_MAX, p[1] = 0;
  cudaMemcpyToSymbol(g_timeline, v, sizeof v);
}
void timeline_read(uint64_t (*first_last)[2]) {
  cudaMemcpyFromSymbol(first_last, g_timeline, sizeof(uint64_t) * 2 * kTlPoints);
}
#else
bool timeline_enabled() { return false; }
void timeline_reset() {}
void timeline_read(uint64_t (*first_last)[2]) {
  for (int p = 0; p < kTlPoints; ++p) first_last[p][0] = UINT64_MAX, first_last[p][1] = 0;
}
#endif

void launch_combine(const CombineArgs& a, cudaStream_t st) {
  if (a.T == 0) return;
  const dim3 grid(unsigned((a.H + 127) / 128), unsigned(a.T < 65535 ? a.T : 65535));
  launch_k(combine_kernel, grid, dim3(128), 0, st, a.pdl, a);
}

}  // namespace qmoe::cuda
