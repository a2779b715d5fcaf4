// Device helpers shared by the FC kernels (cuda_kernels.cu: the SM80-family weight-streaming kernel;
// fc_sm90.cu: the Hopper wgmma kernel): cp.async wrappers, element loads/stores, the magic-number
// dequantizers that turn a lane's 16-byte span vector into mma A fragments, and the epilogue's
// activation functions. Both kernels read the same packed layout (cuda_sm80_layout.h), so they share
// the code that interprets it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda_kernels.h"

namespace qmoe::cuda::dev {

// cp.async wrappers (PTX ISA "cp.async", sm_80+). Weights: .cg (bypass L1, read once).
// Activations: .ca (re-read by the other warps of the SM); src-size 0 = zero fill.
// (An .L2::cache_hint evict-first variant raised "illegal instruction" on the H100 here, so the
// weights use plain .cg; see docs/PERF-cuda.md.)
// Destinations are shared-state-space addresses (32-bit; no generic -> shared conversion in the loop).
__device__ __forceinline__ void cp_async16_stream_sa(uint32_t d, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
__device__ __forceinline__ void cp_async16_zfill_sa(uint32_t d, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async8_sa(uint32_t d, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(d), "l"(src));
}
// 16-byte shared load by state-space address ("memory": stays after the cp.async wait / __syncwarp).
__device__ __forceinline__ uint4 lds128(uint32_t a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ float load_elt(const void* p, int64_t i, Elt e) {
  switch (e) {
    case Elt::f32: return static_cast<const float*>(p)[i];
    case Elt::f16: return __half2float(static_cast<const __half*>(p)[i]);
    case Elt::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  return 0.f;
}

__device__ __forceinline__ void store_elt(void* p, int64_t i, Elt e, float v) {
  switch (e) {
    case Elt::f32: static_cast<float*>(p)[i] = v; break;
    case Elt::f16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case Elt::bf16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
  }
}

// LOP3 (PTX ISA "lop3"): d = (a & b) | c, immLut 0xEA = (0xF0 & 0xCC) | 0xAA.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <class CT> struct CtTraits;
template <> struct CtTraits<__half> {
  // 1024 + q is exact in fp16 for q < 1024 (ulp 1 in [1024, 2048)); 0x6400 = 1024.0.
  static constexpr uint32_t kMagic4 = 0x64006400u;
  static __device__ __forceinline__ uint32_t zero_pair4(int z) { return (0x6400u + z) * 0x10001u; }
  // For the high nibble of a byte: (w & 0x00f000f0) | magic = 1024 + 16q; times 1/16 (0x2c00) = 64 + q,
  // plus -(64 + z) -> q - z, all exact, in one fma.
  static constexpr uint32_t kSixteenth = 0x2c002c00u;
  static constexpr bool kHiFma = true;  // fp16 has 10 mantissa bits: bits 4..7 stay in the mantissa
  static __device__ __forceinline__ uint32_t zero_pair4_hi(int z) {
    return uint32_t(__half_as_ushort(__float2half_rn(-64.f - float(z)))) * 0x10001u;
  }
  static __device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    __half2 r = __hfma2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b),
                        *reinterpret_cast<__half2*>(&c));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct CtTraits<__nv_bfloat16> {
  // 128 + q is exact in bf16 for q < 128 (ulp 1 in [128, 256)); 0x4300 = 128.0.
  static constexpr uint32_t kMagic4 = 0x43004300u;
  static __device__ __forceinline__ uint32_t zero_pair4(int z) { return (0x4300u + z) * 0x10001u; }
  // No high-nibble fma here: bf16 has 7 mantissa bits, so bits 4..7 of a half would reach the
  // exponent (measured: every bf16 int4 test failed with it). bf16 shifts each nibble down instead.
  static constexpr bool kHiFma = false;
  static __device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// DQ (fc_uses_dq): a bf16 scale as the pair (s, s), and a k-step's A fragment times its rows' pairs
// (a[0], a[2]: tile row g; a[1], a[3]: row g + 8), rounding each s * (q - z) once.
__device__ __forceinline__ uint32_t scale_pair(const uint16_t* s) { return uint32_t(*s) * 0x10001u; }
template <class CT> __device__ __forceinline__ void scale_fragment(uint32_t (&a)[4], uint32_t s0, uint32_t s1) {
  a[0] = CtTraits<CT>::mul2(a[0], s0), a[2] = CtTraits<CT>::mul2(a[2], s0);
  a[1] = CtTraits<CT>::mul2(a[1], s1), a[3] = CtTraits<CT>::mul2(a[3], s1);
}

// Zero point of a tile row in the form the dequantizer subtracts.
template <class CT, int SB> struct ZeroRep {
  uint32_t zg, zg8;   // packed pairs (magic + z) for 4-bit or 8-bit fp16; 4-bit fp16: zg8 = -(64 + z1)
  float fg, fg8;      // 2^23 + z for 8-bit bf16
  __device__ __forceinline__ void set(int z0, int z1) {
    if constexpr (SB == 4) {
      zg = CtTraits<CT>::zero_pair4(z0);
      if constexpr (CtTraits<CT>::kHiFma) zg8 = CtTraits<CT>::zero_pair4_hi(z1);
      else zg8 = CtTraits<CT>::zero_pair4(z1);
    } else if constexpr (std::is_same_v<CT, __half>) {
      zg = (0x6400u + z0) * 0x10001u, zg8 = (0x6400u + z1) * 0x10001u;
    } else {
      fg = 8388608.f + float(z0), fg8 = 8388608.f + float(z1);
    }
  }
};

// A fragments of k-step j of a span vector: integer-valued (q - z), exact in CT.
template <class CT, int SB>
__device__ __forceinline__ void dequant(const uint4& v, int j, const ZeroRep<CT, SB>& z, uint32_t (&a)[4]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (SB == 4) {
    const uint32_t q = w[j], q8 = q >> 8;
    const uint32_t m = CtTraits<CT>::kMagic4;
    a[0] = CtTraits<CT>::sub2(lop3_and_or(q, 0x000f000fu, m), z.zg);
    a[2] = CtTraits<CT>::sub2(lop3_and_or(q8, 0x000f000fu, m), z.zg);
    if constexpr (CtTraits<CT>::kHiFma) {
      // fp16: high nibbles (rows g+8: a1, a3) as 1024 + 16q through one fma with 1/16, so one
      // shift per 8 weights instead of three.
      const uint32_t h = CtTraits<CT>::kSixteenth;
      a[1] = CtTraits<CT>::fma2(lop3_and_or(q, 0x00f000f0u, m), h, z.zg8);
      a[3] = CtTraits<CT>::fma2(lop3_and_or(q8, 0x00f000f0u, m), h, z.zg8);
    } else {
      a[1] = CtTraits<CT>::sub2(lop3_and_or(q >> 4, 0x000f000fu, m), z.zg8);
      a[3] = CtTraits<CT>::sub2(lop3_and_or(q >> 12, 0x000f000fu, m), z.zg8);
    }
  } else if constexpr (std::is_same_v<CT, __half>) {
    // PRMT (PTX ISA "prmt"): bytes of {0x64646464, w}; selector 0x4140 -> [w.b0, 0x64, w.b1, 0x64].
    const uint32_t q0 = w[2 * j], q1 = w[2 * j + 1];
    a[0] = CtTraits<CT>::sub2(__byte_perm(q0, 0x64646464u, 0x4140), z.zg);
    a[1] = CtTraits<CT>::sub2(__byte_perm(q0, 0x64646464u, 0x4342), z.zg8);
    a[2] = CtTraits<CT>::sub2(__byte_perm(q1, 0x64646464u, 0x4140), z.zg);
    a[3] = CtTraits<CT>::sub2(__byte_perm(q1, 0x64646464u, 0x4342), z.zg8);
  } else {
    // bf16 cannot hold 128 + q exactly for q >= 128: build 2^23 + q as fp32 (exact), subtract in
    // fp32 (exact), and pack two results with one cvt.rn.bf16x2.f32 (|q - z| <= 255 is exact in bf16).
    const uint32_t q0 = w[2 * j], q1 = w[2 * j + 1];
    auto pair = [](uint32_t q, int b0, float zf) {
      const float lo = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7540 | b0)) - zf;
      const float hi = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7540 | (b0 + 1))) - zf;
      __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
      return *reinterpret_cast<uint32_t*>(&r);
    };
    a[0] = pair(q0, 0, z.fg);
    a[1] = pair(q0, 2, z.fg8);
    a[2] = pair(q1, 0, z.fg);
    a[3] = pair(q1, 2, z.fg8);
  }
}

// silu and swiglu's sigmoid take __expf (ex2.approx) and __fdividef (rcp.approx): a few ulp of fp32
// (about 1e-6 relative here), far below the fp16/bf16 rounding of the activations they produce, where
// expf and an IEEE division were ~30 instructions per output of the wgmma kernel's epilogue, during
// which its SM's tensor cores idle (H100, T = 2048: qwen3-30b-a3b int4 b128 561 -> 545 us, mixtral
// 2,748 -> 2,698 us; docs/PERF-cuda.md). The exponent is clamped so 1 + e stays below 2^126, the
// divisor range where __fdividef keeps its stated accuracy.
__device__ __forceinline__ float act_dev(int act, float v) {
  switch (act) {
    case 0: return fmaxf(0.f, v);                                                          // relu
    case 1: return 0.5f * v * (1.0f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v)));  // gelu
    case 2: return __fdividef(v, 1.0f + __expf(fminf(-v, 80.f)));                          // silu
    default: return v;                                                                     // identity
  }
}

// SwiGLU of one (gate, linear) pair after bias: the contract's clamp rules, then
// gate * sigmoid(alpha * gate) * (linear + beta).
__device__ __forceinline__ float swiglu_dev(float gt, float ln, float limit, float alpha, float beta) {
  gt = (limit < gt) ? limit : gt;                        // std::min(g, limit)
  ln = ln < -limit ? -limit : (limit < ln ? limit : ln);  // std::clamp
  return __fdividef(gt, 1.0f + __expf(fminf(-alpha * gt, 80.f))) * (ln + beta);
}

// The FC kernels' variants (host side): compute type (fp16, bf16) x stored bits (4, 8) x fc1/fc2.
// Calls f.template operator()<CT, SB, FC1>() for each of the eight; returns the first error.
template <class F> cudaError_t for_each_fc_variant(F&& f) {
  cudaError_t e = cudaSuccess;
  for (cudaError_t r : {f.template operator()<__half, 4, true>(), f.template operator()<__half, 8, true>(),
                        f.template operator()<__nv_bfloat16, 4, true>(), f.template operator()<__nv_bfloat16, 8, true>(),
                        f.template operator()<__half, 4, false>(), f.template operator()<__half, 8, false>(),
                        f.template operator()<__nv_bfloat16, 4, false>(), f.template operator()<__nv_bfloat16, 8, false>()})
    if (e == cudaSuccess) e = r;
  return e;
}
// Calls f.template operator()<CT, SB>() for the variant that serves compute type `ct` and stored bits.
template <class F> void dispatch_fc_variant(Elt ct, int sbits, F&& f) {
  const bool h = ct == Elt::f16;
  if (sbits == 4) h ? f.template operator()<__half, 4>() : f.template operator()<__nv_bfloat16, 4>();
  else h ? f.template operator()<__half, 8>() : f.template operator()<__nv_bfloat16, 8>();
}

}  // namespace qmoe::cuda::dev
