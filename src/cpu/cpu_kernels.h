// The CPU micro-kernel interface: one call computes a pair of packed tiles (32 output rows) for up to
// kMaxTokens token rows, reading the format of cpu_layout.h. Each instruction set has its own
// translation unit (kernels_portable.cpp, kernels_avx2.cpp, kernels_avx512.cpp) compiled with its own
// flags; cpu_backend.cpp picks one at run time.
//
// The arithmetic contract every kernel implements, so all paths agree bit for bit (tested):
//   for each output lane (row) and token, for each scale block b in order:
//     ev = sum over even columns k of the block, in increasing k, of fma(float(q - z), x[k], ev)
//     od = the same over odd columns
//     acc = fma(scale_b, ev + od, acc)                (acc starts at +0)
//   q - z is an exact small integer, so float(q - z) is exact; the FMAs are IEEE fused, and the chain
//   split (even/odd) gives a single token two independent FMA chains per tile.
// One exception: a block whose scale is +-Inf. There s * sum(...) and the reference's sum of s * (q - z)
// * x differ in which outputs become NaN (Inf * 0 where q == z), so that block's term is
// reference_block_term() (the reference's order, acc + term, no FMA). The portable kernel does this
// per block; the SIMD kernels scan a pair's scales first (unless PairJob::scales_finite says there is
// none) and hand a pair with any infinite scale to the portable kernel (rare input; keeps the check out
// of their block loop).
// Bias, activation and route mixing happen outside the kernel (cpu_backend.cpp), in shared scalar code.
//
// The bf16 compute mode (CpuBackendOptions::compute = "bf16", kernels_avx512_bf16.cpp) is the one
// kernel set outside this contract: it reads activations rounded to bf16 (PairJob::xb) and multiplies
// them with vdpbf16ps, so it agrees with the others only within the bound stated there. Its own
// per-token arithmetic is still fixed (independent of which tokens share a call), so it is
// deterministic across chunk sizes and thread counts. Pairs with an infinite scale, and 2-bit
// weights, go to the exact portable kernel on the fp32 rows (PairJob::x).
// The int8 compute mode (compute = "int8", kernels_avx512_vnni.cpp) is the other: it reads activations
// quantized to int8 with one scale per row (PairJob::xq, int8_rows.h) and multiplies them with the weight
// codes by vpdpbusd, exactly in int32 within each group, so it too agrees with the others only within
// the bound stated there, and is deterministic for the same reason; same fallbacks. The int8x3 mode
// (compute = "int8x3", kernels_amx.cpp) reads three int8 digits per activation, or four in two pairs for 4-bit
// blocks of 16 and 32 (PairJob's digit strides, xq_pairs)
// and agrees with the exact kernels to fp32-level rounding; same determinism, same fallbacks.
#pragma once

#include <cstdint>

#include "qmoe/dtype.h"

namespace qmoe::cpu {

inline constexpr int kMaxTokens = 32;  // most token rows per kernel call (KernelSet::tokens_per_call <= this)

struct PairJob {
  const uint8_t* codes[2];        // tile starts: [J][16] bytes each
  const void* scales[2];          // [B][16] of scale_dtype
  const uint8_t* zero_points[2];  // [B][16], or null: the default zero point 2^(bits-1)
  int64_t jbytes = 0;             // J (even)
  int64_t nb = 1;                 // B
  int64_t block_bytes = 0;        // bytes of a row per block (even)
  int64_t K = 0;                  // logical columns (codes past K are padding)
  int bits = 4;
  DType scale_dtype = DType::f32;
  // The caller knows that no scale of the pair is +-Inf (PackedMat::finite), so the SIMD kernels skip
  // their scan for infinite scales; false: they scan.
  bool scales_finite = false;
  int tokens = 1;                 // 1..KernelSet::tokens_per_call(bits)
  const float* x[kMaxTokens];     // fp32 activation rows, readable and zero up to jbytes * (8/bits)
  // bf16 compute mode only: the same rows rounded to bf16 (nearest even), same length and padding, so
  // columns (2i, 2i+1) form the 32-bit word i that vdpbf16ps takes. Null in the exact mode.
  const uint16_t* xb[kMaxTokens];
  // int8 compute mode only (int8_rows.h): each row's int8 codes, -(sum of codes) per integer group and
  // scale, written by quantize_row_int8 for this matrix's K, bits and block size. Null / 0 otherwise.
  const int8_t* xq[kMaxTokens];
  const int32_t* xneg_sum[kMaxTokens];
  float xscale[kMaxTokens];
  // int8x3 mode only (quantize_row_int8_digits): digit plane d of row t at xq[t] + d * xq_digit_stride, its
  // group sums at xneg_sum[t] + d * xneg_digit_stride; xq_pairs: the rows hold the four digits in two
  // pairs (int8_pair_digits(bits, block size) for the layer), else three digits.
  int64_t xq_digit_stride = 0, xneg_digit_stride = 0;
  bool xq_pairs = false;
  float* acc;                     // out: [tokens][32], lanes 0..15 = tile 0, 16..31 = tile 1
};

using PairKernel = void (*)(const PairJob&);

// SwiGLU of n <= 16 (gate, linear) pairs: out[i] = swiglu_scalar's formula on gate[i] + gate_bias[i]
// and lin[i] + lin_bias[i] (a null bias adds nothing) with the spec's limit, alpha and beta, but with a
// vector e^x instead of one std::exp call per value (within 8 ulp of swiglu_scalar, tested in
// cpu_swiglu_test.cpp). The biases are added here rather than by the caller, so that gate and lin can
// be the pair kernel's own vector-stored sums: a 64-byte load of 16 values the caller had just stored
// one by one waits for the stores to retire (no store forwarding), which was 2/3 of this function's
// time (perf, int8 mode, mixtral T = 64).
using SwigluFn = void (*)(const float* gate, const float* lin, const float* gate_bias, const float* lin_bias,
                          float* out, int n, float limit, float alpha, float beta);

struct KernelSet {
  const char* isa;  // "portable", "avx2", "avx512", "avx512-bf16", "avx512-vnni", "avx512-vnni-vbmi", "avx512-amx"
  PairKernel w2, w4, w8;
  int max_tokens;   // token rows one call takes: what fits the ISA's registers
  int max_tokens_w8 = 0;  // for 8-bit weights where it differs (0: max_tokens); <= kMaxTokens
  // The FC1 epilogue's SwiGLU for the accuracy options (bf16, int8 compute); null in the exact sets,
  // which call swiglu_scalar so that every backend's activations stay bitwise equal.
  SwigluFn swiglu = nullptr;
  // Token rows of one tile multiply (the AMX sets: 16), or 0. Where set, an expert's tokens go in full calls
  // and one shorter call (CallSplit, cpu_backend.cpp): a tile multiply costs the same for 10 rows as for 16.
  int tile_rows = 0;
  int tokens_per_call(int bits) const { return bits == 8 && max_tokens_w8 > 0 ? max_tokens_w8 : max_tokens; }
};

const KernelSet& portable_kernels();
const KernelSet& avx2_kernels();    // call only where the CPU has AVX2+FMA+F16C
const KernelSet& avx512_kernels();  // call only where the CPU has AVX-512 F/BW/VL
// The bf16 compute mode: call only where the CPU also has AVX512_BF16; its jobs must set xb.
const KernelSet& avx512_bf16_kernels();
// The int8 compute mode: call only where the CPU also has AVX512_VNNI; its jobs must set xq, xneg_sum, xscale.
// The kernels transpose the weight codes with AVX512_VBMI where the CPU has it (the same bytes either way);
// avx512_vnni_kernels(vbmi) picks one (vbmi: only where the CPU has it; tests compare the two).
const KernelSet& avx512_vnni_kernels();
const KernelSet& avx512_vnni_kernels(bool vbmi);
// The int8 compute mode's group sums by AMX tile multiplies (kernels_amx.cpp; the same results, bit for
// bit): call only where amx_available(). Calls of a few tokens go to the VNNI kernels unless every_call
// (tests).
const KernelSet& avx512_amx_kernels(bool every_call = false);
// The int8x3 compute mode (int8_rows.h: activations as three or four int8 digits, fp32-level accuracy): tile
// multiplies for calls of more than kVnniDigitTokens tokens (every call where every_call: tests), the rest
// by avx512_vnni_digits, bitwise the same. Call only where amx_available(); its jobs must set xq, xneg_sum,
// xscale and the digit strides.
const KernelSet& avx512_amx_digits_kernels(bool every_call = false);
// The int8x3 mode's sums by vpdpbusd (with VBMI), for calls of at most kVnniDigitTokens tokens, 4- and
// 8-bit weights: the same integers and the same fold as the AMX digit kernels, so the same bits.
inline constexpr int kVnniDigitTokens = 2;
void avx512_vnni_digits(const PairJob& jb);
// Whether this CPU has AMX-TILE, AMX-INT8, AVX512_VNNI and AVX512_VBMI (and AVX-512 F/BW/VL) and the OS
// granted this process the AMX tile state (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, asked once).
bool amx_available();

// Block b's contribution for lane l (0..15) of tile `tile` and token t, computed as the reference does:
// sum over the block's columns c < K, in order, of (scale * float(q - z)) * x[c]. Used only where the
// scale is infinite (see above); shared by all kernels so they stay bitwise identical.
float reference_block_term(const PairJob& jb, int tile, int l, int t, int64_t b);

// Loads a scale element as fp32 (portable; the SIMD kernels convert 16 at a time).
inline float scale_at(DType t, const void* p, int64_t i) { return load_as_float(t, p, i); }

}  // namespace qmoe::cpu
