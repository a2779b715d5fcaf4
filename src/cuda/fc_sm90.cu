// The Hopper (sm_90a) FC kernel for large batches: a grouped mixed-input GEMM on wgmma.
//
// Same problem, packed weights (cuda_sm80_layout.h: one copy serves both kernels) and numerics as the
// SM80-family kernel in cuda_kernels.cu: the tensor cores multiply exact integer-valued weights (q - z)
// by the activations, scales are applied per scale block in fp32 after the multiply, accumulation is
// fp32; except (both kernels alike, fc_uses_dq) for bf16 compute with bf16 block-wise scales (DQ),
// where the dequantizer multiplies each weight by its scale (one HMUL2 per 2 weights) and the tensor
// cores take s * (q - z) rounded once to bf16, as a bf16 model's weights would be. That drops the
// fp32 fold of every scale block (N / 2 FMAs per thread per block, more than the dequantization
// itself at block 32) and its partial sums. H100, T = 2048, mixtral int4 b32 4.77 -> 3.99-4.13 ms,
// b128 4.26 -> 3.98-4.08 ms (docs/PERF-cuda.md); the GPU tests state the tolerance it meets. fp16
// keeps the fold: there s * (q - z) could overflow where the fp32 fold does not. What changes is
// the shape of the work:
//
//  * A block (one per SM; two at N <= 32) is warp-specialised: a producer warpgroup copies, two
//    consumer warpgroups (three for 4-bit weights at N = 128 and 192 without partial sums, kConsumersOf)
//    multiply. It owns 64 weight rows per consumer (4 tiles of 16; consumer warp q of warpgroup w owns
//    tile 4w + q) x N tokens of one expert (one work item of the grouping with chunk
//    N; N = 8, 16, 32, 64 or 128 by the tokens per expert, sm90_width, or 192 where that pays,
//    sm90_wide_pays). Each consumer warpgroup issues
//    wgmma.m64nNk16 with the weights as A FROM REGISTERS: a lane's 16-byte span vector is, after the
//    magic-number dequantization, exactly its A fragment (the per-warp register layout of wgmma's
//    m64nNk16 A operand is mma.m16n8k16's, 16 rows per warp). Dequantization costs ~2 ALU operations
//    per 2 weights per N tokens. The width matters below 128 tokens per expert: at N = 128 an item of
//    16 tokens paid for 128 columns of tensor work and of activation copies
//    (H100, --gemm sm90, N = 128 -> sm90_width: mixtral int4 b128 T = 64 869 -> 472 us; docs/PERF-cuda.md).
//    Above 128 tokens per expert the number of items matters too: every item's block dequantizes all
//    its weights, so width 192 (one item for an expert of 129-192 tokens, one stage per drain to fit
//    its 96 accumulators per thread beside three consumers) took mixtral int4 at T = 2048 from 3.32-3.35
//    to 3.04-3.11 ms (H100, docs/PERF-cuda.md, "Items of up to 192 tokens"), and int8 from 3.50 to
//    3.09 ms once 8-bit weights had three consumers too.
//  * The activations are B, from shared memory through a wgmma descriptor: N token rows of 64 k
//    (128 bytes) per stage, 128-byte swizzled, an item's rows being contiguous: fc1 reads x through
//    the converted copy gathered into expert order, one row per slot (launch_convert_input with
//    gather: a tensor copy's box cannot gather), fc2 reads fc1's output `a`. Because the layout renames
//    k inside each k-step (lane t's mma columns 2t, 2t+1, 2t+8, 2t+9 are real k 4t..4t+3), B must be
//    stored with the same renaming: the converted copy is written in that order (mma_order), and fc1
//    here writes `a` in that order for fc2 here. The two kernels are therefore dispatched together.
//  * Pipeline: up to 16 shared-memory stages (kStages; at N = 128 with two consumers 10 for 4-bit and
//    8 for 8-bit weights, with three 8 and 7, at N = 192 4) of (N x 128 bytes of activations + the
//    block's 4 or 8 KB of packed weights + the scales and zero points of the stage's scale blocks),
//    each with a full and an empty mbarrier.
//    The producer refills a stage once the consumers released it, with tensor copies (TMA) that
//    count their bytes down on the stage's full barrier as they land: one thread issues a stage in a
//    handful of copies, where 128 threads had issued 1,280 16-byte cp.async (H100, T = 2048, mixtral
//    int4 b128 2,690 -> 2,254 us, deepseek-v3-like 5,030 -> 4,212; docs/PERF-cuda.md, "Every copy a
//    tensor copy"). The consumers share each activation stage but otherwise run independently, so
//    one dequantizes and folds scales while another's wgmma run. A consumer drains its own wgmma
//    before dequantizing again (see the loop), two 64-k stages per drain where no scale block ends
//    between them.
//  * Block order: groups of 8 work items sweep all row blocks (activations stay in L2).
//  * Scale blocks of >= 64 k: the k-steps of a block accumulate in `part` (wgmma with scale-d = 0 at
//    the block's first k-step), then acc += s * part per row. Block size 32: two blocks per stage,
//    the second into `part2`, so the first block's fold overlaps the second block's wgmma.
//    DQ: no part, every k-step accumulates into acc with its weights already scaled.
//    Row-wise scales: wgmma accumulates into acc directly and the scale is applied once at the end.
//    Block size 16 is not served here (the host keeps such layers on the SM80 kernel).
//
// Determinism: every output element is one thread's fixed sequence of wgmma accumulations and folds,
// independent of the other tokens in its tile, so results are bitwise reproducible.
#include "fc_sm90.h"

#include <cuda.h>  // CUtensorMap and its encoder's signature; the encoder comes from the driver at run time
#include <cudaTypedefs.h>

#include "fc_common.cuh"

namespace qmoe::cuda {

namespace {

using namespace dev;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QMOE_SM90_DEVICE 1
#endif

// The layers without a scale block's partial sums in registers (row-wise scales, or DQ): they take three
// consumer warpgroups at N = 128 and 192, and width 192 serves only them, since its 96 accumulators per
// thread leave no room for the partial sums beside three consumers.
template <int KB, bool DQ> constexpr bool kWideServes = KB == 0 || DQ;
// Consumer warpgroups per block, 64 weight rows each: three at N = 128 and 192 where kWideServes, so a
// block's activation stage serves 192 weight rows instead of 128 and a third warpgroup's wgmma cover the
// other two's drains (H100, T = 2048, A/B in one call: mixtral int4 b128 3.95-3.98 -> 3.38-3.42 ms,
// int4 b32 4.03 -> 3.48-3.50 ms; docs/PERF-cuda.md, "Three consumer warpgroups"); two elsewhere. For
// 8-bit weights (then with 4 stages, kStages) three took mixtral int8 from 3,836 to 3,514 us and
// qwen3-30b-a3b from 768 to 693 at width 128, and width 192 then 3,500 -> 3,085 and 696 -> 612 (H100,
// T = 2048; docs/PERF-cuda.md, "Prefill at 258300c").
template <int N, int KB, bool DQ>
constexpr int kConsumersOf = (N == 128 || N == 192) && kWideServes<KB, DQ> ? 3 : 2;
// Tokens an item's wgmma cover: the kernel's width N, or 64 at N = 128 for an item of at most 64
// tokens. An expert's tokens fill items of N and leave one partial item (mixtral at T = 2048: ~512
// tokens per expert, items of 128 and one of 0-40). By a simulation of the benchmark's random routing,
// padding made 12% of the layer's tensor work at the kernel's width (gpt-oss-20b 23%, deepseek-v3-like
// with ~64 tokens per expert 100%), and 6% (12%, 46%) with the second width. More widths (96, 32, 16:
// 2%, 4%, 23%) each add a copy of the main loop, and with three or more ptxas serialized the wgmma of
// most N = 128 kernels (C7511). Producer and consumers copy and multiply only the item's width.
// H100, A/B in one call, T = 2048: mixtral int4 b32 3,460-3,513 -> 3,346-3,370 us, gpt-oss-20b int4
// b128 1,206-1,218 -> 1,163-1,178, deepseek-v3-like int4 b128 5,710 -> 5,259 (docs/PERF-cuda.md).
// Width 192 (sm90_wide_serves, sm90_wide_pays): items of at most 128 tokens run at 128.
template <int N> __device__ __forceinline__ int item_width(int cnt) {
  if constexpr (N == 128) return cnt > 64 ? 128 : 64;
  else if constexpr (N == 192) return cnt > 128 ? 192 : 128;
  else return N;
}
template <int C> constexpr int kThreadsOf = 128 * (C + 1);  // + the producer warpgroup
template <int C> constexpr int kTilesOf = 4 * C;            // 16-row tiles per block
constexpr int kStageK = 64;                       // k per pipeline stage (4 k-steps; one 128-byte swizzle row)
constexpr int kItemGroup = 8;                     // work items whose blocks run together (see the block order)
// N: tokens per block (wgmma's n, 8..128; the host picks it from the tokens per expert).
template <int N> constexpr int kXBytes = N * kStageK * 2;  // 16 KB at N = 128
template <int SB> constexpr int kSpansPerStage = SB == 4 ? 1 : 2;
template <int KB> constexpr int kScaleBlocksPerStage = KB == 2 ? 2 : 1;  // of the stage's 64 k (KB: the kernel's)
// A stage's scale area (block-wise scales): the scales of the (at most two) scale blocks the stage
// touches, [tile][block][16 rows] of up to 4 bytes (one tensor-copy box of the packed scales), then at
// kZeroOff their zero points, [tile][block][16] bytes. The producer copies them with the stage, so a
// consumer reads a block's scales from shared memory instead of waiting on global loads (measured on an
// H100, mixtral T = 2048: blocks of 32 k 8.49 -> 5.69 ms, where every 32 k of a consumer waited on two
// scale loads).
constexpr int kScaleArea = 2048;
template <int C> constexpr int kZeroOff = 2 * kTilesOf<C> * kTileRows * 4;  // 128-byte aligned (tensor copies)
static_assert(kZeroOff<3> + 2 * kTilesOf<3> * kTileRows <= kScaleArea && kZeroOff<2> % 128 == 0,
              "two blocks' scales and zero points fit");
template <int SB, int N, int C> constexpr int kScaleOff = kXBytes<N> + kTilesOf<C> * kSpanBytes * kSpansPerStage<SB>;
template <int SB, int N, int C> constexpr int kStageBytes = kScaleOff<SB, N, C> + kScaleArea;
// Blocks per SM: two at N <= 32, where the accumulators are small enough for the registers of two
// (setmaxnreg below), so twice the consumer warps hide the dequantizer's latency.
template <int N> constexpr int kBlocksPerSm = N <= kSm90TwoBlockMaxWidth ? 2 : 1;
// Shared memory a block may take: its share of the SM's 228 KB, less the 1 KB the driver reserves per block.
template <int N> constexpr int kSmemLimit = 228 * 1024 / kBlocksPerSm<N> - 1024;
// Stages in flight: as many as fit, at most 16 at one block per SM (N = 128, two consumers: 10 of 22 KB
// for 4-bit weights, 8 of 26 KB for 8-bit), except where fewer are set below. Those counts were first set,
// with a producer of cp.async copies, where compute-sanitizer racecheck stopped reporting hazards between
// the consumers' weight reads and the producer's refills (H100, 2026-11-27: 8 of 15 at two blocks per
// SM, 8 of 9 for three consumers, 4 of 7 at width 192 and for 8-bit weights with three consumers; the
// GPU tests passed with each; where measured, the fewer were as fast). Since the producer issues
// tensor copies alone, racecheck reports none with as many as fit anywhere (H100, 2026-11-28: the
// quick subset and --wide at every width), so those hazards came with the cp.async copies. As many
// as fit then did not pay for 4-bit weights nor at N = 192 (mixtral and gpt-oss-20b at T = 2048: -1%
// to +2%) but did for 8-bit weights at N = 128 with three consumers, which take 7 of 30 KB
// (gpt-oss-20b int8 T = 2048 1,012-1,014 -> 970 us in two alternating runs; docs/PERF-cuda.md,
// "Every copy a tensor copy").
constexpr int kWideStages = 4;
template <int SB, int N, int C>
constexpr int kStages =
    C == 3 ? (N == 192 ? kWideStages : SB == 8 ? 7 : 8)
           : std::min(kBlocksPerSm<N> == 1 ? 16 : 8, (kSmemLimit<N> - 1024 - N * 8) / (kStageBytes<SB, N, C> + 16));
// [stages][full barriers][empty barriers][N slots (fc2); 2 N ints reserved, as when fc1 kept its rows'
// offsets there, with which the stage counts above were checked]; + 1 KB to align the base to
// a swizzle atom.
template <int SB, int N, int C> constexpr int smem_bytes() {
  return kStages<SB, N, C> * (kStageBytes<SB, N, C> + 16) + N * 8 + 1024;
}
static_assert(kStageBytes<4, 8, 2> % 1024 == 0 && kStageBytes<8, 8, 2> % 1024 == 0 &&
                  kStageBytes<4, 128, 3> % 1024 == 0 && kStageBytes<4, 192, 3> % 1024 == 0 &&
                  kStageBytes<8, 128, 3> % 1024 == 0 && kStageBytes<8, 192, 3> % 1024 == 0,
              "stages stay 1 KB aligned (swizzle atoms)");
static_assert(kStages<4, 128, 2> == 10 && kStages<8, 128, 2> == 8 && smem_bytes<4, 128, 3>() <= kSmemLimit<128> &&
                  smem_bytes<8, 128, 2>() <= kSmemLimit<128> && smem_bytes<8, 128, 3>() <= kSmemLimit<128> &&
                  smem_bytes<4, 192, 3>() <= kSmemLimit<192> &&
                  smem_bytes<8, 192, 3>() <= kSmemLimit<192> &&
                  smem_bytes<8, 32, 2>() <= kSmemLimit<32> && kStages<8, 32, 2> >= 4,
              "the blocks of an SM fit");

#ifdef QMOE_SM90_DEVICE
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of wgmma's accumulator registers across the asynchronous
// instructions (they are written behind its back until wg_wait).
// U: the first U registers (those of an item narrower than the kernel, see item_width), 0: all.
template <int U = 0, int R> __device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < (U ? U : R); ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// mbarriers (PTX ISA "mbarrier"): a stage's full barrier completes once its tensor copies have landed
// (below); every consumer thread arrives on the stage's empty barrier once its warpgroup's wgmma on it
// are drained.
__device__ __forceinline__ void mbar_init(uint32_t b, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(b), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_wait(uint32_t b, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT;\n}\n" ::"r"(b), "r"(parity) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(b) : "memory");
}
// Tensor copies (the TMA unit, PTX ISA "cp.async.bulk.tensor"): the producer thread arrives on a
// stage's full barrier announcing the stage's bytes (expect_tx) and issues the copies; each counts its
// bytes down as it lands, and the phase completes once all have.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b), "r"(bytes) : "memory");
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap& map, int c0, int c1, int c2, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::
          "r"(dst), "l"(reinterpret_cast<uint64_t>(&map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap& map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(dst), "l"(reinterpret_cast<uint64_t>(&map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
// Weights with an evict-first L2 policy: each is read by the few blocks of one row block's items.
__device__ __forceinline__ void tma_load_3d_evict_first(uint32_t dst, const CUtensorMap& map, int c0, int c1, int c2,
                                                        uint32_t bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3, %4}], [%5], %6;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar), "l"(policy)
      : "memory");
}
__device__ __forceinline__ uint64_t l2_evict_first_policy() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
  return p;
}
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap& map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map)) : "memory");
}
// Per-warpgroup register budgets (PTX ISA "setmaxnreg"; every warp of the warpgroup executes it).
// A block's warpgroups only trade among the registers it was launched with (kLaunchRegs per thread:
// 168 at one block per SM, 80 at two): asking for more makes setmaxnreg.inc wait forever (measured:
// a hang).
template <int C, int BPS> constexpr int kLaunchRegs = 65536 / (kThreadsOf<C> * BPS) / 8 * 8;  // allocated in 8s
// WIDE: 8-bit weights in blocks of 32, whose fc1 consumers spilled a little with the second
// partial-sum set of the block-32 loop at 224 registers. Elsewhere the producer keeps 56: at 40 its
// N = 128 copies were slower (H100, mixtral int4 b32 T = 2048: 4.78 ms at 56/224, 4.96-5.02 at 40/232),
// measured when 128 producer threads issued cp.async copies; the one-thread tensor-copy producer has
// not been measured at 40.
// Three consumers (no partial sums) hold 64 accumulators and two stages' A fragments in 152.
template <int BPS, bool WIDE> constexpr int kProducerRegs = BPS == 2 || WIDE ? 40 : 56;
template <int C, int BPS, bool WIDE> constexpr int kConsumerRegs = C == 3 ? 152 : BPS == 2 ? 96 : WIDE ? 232 : 224;
template <int C, int BPS, bool WIDE> constexpr bool kRegsFit =
    kProducerRegs<BPS, WIDE> + C * kConsumerRegs<C, BPS, WIDE> <= (C + 1) * kLaunchRegs<C, BPS>;
static_assert(kRegsFit<2, 1, false> && kRegsFit<2, 1, true> && kRegsFit<2, 2, false> && kRegsFit<3, 1, false>,
              "the warpgroups' budgets fit the block's registers");
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address >> 4,
// leading byte offset (unused for swizzled K-major operands: 1), stride byte offset 1024 >> 4 (8 rows
// of 128 bytes), layout type 1 = 128-byte swizzle.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t saddr) {
  return uint64_t((saddr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// D[64 x N] (+)= A[64 x 16] (registers) * B[16 x N] (shared memory, K-major), N = 8 .. 128 tokens;
// TYPES names the input types ("f16.f16" or "bf16.bf16"). A thread holds N / 2 accumulators.
#define QMOE_WGMMA_N8(TYPES)                                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"                                \
               "wgmma.mma_async.sync.aligned.m64n8k16.f32." TYPES " {"                    \
               "%0, %1, %2, %3"                                                           \
               "}, {%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}\n"                                \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))
#define QMOE_WGMMA_N16(TYPES)                                                                                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"                                                      \
               "wgmma.mma_async.sync.aligned.m64n16k16.f32." TYPES " {"                                          \
               "%0, %1, %2, %3, %4, %5, %6, %7"                                                                  \
               "}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"                                                    \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))
#define QMOE_WGMMA_N32(TYPES)                                                                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"                                                            \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPES " {"                                                \
               "%0, %1, %2, %3, %4, %5, %6, %7, "                                                                      \
               "%8, %9, %10, %11, %12, %13, %14, %15"                                                                  \
               "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"                                                        \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),       \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))
#define QMOE_WGMMA_N64(TYPES)                                                                                             \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                               \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPES " {"                                                   \
               "%0, %1, %2, %3, %4, %5, %6, %7, "                                                                         \
               "%8, %9, %10, %11, %12, %13, %14, %15, "                                                                   \
               "%16, %17, %18, %19, %20, %21, %22, %23, "                                                                 \
               "%24, %25, %26, %27, %28, %29, %30, %31"                                                                   \
               "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                                           \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),          \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),    \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))
#define QMOE_WGMMA_N128(TYPES)                                                                                            \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                               \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPES " {"                                                  \
               "%0, %1, %2, %3, %4, %5, %6, %7, "                                                                         \
               "%8, %9, %10, %11, %12, %13, %14, %15, "                                                                   \
               "%16, %17, %18, %19, %20, %21, %22, %23, "                                                                 \
               "%24, %25, %26, %27, %28, %29, %30, %31, "                                                                 \
               "%32, %33, %34, %35, %36, %37, %38, %39, "                                                                 \
               "%40, %41, %42, %43, %44, %45, %46, %47, "                                                                 \
               "%48, %49, %50, %51, %52, %53, %54, %55, "                                                                 \
               "%56, %57, %58, %59, %60, %61, %62, %63"                                                                   \
               "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                                           \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),          \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),    \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),  \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),  \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))
#define QMOE_WGMMA_N192(TYPES) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %101, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n192k16.f32." TYPES " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, " \
               "%8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, " \
               "%24, %25, %26, %27, %28, %29, %30, %31, " \
               "%32, %33, %34, %35, %36, %37, %38, %39, " \
               "%40, %41, %42, %43, %44, %45, %46, %47, " \
               "%48, %49, %50, %51, %52, %53, %54, %55, " \
               "%56, %57, %58, %59, %60, %61, %62, %63, " \
               "%64, %65, %66, %67, %68, %69, %70, %71, " \
               "%72, %73, %74, %75, %76, %77, %78, %79, " \
               "%80, %81, %82, %83, %84, %85, %86, %87, " \
               "%88, %89, %90, %91, %92, %93, %94, %95" \
               "}, {%96, %97, %98, %99}, %100, p, 1, 1, 0;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
                 "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
                 "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
                 "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
                 "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate))
// d may be longer than N / 2 (an item narrower than the kernel): its first N / 2 registers are D.
template <class CT, int N, int R>
__device__ __forceinline__ void wgmma(float (&d)[R], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
  static_assert(R >= N / 2, "the accumulators hold D");
#define QMOE_WGMMA_CASE(NN)                                         \
  if constexpr (N == NN) {                                          \
    if constexpr (std::is_same_v<CT, __half>) QMOE_WGMMA_N##NN("f16.f16"); \
    else QMOE_WGMMA_N##NN("bf16.bf16");                             \
  }
  QMOE_WGMMA_CASE(8)
  QMOE_WGMMA_CASE(16)
  QMOE_WGMMA_CASE(32)
  QMOE_WGMMA_CASE(64)
  QMOE_WGMMA_CASE(128)
  QMOE_WGMMA_CASE(192)
#undef QMOE_WGMMA_CASE
}
#undef QMOE_WGMMA_N8
#undef QMOE_WGMMA_N16
#undef QMOE_WGMMA_N32
#undef QMOE_WGMMA_N64
#undef QMOE_WGMMA_N128
#undef QMOE_WGMMA_N192
#endif

// KB: k-steps per wgmma batch between scale folds: 0 = row-wise (no folds), 2 (block 32), 4 (>= 64).
// DQ (bf16 with bf16 block-wise scales only): no folds either; the dequantizer multiplies each weight
// by its scale, so the tensor cores take s * (q - z) rounded once to bf16 (see the header comment).
template <class CT, int SB, bool FC1, int KB, int N, bool DQ = false>
__global__ void __launch_bounds__(kThreadsOf<kConsumersOf<N, KB, DQ>>, kBlocksPerSm<N>)
    fc_sm90_kernel(const FcArgs a, const __grid_constant__ CUtensorMap w_map, const __grid_constant__ CUtensorMap x_map,
                   const __grid_constant__ CUtensorMap s_map, const __grid_constant__ CUtensorMap z_map) {
#ifdef QMOE_SM90_DEVICE
  constexpr int kConsumers = kConsumersOf<N, KB, DQ>;
  constexpr int kThreads = kThreadsOf<kConsumers>, kTiles = kTilesOf<kConsumers>;
  static_assert(smem_bytes<SB, N, kConsumers>() <= kSmemLimit<N>, "the block's stages fit");
  // Block order: groups of kItemGroup work items (1024 token rows) sweep all row blocks before the
  // next group starts, so the blocks in flight share their activations (8 MB at K = 4096) and their
  // weights in L2. Item-fastest order over all items re-read the activations from DRAM for every
  // row block once they outgrew L2 (mixtral T = 8192: 128 MB of gathered rows).
  const int64_t mb_count = (a.geom.MT + kTiles - 1) / kTiles;
  const int64_t per_group = int64_t(kItemGroup) * mb_count;
  const int64_t bid = blockIdx.x, grp = bid / per_group, in_grp = bid % per_group;
  const int item = int(grp * kItemGroup + in_grp % kItemGroup);
  const int64_t mblock = in_grp / kItemGroup;
  if (item >= *a.n_items) return;  // whole block
  constexpr int SPANS = kSpansPerStage<SB>;
  constexpr int KSTEPS = SB == 4 ? 4 : 2;  // k-steps per span
  constexpr int S = kStages<SB, N, kConsumers>;
  constexpr int kStB = kStageBytes<SB, N, kConsumers>;
  constexpr int kScaleOffN = kScaleOff<SB, N, kConsumers>;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const MatrixGeom& G = a.geom;
  const int4 it = a.items[item];
  const int e = it.x, p0 = it.y, cnt = it.z;
  const int nk = int((G.S + SPANS - 1) / SPANS);  // pipeline stages along K

  extern __shared__ uint8_t sm90_smem[];
  const uint32_t sbase = (static_cast<uint32_t>(__cvta_generic_to_shared(sm90_smem)) + 1023u) & ~1023u;
  // After the stages: the full and empty barrier of each stage, then (fc2) the token rows' slots, the
  // rows of y its epilogue writes (read here, where the latency overlaps the pipeline's fill, instead
  // of in the epilogue, where each store waited on its load).
  const uint32_t full0 = sbase + S * kStB, empty0 = full0 + 8 * S;
  int* y_slot = reinterpret_cast<int*>(sm90_smem + (empty0 + 8 * S - static_cast<uint32_t>(
                                                        __cvta_generic_to_shared(sm90_smem))));
  if constexpr (!FC1)
    for (int n = tid; n < N; n += kThreads) y_slot[n] = n < cnt ? a.sorted_slot[p0 + n] : -1;
  if (tid == 0) {
    for (int i = 0; i < S; ++i) mbar_init(full0 + 8 * i, 1), mbar_init(empty0 + 8 * i, 128 * kConsumers);
    fence_mbar_init();
  }
  __syncthreads();

  if (warp >= 4 * kConsumers) {
    // The producer warpgroup gives registers to the consumers (setmaxnreg) and one thread of it copies:
    // stage ks into slot ks % S once the consumers released the slot's previous stage, as tensor
    // copies (the TMA unit) that count their bytes down on the stage's full barrier, where that
    // thread's arrival announced them (arrive.expect_tx):
    //  * the block's weights, [tile][span][512 bytes]: one box of the stage's spans of its kTiles tiles
    //    (tiles past the expert's are never stored; spans past K are zero-filled and meet x = 0 there);
    //  * the activations, rows p0.. of x gathered into expert order (fc1; launch_convert_input with
    //    gather) or of a (fc2), in boxes of up to 64 rows of 128 bytes, 128-byte swizzled as wgmma
    //    reads them (rows past the item's count are never stored);
    //  * block-wise scales and zero points: the stage's scale blocks of each tile, [tile][block][16]
    //    (KB = 2: blocks 2 ks and 2 ks + 1; KB = 4: the stage's block pb), one box each.
    // Small copies are slow: one 512-byte bulk copy per weight span, or one 128-byte copy per token row,
    // made the kernel 1.2-1.7x slower (docs/PERF-cuda.md, "Tensor copies (TMA) in the wgmma producer").
    setmaxnreg_dec<kProducerRegs<kBlocksPerSm<N>, SB == 8 && KB == 2 && !DQ>>();
    if (tid != 128 * kConsumers) return;
    constexpr int kXBox = N < 64 ? N : 64;  // rows per activation box
    const int width = item_width<N>(cnt);
    const int es = a.scale_elt == Elt::f32 ? 4 : 2;
    const uint32_t scale_tx =
        KB == 0 ? 0u : uint32_t(kTiles * kScaleBlocksPerStage<KB> * kTileRows * (es + (a.z ? 1 : 0)));
    const uint32_t stage_tx = uint32_t(kTiles * SPANS * kSpanBytes + width * 128) + scale_tx;
    const int tile0 = int(int64_t(e) * G.MT + mblock * kTiles);
    const uint64_t w_policy = l2_evict_first_policy();
    prefetch_tensormap(w_map);
    prefetch_tensormap(x_map);
    if constexpr (KB != 0) prefetch_tensormap(s_map);
    int pb = 0, pk = 0;          // KB = 4: the stage's scale block, and the stage's place in it
    const int spb = G.kpb / 4;   // KB = 4: stages per scale block
#pragma unroll 1
    for (int ks = 0; ks < nk; ++ks) {
      const int slot = ks % S;
      if (ks >= S) mbar_wait(empty0 + 8 * slot, ((ks / S) - 1) & 1);
      const uint32_t st = sbase + uint32_t(slot) * kStB, full = full0 + 8 * slot;
      mbar_arrive_expect_tx(full, stage_tx);
      tma_load_3d_evict_first(st + kXBytes<N>, w_map, 0, ks * SPANS, tile0, full, w_policy);
      for (int b = 0; b < width / kXBox; ++b) tma_load_2d(st + b * kXBox * 128, x_map, ks * kStageK, p0 + b * kXBox, full);
      if constexpr (KB != 0) {
        const int blk = KB == 2 ? 2 * ks : pb;
        tma_load_3d(st + kScaleOffN, s_map, 0, blk, tile0, full);
        if (a.z) tma_load_3d(st + kScaleOffN + kZeroOff<kConsumers>, z_map, 0, blk, tile0, full);
        if (KB == 4 && ++pk == spb) pk = 0, ++pb;
      }
    }
    // Exit once the last stages' copies have landed (no later phase follows on their barriers).
    for (int ks = nk > S ? nk - S : 0; ks < nk; ++ks) mbar_wait(full0 + 8 * (ks % S), (ks / S) & 1);
    return;
  }

  // Consumers: warpgroup wg owns tiles 4 wg .. 4 wg + 3 (warp q of it: tile 4 wg + q).
  setmaxnreg_inc<kConsumerRegs<kConsumers, kBlocksPerSm<N>, SB == 8 && KB == 2 && !DQ>>();
  const int wg = warp >> 2, q = warp & 3;
  const int g = lane >> 2, t = lane & 3;
  const int64_t mt = mblock * kTiles + 4 * wg + q;
  const bool live = mt < G.MT;  // a tile past the end computes on the last one's data, never stored
  const int64_t mtc = live ? mt : G.MT - 1;
  const uint32_t wdst = kXBytes<N> + uint32_t((4 * wg + q) * SPANS * kSpanBytes + lane * 16);

  // Row-wise scales (KB = 0) come from global memory once. Block-wise ones come from the stage's
  // scale area (see kScaleArea), block h of the stage at shared address `stage`: zero points when a
  // block starts (only where the layer has them; the dequantizer needs them first), scales at the
  // fold (off the dequantizer's path).
  ZeroRep<CT, SB> zr;
  float rs0 = 1.f, rs1 = 1.f;  // row-wise scales
  if constexpr (KB == 0) {
    const int64_t i = (int64_t(e) * G.MT + mtc) * kTileRows + g;
    rs0 = load_elt(a.s, i, a.scale_elt), rs1 = load_elt(a.s, i + 8, a.scale_elt);
    zr.set(a.z ? a.z[i] : a.zdefault, a.z ? a.z[i + 8] : a.zdefault);
  } else {
    zr.set(a.zdefault, a.zdefault);
  }
  // This thread's first row of scale block h in a stage's scale or zero-point area, [tile][block][16].
  auto srow_h = [&](int h) { return ((4 * wg + q) * kScaleBlocksPerStage<KB> + h) * kTileRows + g; };
  const uint32_t smem_sa = static_cast<uint32_t>(__cvta_generic_to_shared(sm90_smem));
  auto area = [&](uint32_t stage) { return sm90_smem + (stage - smem_sa) + kScaleOffN; };
  auto stage_zeros = [&](uint32_t stage, int h) {
    if (!a.z) return;
    const uint8_t* zp = area(stage) + kZeroOff<kConsumers> + srow_h(h);
    zr.set(zp[0], zp[8]);
  };
  auto stage_scale = [&](uint32_t stage, int h, int r) {
    const uint8_t* sc = area(stage);
    if (a.scale_elt == Elt::f32) return reinterpret_cast<const float*>(sc)[srow_h(h) + r];
    const uint16_t v = reinterpret_cast<const uint16_t*>(sc)[srow_h(h) + r];
    return a.scale_elt == Elt::f16 ? __half2float(__ushort_as_half(v)) : __bfloat162float(__ushort_as_bfloat16(v));
  };
  int kc = 0;  // k-steps of the current scale block done (KB = 4)
  // DQ: scale block h of a stage as bf16 pairs (scale_pair) of rows g and g + 8.
  auto scale_pairs = [&](uint32_t stage, int h, uint32_t& s0, uint32_t& s1) {
    const uint16_t* sc = reinterpret_cast<const uint16_t*>(area(stage)) + srow_h(h);
    s0 = scale_pair(sc), s1 = scale_pair(sc + 8);
  };

  constexpr int R = N / 2;  // accumulators per thread
  float acc[R], part[R];
  float part2[KB == 2 ? R : 1];  // block 32: the stage's second block (see the loop)
#pragma unroll
  for (int i = 0; i < R; ++i) acc[i] = 0.f;
  // acc += the block's scales * p (their first U registers), once the wgmma groups but the newest
  // `PENDING` have completed.
  auto fold_into = [&]<int PENDING, int U, int RP>(float(&p)[RP], uint32_t stage, int h) {
    const float s0 = stage_scale(stage, h, 0), s1 = stage_scale(stage, h, 8);
    wg_wait<PENDING>();
    fence_regs<U>(p);
    fence_regs<U>(acc);
#pragma unroll
    for (int i = 0; i < U; ++i) acc[i] = fmaf((i & 2) ? s1 : s0, p[i], acc[i]);
  };

  // The main loop at the item's width W (item_width): wgmma m64nWk16 on the first W / 2 = U
  // accumulators.
  auto main_loop = [&]<int W>() {
    constexpr int U = W / 2;
    // Each iteration multiplies one stage, or two when no scale block ends between them (row-wise
    // scales, or blocks of a multiple of 128 k): the warpgroup drains its wgmma before the dequantizer
    // writes A registers again (defining wgmma input registers while a wgmma is in flight makes ptxas
    // serialize every wgmma: C7513); the other warpgroups' wgmma run meanwhile. A drained stage's slot
    // is released to the producer.
    constexpr int kPairMax = N == 192 ? 1 : 2;  // width 192: one stage per drain (registers)
    const bool pair = kPairMax == 2 && (KB == 0 || DQ || (KB == 4 && (G.kpb / 4) % 2 == 0));
    int prev = -1, prev_n = 0;  // the last iteration's first stage and stage count
#pragma unroll 1
    for (int ks = 0; ks < nk;) {
      const int step = (pair && ks + 1 < nk) ? 2 : 1;
      wg_wait<0>();
      // Every consumer thread arrives (its own shared-memory reads of the stage precede its arrive), so
      // the producer's refill is ordered after all of them.
      for (int u = 0; u < prev_n; ++u) mbar_arrive(empty0 + 8 * ((prev + u) % S));
      for (int u = 0; u < step; ++u) mbar_wait(full0 + 8 * ((ks + u) % S), ((ks + u) / S) & 1);
      uint32_t af[4 * kPairMax][4];
      uint32_t st[2];
#pragma unroll
      for (int u = 0; u < 2; ++u) st[u] = sbase + uint32_t((ks + u) % S) * kStB;
      if constexpr (KB == 2 && !DQ) {
        // Block 32, two blocks per stage: both blocks' A first, then both blocks' wgmma as two commit
        // groups into part and part2; block 0 is folded while block 1's wgmma still run (H100, T = 2048,
        // --gemm sm90: mixtral int4 b32 5.00-5.05 -> 4.78-4.81 ms, gpt-oss-20b 1.77-1.78 -> 1.70-1.73 ms).
        uint4 v[SPANS];
#pragma unroll
        for (int h = 0; h < SPANS; ++h) v[h] = lds128(st[0] + wdst + h * kSpanBytes);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j % 2 == 0) stage_zeros(st[0], j / 2);
          dequant<CT, SB>(v[j / KSTEPS], j % KSTEPS, zr, af[j]);
        }
        wg_fence();
        fence_regs<U>(part);
        fence_regs<U>(part2);
        wgmma<CT, W>(part, af[0], desc_sw128(st[0]), 0);
        wgmma<CT, W>(part, af[1], desc_sw128(st[0] + 32), 1);
        wg_commit();
        wgmma<CT, W>(part2, af[2], desc_sw128(st[0] + 64), 0);
        wgmma<CT, W>(part2, af[3], desc_sw128(st[0] + 96), 1);
        wg_commit();
        fence_regs<U>(part);
        fence_regs<U>(part2);
        fold_into.template operator()<1, U>(part, st[0], 0);
        fold_into.template operator()<0, U>(part2, st[0], 1);
      } else {
        if constexpr (KB == 4 && !DQ) {
          if (kc == 0) stage_zeros(st[0], 0);  // a scale block starts
        }
#pragma unroll
        for (int u = 0; u < kPairMax; ++u) {
          if (u == 1 && step == 1) break;
          uint4 v[SPANS];
#pragma unroll
          for (int h = 0; h < SPANS; ++h) v[h] = lds128(st[u] + wdst + h * kSpanBytes);
          [[maybe_unused]] uint32_t s0 = 0, s1 = 0;  // DQ: the scale block's scale pairs
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if constexpr (DQ) {
              if (j == 0 || (KB == 2 && j == 2)) {  // the stage's scale block h starts
                const int h = KB == 2 ? j / 2 : 0;
                stage_zeros(st[u], h);
                scale_pairs(st[u], h, s0, s1);
              }
            }
            uint32_t(&f)[4] = af[4 * u + j];
            dequant<CT, SB>(v[j / KSTEPS], j % KSTEPS, zr, f);
            if constexpr (DQ) scale_fragment<CT>(f, s0, s1);
          }
        }
        wg_fence();
        // Row-wise scales and DQ accumulate into acc, blocks of >= 64 k into part.
        float(&d)[R] = KB == 0 || DQ ? acc : part;
        fence_regs<U>(d);
#pragma unroll
        for (int u = 0; u < kPairMax; ++u) {
          if (u == 1 && step == 1) break;
#pragma unroll
          for (int j = 0; j < 4; ++j)
            wgmma<CT, W>(d, af[4 * u + j], desc_sw128(st[u] + 32 * j),
                         (KB == 0 || DQ ? ks > 0 : kc > 0) || u > 0 || j > 0);
          wg_commit();
        }
        fence_regs<U>(d);
        // Two stages: one commit group each; once the first group is done its stage goes back to the
        // producer while the second's wgmma still run.
        if (step == 2) {
          wg_wait<1>();
          mbar_arrive(empty0 + 8 * (ks % S));
        }
        if constexpr (KB == 4 && !DQ) {
          kc += 4 * step;
          // Scales from the iteration's last stage: with two, the first may be released already.
          if (kc == G.kpb || ks + step == nk)
            fold_into.template operator()<0, U>(part, step == 2 ? st[1] : st[0], 0), kc = 0;
        }
      }
      // Where this iteration ended in a fold, its wgmma are drained already: release its stages now
      // rather than at the next iteration's top, so the producer refills them sooner (measured on an
      // H100 at T = 2048: mixtral int4 b128 4.39 -> 4.13 ms, b32 5.01 -> 4.81 ms).
      // Either way one stage is left to release: the iteration's last.
      const int last = ks + step - 1;
      if (!DQ && (KB == 2 || (KB == 4 && kc == 0))) {
        mbar_arrive(empty0 + 8 * (last % S));
        prev_n = 0;
      } else {
        prev = last, prev_n = 1;
      }
      ks += step;
    }
  };
  if constexpr (N == 128 || N == 192) {
    constexpr int kNarrow = N == 128 ? 64 : 128;
    if (item_width<N>(cnt) == kNarrow) main_loop.template operator()<kNarrow>();
    else main_loop.template operator()<N>();
  } else {
    main_loop.template operator()<N>();
  }
  wg_wait<0>();
  fence_regs(acc);
  if constexpr (KB == 0) {
#pragma unroll
    for (int i = 0; i < R; ++i) acc[i] *= (i & 2) ? rs1 : rs0;
  }
  if (!live) return;

  // Epilogue. acc[4 j + q]: token 8 j + 2 t + (q & 1), tile row g + 8 (q >> 1). A thread's rows are
  // fixed, so their bias, bounds and output columns are read once, and each row map and activation has
  // its own unrolled token loop: with the map and the activation switched inside one loop, each of its
  // 2 N / 8 unrolled steps carried every path's code, and fetching that code stalled the consumers
  // while the tensor cores idled (Nsight Compute source counters, qwen3-30b-a3b fc1 at T = 2048: 30%
  // of the kernel's warp samples in the epilogue, mostly "no instruction"; docs/PERF-cuda.md).
  auto each_token = [&](auto&& f) {  // f(acc index of the token's row g, token)
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c)
        if (8 * j + 2 * t + c < cnt) f(4 * j + c, 8 * j + 2 * t + c);
  };
  if constexpr (FC1) {
    CT* const a0 = static_cast<CT*>(a.a) + int64_t(p0) * a.a_ld;
    auto out_col = [](int64_t col) { return (col & ~int64_t(15)) + mma_col_of(int(col & 15)); };
    if (G.map == RowMap::swiglu) {  // row g is gate row i, row g + 8 its linear row
      const int64_t i = 8 * mt + g;
      const bool in = i < a.I;
      const float bg = in && a.bias_g ? a.bias_g[int64_t(e) * a.a_ld + i] : 0.f;
      const float bl = in && a.bias_l ? a.bias_l[int64_t(e) * a.a_ld + i] : 0.f;
      CT* const out = a0 + out_col(i);
      each_token([&](int q, int idx) {
        const float v = in ? swiglu_dev(acc[q] + bg, acc[q + 2] + bl, a.limit, a.alpha, a.beta) : 0.f;
        out[int64_t(idx) * a.a_ld] = CtTraits<CT>::from_float(v);
      });
    } else {
      const int64_t n0 = 16 * mt + g, n1 = n0 + 8;
      const bool in0 = n0 < a.I, in1 = n1 < a.I;
      const float b0 = in0 && a.bias_g ? a.bias_g[int64_t(e) * a.a_ld + n0] : 0.f;
      const float b1 = in1 && a.bias_g ? a.bias_g[int64_t(e) * a.a_ld + n1] : 0.f;
      CT* const out0 = a0 + out_col(n0);
      const int d1 = int(out_col(n1) - out_col(n0));  // row g + 8's column, from row g's
      auto store = [&]<int ACT>() {
        each_token([&](int q, int idx) {
          CT* const o = out0 + int64_t(idx) * a.a_ld;
          o[0] = CtTraits<CT>::from_float(in0 ? act_dev(ACT, acc[q] + b0) : 0.f);
          o[d1] = CtTraits<CT>::from_float(in1 ? act_dev(ACT, acc[q + 2] + b1) : 0.f);
        });
      };
      switch (a.act) {  // act_dev's codes
        case 0: store.template operator()<0>(); break;
        case 1: store.template operator()<1>(); break;
        case 2: store.template operator()<2>(); break;
        default: store.template operator()<3>(); break;  // act_dev: identity
      }
    }
  } else {
    const int64_t n0 = 16 * mt + g, n1 = n0 + 8;
    const bool in0 = n0 < a.H, in1 = n1 < a.H;
    each_token([&](int q, int idx) {
      float* yrow = a.y + int64_t(y_slot[idx]) * a.H;
      if (in0) yrow[n0] = acc[q];
      if (in1) yrow[n1] = acc[q + 2];
    });
  }
#endif
}

template <class CT, int SB, bool FC1, int KB, int N, bool DQ = false>
cudaError_t set_attr() {
  if constexpr (N == 192 && !kWideServes<KB, DQ>) return cudaSuccess;  // never launched (sm90_wide_serves)
  else
    return cudaFuncSetAttribute(fc_sm90_kernel<CT, SB, FC1, KB, N, DQ>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                smem_bytes<SB, N, kConsumersOf<N, KB, DQ>>());
}
// The driver's tensor-map encoder, looked up once (the runtime does not wrap it); null if absent.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}
// A tensor map over `dims` (innermost first) of `type` at `base` (strides in bytes of dims 1..), boxes
// of `box`; false if the encoder refuses it.
template <int R>
bool encode_map(CUtensorMap& m, CUtensorMapDataType type, const void* base, const uint64_t (&dims)[R],
                const uint64_t (&strides)[R - 1], const uint32_t (&box)[R], CUtensorMapSwizzle swizzle) {
  const PFN_cuTensorMapEncodeTiled_v12000 enc = tensor_map_encoder();
  uint32_t ones[R];
  for (int i = 0; i < R; ++i) ones[i] = 1;
  return enc && enc(&m, type, R, const_cast<void*>(base), dims, strides, box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}
// One block per (work item, block of the kernel's rows), in groups of kItemGroup items (see the kernel).
template <class CT, int SB, bool FC1, int KB, int N, bool DQ = false>
cudaError_t launch_kernel(const FcArgs& a, cudaStream_t st) {
  if constexpr (N == 192 && !kWideServes<KB, DQ>) {
    return cudaErrorInvalidValue;  // the host gives width 192 only to the layers it serves (sm90_wide_serves)
  } else {
    constexpr int C = kConsumersOf<N, KB, DQ>;
    const MatrixGeom& g = a.geom;
    // The producer's boxes (see the kernel): weights [experts x MT tiles][S spans][128 words];
    // activations [slots][x_ld]; scales and zero points [experts x MT tiles][NBP blocks][16 rows].
    const uint64_t tiles = uint64_t(a.experts * g.MT);
    constexpr uint32_t kBlocks = kScaleBlocksPerStage<KB>;
    CUtensorMap w_map{}, x_map{}, s_map{}, z_map{};
    bool ok = encode_map<3>(w_map, CU_TENSOR_MAP_DATA_TYPE_UINT32, a.w, {kSpanBytes / 4, uint64_t(g.S), tiles},
                            {kSpanBytes, uint64_t(g.S) * kSpanBytes},
                            {kSpanBytes / 4, uint32_t(kSpansPerStage<SB>), uint32_t(kTilesOf<C>)},
                            CU_TENSOR_MAP_SWIZZLE_NONE);
    ok = ok && encode_map<2>(x_map, std::is_same_v<CT, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                               : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                             a.x, {uint64_t(a.x_ld), uint64_t(a.slots)}, {uint64_t(a.x_ld) * 2},
                             {uint32_t(kStageK), uint32_t(N < 64 ? N : 64)}, CU_TENSOR_MAP_SWIZZLE_128B);
    if (KB != 0) {
      const uint64_t es = a.scale_elt == Elt::f32 ? 4 : 2, nbp = uint64_t(g.NBP);
      ok = ok && encode_map<3>(s_map, es == 4 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32 : CU_TENSOR_MAP_DATA_TYPE_UINT16, a.s,
                               {kTileRows, nbp, tiles}, {kTileRows * es, nbp * kTileRows * es},
                               {kTileRows, kBlocks, uint32_t(kTilesOf<C>)}, CU_TENSOR_MAP_SWIZZLE_NONE);
      if (a.z)
        ok = ok && encode_map<3>(z_map, CU_TENSOR_MAP_DATA_TYPE_UINT8, a.z, {kTileRows, nbp, tiles},
                                 {kTileRows, nbp * kTileRows}, {kTileRows, kBlocks, uint32_t(kTilesOf<C>)},
                                 CU_TENSOR_MAP_SWIZZLE_NONE);
    }
    if (!ok) return cudaErrorInvalidValue;
    const int64_t groups = (a.max_items + kItemGroup - 1) / kItemGroup;
    const dim3 grid(unsigned(groups * kItemGroup * ((g.MT + kTilesOf<C> - 1) / kTilesOf<C>)));
    fc_sm90_kernel<CT, SB, FC1, KB, N, DQ><<<grid, kThreadsOf<C>, smem_bytes<SB, N, C>(), st>>>(a, w_map, x_map, s_map,
                                                                                           z_map);
    return cudaGetLastError();
  }
}
// Calls f.template operator()<N>() for the kernel widths N.
template <class F> cudaError_t for_each_n(F&& f) {
  cudaError_t e = cudaSuccess;
  for (cudaError_t r : {f.template operator()<8>(), f.template operator()<16>(), f.template operator()<32>(),
                        f.template operator()<64>(), f.template operator()<128>(), f.template operator()<192>()})
    if (e == cudaSuccess) e = r;
  return e;
}
template <class CT, int SB, bool FC1>
cudaError_t set_attrs_kb() {
  return for_each_n([&]<int N>() {
    cudaError_t e = set_attr<CT, SB, FC1, 0, N>();
    if (e == cudaSuccess) e = set_attr<CT, SB, FC1, 2, N>();
    if (e == cudaSuccess) e = set_attr<CT, SB, FC1, 4, N>();
    if constexpr (std::is_same_v<CT, __nv_bfloat16>) {
      if (e == cudaSuccess) e = set_attr<CT, SB, FC1, 2, N, true>();
      if (e == cudaSuccess) e = set_attr<CT, SB, FC1, 4, N, true>();
    }
    return e;
  });
}

int kb_of(const MatrixGeom& g) { return g.NBP == 1 ? 0 : g.kpb % 4 == 0 ? 4 : 2; }

template <bool FC1, class CT, int SB, int N>
cudaError_t launch_n(const FcArgs& a, cudaStream_t st) {
  if constexpr (std::is_same_v<CT, __nv_bfloat16>) {
    if (fc_uses_dq(a))
      return kb_of(a.geom) == 2 ? launch_kernel<CT, SB, FC1, 2, N, true>(a, st)
                                : launch_kernel<CT, SB, FC1, 4, N, true>(a, st);
  }
  switch (kb_of(a.geom)) {
    case 0: return launch_kernel<CT, SB, FC1, 0, N>(a, st);
    case 2: return launch_kernel<CT, SB, FC1, 2, N>(a, st);
    default: return launch_kernel<CT, SB, FC1, 4, N>(a, st);
  }
}

template <bool FC1, class CT, int SB>
cudaError_t launch_sb(const FcArgs& a, cudaStream_t st) {
  switch (8 * a.nt) {  // the host checks that the width is one of these (sm90_width)
    case 8: return launch_n<FC1, CT, SB, 8>(a, st);
    case 16: return launch_n<FC1, CT, SB, 16>(a, st);
    case 32: return launch_n<FC1, CT, SB, 32>(a, st);
    case 64: return launch_n<FC1, CT, SB, 64>(a, st);
    case 192: return launch_n<FC1, CT, SB, 192>(a, st);
    default: return launch_n<FC1, CT, SB, 128>(a, st);
  }
}

template <bool FC1>
cudaError_t launch(const FcArgs& a, cudaStream_t st) {
  if (a.max_items == 0) return cudaSuccess;
  cudaError_t e = cudaSuccess;
  dispatch_fc_variant(a.ct, a.geom.sbits, [&]<class CT, int SB>() { e = launch_sb<FC1, CT, SB>(a, st); });
  return e;
}

}  // namespace

bool sm90_serves(const MatrixGeom& g) { return g.NBP == 1 || g.kpb % 4 == 0 || g.kpb == 2; }

bool sm90_wide_serves(Elt ct, Elt scale_elt, const MatrixGeom& g) {
  return sm90_serves(g) && (kb_of(g) == 0 || fc_uses_dq(ct, scale_elt, g));
}

bool sm90_wide_pays(double avg, int64_t k, int64_t E) {
  const double sd = std::max(1.0, std::sqrt(avg * std::max(0.0, 1.0 - double(k) / double(E))));
  // Expected items per expert and token columns multiplied, at width n (partial items of at most
  // narrow tokens run narrow wide), with the expert's count ~ Normal(avg, sd).
  auto expect = [&](int n, int narrow, double& items, double& cols) {
    double w = 0;
    items = cols = 0;
    for (int64_t c = std::max<int64_t>(0, int64_t(avg - 6 * sd)); c <= int64_t(avg + 6 * sd) + 1; ++c) {
      const double p = std::exp(-0.5 * (double(c) - avg) * (double(c) - avg) / (sd * sd));
      const int64_t r = c % n;
      items += p * double(c / n + (r > 0));
      cols += p * double(c - r + (r == 0 ? 0 : r > narrow ? n : narrow));
      w += p;
    }
    items /= w, cols /= w;
  };
  double i128, c128, i192, c192;
  expect(128, 64, i128, c128);
  expect(192, 128, i192, c192);
  return i192 < 0.9 * i128 && c192 <= 1.02 * c128;
}

bool sm90_available(int device) {
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, device) != cudaSuccess || p.major != 9 || !tensor_map_encoder()) return false;
  cudaFuncAttributes fa{};
  // The kernels hold wgmma only in sm_90a machine code; a build without it (or PTX JIT from an older
  // virtual architecture) reports a lower PTX version and gets the SM80-family kernels.
  if (cudaFuncGetAttributes(&fa, fc_sm90_kernel<__half, 4, true, 0, 128>) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return fa.ptxVersion >= 90;
}

cudaError_t init_sm90_kernels() {
  return for_each_fc_variant([&]<class CT, int SB, bool FC1>() { return set_attrs_kb<CT, SB, FC1>(); });
}

cudaError_t launch_fc1_sm90(const FcArgs& a, cudaStream_t st) { return launch<true>(a, st); }
cudaError_t launch_fc2_sm90(const FcArgs& a, cudaStream_t st) { return launch<false>(a, st); }

}  // namespace qmoe::cuda
