// The Hopper (sm_90a) FC kernel for large batches: a grouped mixed-input GEMM on wgmma.
//
// Same problem and the same packed weights as the SM80-family kernel in cuda_kernels.cu (one copy of
// the weights serves both: cuda_sm80_layout.h); the work is shaped for Hopper's tensor cores:
//
//  * A block owns 256 weight rows (16 tiles of 16) x 128 tokens of one expert (one work item of the
//    grouping with chunk 128) and runs two warpgroups. Warp q of warpgroup w owns tiles 8w + q and
//    8w + 4 + q; each warpgroup issues two wgmma.m64n128k16 per k-step (its rows 0..63 and 64..127).
//    256 rows per block halve the activation traffic from L2 of a 128-row block (activations are the
//    bulk of a prefill GEMM's operand traffic: 2 bytes per k and token against 0.5 per k and row).
//  * Both operands come from shared memory through wgmma descriptors, 128-byte swizzled, K-major.
//    Activations (B): 128 token rows of 64 k (128 bytes) per stage, gathered row by row from the
//    grouped order with cp.async. Weights (A): the packed span vectors arrive with cp.async; each
//    lane dequantizes its own vector(s) - (q - z) exactly by the magic-number conversion, then times
//    the row's scale in the compute type - and stores the result as its A fragment rows into the A
//    tile of the stage. The dequantization of stage ks + 1 runs while the tensor cores work on stage
//    ks (writing shared memory, not registers that a wgmma in flight reads).
//  * The layout renames k inside each k-step (lane t's mma columns 2t, 2t+1, 2t+8, 2t+9 are real k
//    4t..4t+3), and the A tile is stored in that column order, so B is too: fc1 reads x through the
//    converted copy written in mma order (launch_convert_input's mma_order) and fc1 here writes its
//    activations `a` in mma order for fc2 here. The two kernels are dispatched together.
//  * Pipeline: 4 stages of (16 KB activations + the block's 8 or 16 KB of packed weights) in flight,
//    two A tiles (64 KB) alternating.
//
// Numerics (the one difference from the SM80-family kernel, which applies scales in fp32 after the
// mma): the weight operand is (q - z) * s rounded to the compute type (fp16/bf16), with the scale
// first rounded to the compute type when it is stored as fp32 - one or two roundings of relative
// size u per weight, the usual treatment of scales in mixed-input GEMMs. The host keeps layers whose
// scaled weights would leave fp16's normal range on the SM80-family kernel (fc_sm90.h).
//
// Determinism: every output element is one thread's fixed sequence of wgmma accumulations,
// independent of the other tokens in its tile, so results are bitwise reproducible.
#include "fc_sm90.h"

#include "fc_common.cuh"

namespace qmoe::cuda {

namespace {

using namespace dev;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QMOE_SM90_DEVICE 1
#endif

constexpr int kThreads = 256;  // two warpgroups
constexpr int kTiles = 16;     // 16-row tiles per block: 8 per warpgroup, 2 per warp
constexpr int kN = 128;        // tokens per block (wgmma's n128)
constexpr int kStageK = 64;    // k per pipeline stage: 4 k-steps, one 128-byte swizzle row
constexpr int kStages = 4;
constexpr int kXBytes = kN * kStageK * 2;           // 16 KB of activations per stage
constexpr int kABytes = kTiles * 16 * kStageK * 2;  // 32 KB: one dequantized A tile (256 rows x 64 k)
template <int SB> constexpr int kSpansPerStage = SB == 4 ? 1 : 2;
template <int SB> constexpr int kWBytes = kTiles * kSpanBytes * kSpansPerStage<SB>;  // packed weights per stage
template <int SB> constexpr int kStageBytes = kXBytes + kWBytes<SB>;
// [stages x (activations, packed weights)] [two A tiles]; + 1 KB to align the base to a swizzle atom.
template <int SB> constexpr int smem_bytes() { return kStages * kStageBytes<SB> + 2 * kABytes + 1024; }
static_assert(kStageBytes<4> % 1024 == 0 && kStageBytes<8> % 1024 == 0, "tiles stay 1 KB aligned (swizzle atoms)");

#ifdef QMOE_SM90_DEVICE
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy shared-memory writes (st.shared, cp.async) made visible to wgmma's async proxy.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Barrier of one warpgroup (ids 1, 2; 0 is __syncthreads).
__device__ __forceinline__ void wg_barrier(int w) { asm volatile("bar.sync %0, 128;\n" ::"r"(w + 1) : "memory"); }
// Keeps the compiler from moving accesses of wgmma's accumulator registers across the asynchronous
// instructions (they are written behind its back until wg_wait).
__device__ __forceinline__ void fence_regs(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address >> 4,
// leading byte offset (unused for swizzled K-major operands: 1), stride byte offset 1024 >> 4 (8 rows
// of 128 bytes), layout type 1 = 128-byte swizzle.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t saddr) {
  return uint64_t((saddr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
// Byte offset of (row, byte b) in a 128-byte-swizzled tile of 128-byte rows.
__device__ __forceinline__ uint32_t sw128(int row, int b) {
  return uint32_t(row * 128 + ((((b >> 4) ^ row) & 7) << 4) + (b & 15));
}

// D[64 x 128] (+)= A[64 x 16] * B[16 x 128], both from shared memory, K-major.
template <class CT>
__device__ __forceinline__ void wgmma_n128(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
  if constexpr (std::is_same_v<CT, __half>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
    "%0, %1, %2, %3, %4, %5, %6, %7, "
    "%8, %9, %10, %11, %12, %13, %14, %15, "
    "%16, %17, %18, %19, %20, %21, %22, %23, "
    "%24, %25, %26, %27, %28, %29, %30, %31, "
    "%32, %33, %34, %35, %36, %37, %38, %39, "
    "%40, %41, %42, %43, %44, %45, %46, %47, "
    "%48, %49, %50, %51, %52, %53, %54, %55, "
    "%56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(accumulate));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
    "%0, %1, %2, %3, %4, %5, %6, %7, "
    "%8, %9, %10, %11, %12, %13, %14, %15, "
    "%16, %17, %18, %19, %20, %21, %22, %23, "
    "%24, %25, %26, %27, %28, %29, %30, %31, "
    "%32, %33, %34, %35, %36, %37, %38, %39, "
    "%40, %41, %42, %43, %44, %45, %46, %47, "
    "%48, %49, %50, %51, %52, %53, %54, %55, "
    "%56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        :
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(accumulate));
  }
}

template <class CT> __device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
  if constexpr (std::is_same_v<CT, __half>) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  } else {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
}
template <class CT> __device__ __forceinline__ uint32_t pair_of(float s) {
  const CT h = CtTraits<CT>::from_float(s);
  const uint32_t u = *reinterpret_cast<const uint16_t*>(&h);
  return u * 0x10001u;
}
#endif

// Scale (as a compute-type pair) and zero point of a thread's two rows (g, g + 8) of one tile for
// one scale block.
template <class CT, int SB> struct RowParams {
  uint32_t s0, s1;
  ZeroRep<CT, SB> z;
};

// KB: k-steps per scale block inside a stage: 4 (blocks of >= 64 k, or one block: row-wise) or 2
// (blocks of 32).
template <class CT, int SB, bool FC1, int KB>
__global__ void __launch_bounds__(kThreads, 1) fc_sm90_kernel(const FcArgs a) {
#ifdef QMOE_SM90_DEVICE
  const int item = blockIdx.x;
  if (item >= *a.n_items) return;  // whole block
  constexpr int SPANS = kSpansPerStage<SB>;
  constexpr int KSTEPS = SB == 4 ? 4 : 2;  // k-steps per span
  constexpr int NB = 4 / KB;               // scale blocks per stage
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, q = warp & 3;
  const int g = lane >> 2, t = lane & 3;
  const MatrixGeom& G = a.geom;
  const int4 it = a.items[item];
  const int e = it.x, p0 = it.y, cnt = it.z;
  // This thread's two tiles (m = 0, 1: the warpgroup's first and second 64 rows).
  int64_t mt[2], mtc[2];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    mt[m] = int64_t(blockIdx.y) * kTiles + 8 * wg + 4 * m + q;
    mtc[m] = mt[m] < G.MT ? mt[m] : G.MT - 1;  // past the end: re-read the last tile, never stored
  }
  const int nk = int((G.S + SPANS - 1) / SPANS);  // pipeline stages along K

  extern __shared__ uint8_t sm90_smem[];
  const uint32_t sbase = (static_cast<uint32_t>(__cvta_generic_to_shared(sm90_smem)) + 1023u) & ~1023u;
  const uint32_t abase = sbase + kStages * kStageBytes<SB>;
  auto stage_addr = [&](int ks) { return sbase + uint32_t(ks % kStages) * kStageBytes<SB>; };

  // Activation copies: thread tid moves 16-byte chunk (tid & 7) of token rows (tid >> 3) + 32 i.
  const uint8_t* xsrc[4];
  uint32_t xdst[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int n = (tid >> 3) + 32 * i, c = tid & 7;
    xsrc[i] = nullptr;
    if (n < cnt) {
      const int64_t r = FC1 ? int64_t(a.sorted_slot[p0 + n] / a.k) : int64_t(p0 + n);
      xsrc[i] = static_cast<const uint8_t*>(a.x) + (r * a.x_ld) * 2 + c * 16;
    }
    xdst[i] = sw128(n, c * 16);
  }
  // Packed-weight copies: each lane moves its own span vectors of its two tiles (and reads them back).
  const uint8_t* wsrc[2];
  uint32_t wdst[2];
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    wsrc[m] = a.w + ((int64_t(e) * G.MT + mtc[m]) * G.S) * kSpanBytes + lane * 16;
    wdst[m] = kXBytes + uint32_t(((8 * wg + 4 * m + q) * SPANS) * kSpanBytes + lane * 16);
  }
  auto issue = [&](int ks) {
    if (ks < nk) {
      const uint32_t st = stage_addr(ks);
#pragma unroll
      for (int i = 0; i < 4; ++i)
        cp_async16_zfill_sa(st + xdst[i], xsrc[i] ? xsrc[i] + int64_t(ks) * 128 : a.x, xsrc[i] ? 16 : 0);
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int h = 0; h < SPANS; ++h) {
          const int64_t s = int64_t(ks) * SPANS + h;
          if (s < G.S) cp_async16_stream_sa(st + wdst[m] + h * kSpanBytes, wsrc[m] + s * kSpanBytes);
          else cp_async16_zfill_sa(st + wdst[m] + h * kSpanBytes, a.w, 0);  // past K: codes 0 meet x = 0
        }
    }
    cp_async_commit();  // always, so that group counting stays uniform at the tail
  };

  // Scale-block parameters of stage ks, loaded one stage ahead into registers. Block indices are
  // clamped: the padded half stage of an odd 8-bit span count meets x = 0.
  auto load_params = [&](int ks, RowParams<CT, SB> (&p)[2][NB]) {
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        int64_t blk = (int64_t(ks) * 4 + b * KB) / G.kpb;
        blk = blk < G.NBP ? blk : G.NBP - 1;
        const int64_t i = ((int64_t(e) * G.MT + mtc[m]) * G.NBP + blk) * kTileRows + g;
        p[m][b].s0 = pair_of<CT>(load_elt(a.s, i, a.scale_elt));
        p[m][b].s1 = pair_of<CT>(load_elt(a.s, i + 8, a.scale_elt));
        p[m][b].z.set(a.z ? a.z[i] : a.zdefault, a.z ? a.z[i + 8] : a.zdefault);
      }
  };
  RowParams<CT, SB> prm[2][NB], nxt[2][NB];

  // Dequantize stage ks into A tile (ks & 1): rows 16 q + g (+ 8) of the thread's sub-tile
  // (warpgroup wg, half m: 64 rows, 8 KB), at the columns the mma layout gives lane t.
  auto dequant_stage = [&](int ks) {
    const uint32_t st = stage_addr(ks);
    const uint32_t at = abase + uint32_t(ks & 1) * kABytes;
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const uint32_t sub = at + uint32_t((2 * wg + m) * 64 * 128);
      uint4 v[SPANS];
#pragma unroll
      for (int h = 0; h < SPANS; ++h) v[h] = lds128(st + wdst[m] + h * kSpanBytes);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const RowParams<CT, SB>& p = prm[m][j / KB];
        uint32_t f[4];
        dequant<CT, SB>(v[j / KSTEPS], j % KSTEPS, p.z, f);
        const int r0 = 16 * q + g;
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sub + sw128(r0, 32 * j + 4 * t)), "r"(mul2<CT>(f[0], p.s0)));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sub + sw128(r0 + 8, 32 * j + 4 * t)), "r"(mul2<CT>(f[1], p.s1)));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sub + sw128(r0, 32 * j + 16 + 4 * t)), "r"(mul2<CT>(f[2], p.s0)));
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sub + sw128(r0 + 8, 32 * j + 16 + 4 * t)), "r"(mul2<CT>(f[3], p.s1)));
      }
    }
  };

  float acc[2][64];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[m][i] = 0.f;

  // Prologue: stages 0 .. kStages - 2 in flight; stage 0 dequantized.
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue(i);
  load_params(0, prm);
  if (nk > 1) load_params(1, nxt);
  cp_async_wait<kStages - 2>();
  fence_async_smem();
  __syncthreads();
  dequant_stage(0);
  fence_async_smem();
  wg_barrier(wg);

#pragma unroll 1
  for (int ks = 0; ks < nk; ++ks) {
    // Invariant: A tile (ks & 1) holds stage ks dequantized (this warpgroup's rows), stage ks's
    // activations have landed and are visible to the async proxy.
    {
      const uint32_t at = abase + uint32_t(ks & 1) * kABytes + uint32_t(2 * wg * 64 * 128);
      const uint32_t xs = stage_addr(ks);
      wg_fence();
#pragma unroll
      for (int m = 0; m < 2; ++m) fence_regs(acc[m]);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int m = 0; m < 2; ++m)
          wgmma_n128<CT>(acc[m], desc_sw128(at + m * 64 * 128 + 32 * j), desc_sw128(xs + 32 * j), ks > 0 || j > 0);
      wg_commit();
#pragma unroll
      for (int m = 0; m < 2; ++m) fence_regs(acc[m]);
    }
    wg_wait<1>();  // this warpgroup's wgmma of stage ks - 1 are done: A tile (ks + 1) & 1 is free
    if (ks + 1 < nk) {
      cp_async_wait<kStages - 3>();  // this thread's copies of stage ks + 1 have landed
      fence_async_smem();
      __syncthreads();  // everyone's; and both warpgroups are done with stage ks - 1's slot
      issue(ks + kStages - 1);  // into the slot of stage ks - 1
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int b = 0; b < NB; ++b) prm[m][b] = nxt[m][b];
      if (ks + 2 < nk) load_params(ks + 2, nxt);
      dequant_stage(ks + 1);
      fence_async_smem();
      wg_barrier(wg);
    }
  }
  wg_wait<0>();
#pragma unroll
  for (int m = 0; m < 2; ++m) fence_regs(acc[m]);
  cp_async_wait<0>();

  // Epilogue. acc[m][4 j + r]: token 8 j + 2 t + (r & 1), row g + 8 (r >> 1) of tile mt[m].
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    if (mt[m] >= G.MT) continue;
    const int64_t tm = mt[m];
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int idx = 8 * j + 2 * t + c;
        if (idx >= cnt) continue;
        if constexpr (FC1) {
          CT* arow = static_cast<CT*>(a.a) + int64_t(p0 + idx) * a.a_ld;
          auto put = [&](int64_t col, float v) {
            arow[(col & ~int64_t(15)) + mma_col_of(int(col & 15))] = CtTraits<CT>::from_float(v);
          };
          if (G.map == RowMap::swiglu) {
            const int64_t i = 8 * tm + g;
            float v = 0.f;
            if (i < a.I) {
              float gt = acc[m][4 * j + c], ln = acc[m][4 * j + 2 + c];
              if (a.bias_g) gt += a.bias_g[int64_t(e) * a.a_ld + i];
              if (a.bias_l) ln += a.bias_l[int64_t(e) * a.a_ld + i];
              v = swiglu_dev(gt, ln, a.limit, a.alpha, a.beta);
            }
            put(i, v);
          } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int64_t n = 16 * tm + g + 8 * h;
              float v = 0.f;
              if (n < a.I) {
                v = acc[m][4 * j + 2 * h + c];
                if (a.bias_g) v += a.bias_g[int64_t(e) * a.a_ld + n];
                v = act_dev(a.act, v);
              }
              put(n, v);
            }
          }
        } else {
          float* yrow = a.y + int64_t(a.sorted_slot[p0 + idx]) * a.H;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t n = 16 * tm + g + 8 * h;
            if (n < a.H) yrow[n] = acc[m][4 * j + 2 * h + c];
          }
        }
      }
    }
  }
#endif
}

template <class CT, int SB, bool FC1, int KB>
cudaError_t set_attr() {
  return cudaFuncSetAttribute(fc_sm90_kernel<CT, SB, FC1, KB>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              smem_bytes<SB>());
}
template <class CT, int SB, bool FC1>
cudaError_t set_attrs_kb() {
  cudaError_t e = set_attr<CT, SB, FC1, 2>();
  if (e == cudaSuccess) e = set_attr<CT, SB, FC1, 4>();
  return e;
}

template <bool FC1, class CT, int SB>
void launch_sb(const FcArgs& a, cudaStream_t st) {
  const dim3 grid(unsigned(a.max_items), unsigned((a.geom.MT + kTiles - 1) / kTiles));
  if (a.geom.kpb == 2 && a.geom.NBP > 1) fc_sm90_kernel<CT, SB, FC1, 2><<<grid, kThreads, smem_bytes<SB>(), st>>>(a);
  else fc_sm90_kernel<CT, SB, FC1, 4><<<grid, kThreads, smem_bytes<SB>(), st>>>(a);
}

template <bool FC1>
void launch(const FcArgs& a, cudaStream_t st) {
  if (a.max_items == 0) return;
  const bool h = a.ct == Elt::f16;
  if (a.geom.sbits == 4) h ? launch_sb<FC1, __half, 4>(a, st) : launch_sb<FC1, __nv_bfloat16, 4>(a, st);
  else h ? launch_sb<FC1, __half, 8>(a, st) : launch_sb<FC1, __nv_bfloat16, 8>(a, st);
}

}  // namespace

bool sm90_serves(const MatrixGeom& g) { return g.NBP == 1 || g.kpb % 4 == 0 || g.kpb == 2; }

bool sm90_available(int device) {
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, device) != cudaSuccess || p.major != 9) return false;
  cudaFuncAttributes fa{};
  // The kernels hold wgmma only in sm_90a machine code; a build without it (or PTX JIT from an older
  // virtual architecture) reports a lower PTX version and gets the SM80-family kernels.
  if (cudaFuncGetAttributes(&fa, fc_sm90_kernel<__half, 4, true, 4>) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return fa.ptxVersion >= 90;
}

cudaError_t init_sm90_kernels() {
  cudaError_t e = cudaSuccess;
  for (cudaError_t r : {set_attrs_kb<__half, 4, true>(), set_attrs_kb<__half, 8, true>(),
                        set_attrs_kb<__nv_bfloat16, 4, true>(), set_attrs_kb<__nv_bfloat16, 8, true>(),
                        set_attrs_kb<__half, 4, false>(), set_attrs_kb<__half, 8, false>(),
                        set_attrs_kb<__nv_bfloat16, 4, false>(), set_attrs_kb<__nv_bfloat16, 8, false>()})
    if (e == cudaSuccess) e = r;
  return e;
}

void launch_fc1_sm90(const FcArgs& a, cudaStream_t st) { launch<true>(a, st); }
void launch_fc2_sm90(const FcArgs& a, cudaStream_t st) { launch<false>(a, st); }

}  // namespace qmoe::cuda
