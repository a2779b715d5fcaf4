// qmoe_bench_cpu_peak: what one core's multiply instructions reach on their own, the ceilings the CPU
// kernels are compared with in docs/PERF.md. Each loop keeps 12 independent accumulator chains in
// zmm registers (enough to cover the instructions' latency) and touches no memory:
//   fp32 FMA (vfmadd231ps, the exact kernels), bf16 pairs (vdpbf16ps, compute "bf16"),
//   u8 x s8 quads (vpdpbusd, compute "int8").
// Rates are per second of this thread's CPU time (so a busy machine does not halve them), counting a
// multiply-add as 2 operations. Loops for instructions the CPU lacks are skipped.
//   qmoe_bench_cpu_peak [--seconds S]
#include <immintrin.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

namespace {

double thread_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

constexpr int kChains = 12;

// Keeps a register's value opaque to the optimizer, so it cannot fold a loop of integer multiply-adds
// into a closed form (it did: vpdpbusd "ran" at 173 TOP/s). Emits no instruction.
template <class V>
__attribute__((target("avx512f"), always_inline)) inline void opaque(V& v) {
  asm volatile("" : "+v"(v));
}

template <class V, class T>
T lane_sum(const V& v) {  // sum of the vector's lanes (the lane reductions of the headers warn on GCC 12)
  T lanes[sizeof(V) / sizeof(T)];
  std::memcpy(lanes, &v, sizeof(V));
  T s = 0;
  for (T x : lanes) s += x;
  return s;
}
constexpr long kInner = 1 << 16;  // iterations between clock reads

// Each returns a value derived from every chain, so the compiler cannot drop the work.
__attribute__((target("avx512f"))) float fma_loop(long iters) {
  __m512 acc[kChains];
#pragma GCC unroll 16
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-6f);
  for (long n = 0; n < iters; ++n)
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b), opaque(acc[i]);
  __m512 s = acc[0];
#pragma GCC unroll 16
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  return lane_sum<__m512, float>(s);
}

__attribute__((target("avx512f,avx512bf16"))) float bf16_loop(long iters) {
  __m512 acc[kChains];
#pragma GCC unroll 16
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3400);
  for (long n = 0; n < iters; ++n)
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b), opaque(acc[i]);
  __m512 s = acc[0];
#pragma GCC unroll 16
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  return lane_sum<__m512, float>(s);
}

__attribute__((target("avx512f,avx512vnni"))) int vnni_loop(long iters) {
  __m512i acc[kChains];
#pragma GCC unroll 16
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_epi32(i);
  const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
  for (long n = 0; n < iters; ++n)
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b), opaque(acc[i]);
  __m512i s = acc[0];
#pragma GCC unroll 16
  for (int i = 1; i < kChains; ++i) s = _mm512_add_epi32(s, acc[i]);
  return lane_sum<__m512i, int>(s);
}

// Runs `loop` for about `seconds` of thread CPU time; returns operations per second.
template <class Loop>
double rate(Loop loop, double ops_per_iter, double seconds, double& sink) {
  sink += double(loop(kInner / 16));  // warm-up (clocks, caches)
  long iters = 0;
  const double t0 = thread_seconds();
  double t = t0;
  while (t - t0 < seconds) {
    sink += double(loop(kInner));
    iters += kInner;
    t = thread_seconds();
  }
  return double(iters) * ops_per_iter / (t - t0);
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 1.0;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--seconds") && i + 1 < argc) {
      seconds = std::atof(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: qmoe_bench_cpu_peak [--seconds S]\n");
      return 2;
    }
  }
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("this CPU lacks AVX-512F: nothing to measure\n");
    return 0;
  }
  double sink = 0;
  // Operations per loop iteration: 12 chains x 16 lanes x (2 for fp32 FMA, 2 x 2 for bf16 pairs,
  // 4 x 2 for u8 x s8 quads).
  std::printf("one core, 12 independent zmm chains, per second of thread CPU time:\n");
  std::printf("  vfmadd231ps fp32 : %6.0f GFLOP/s\n", 1e-9 * rate(fma_loop, kChains * 16 * 2, seconds, sink));
  if (__builtin_cpu_supports("avx512bf16"))
    std::printf("  vdpbf16ps bf16   : %6.0f GFLOP/s\n", 1e-9 * rate(bf16_loop, kChains * 16 * 4, seconds, sink));
  if (__builtin_cpu_supports("avx512vnni"))
    std::printf("  vpdpbusd u8 x s8 : %6.0f GOP/s\n", 1e-9 * rate(vnni_loop, kChains * 16 * 8, seconds, sink));
  std::printf("(checksum %g)\n", sink);
  return 0;
}
