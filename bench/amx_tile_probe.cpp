// What the AMX tile unit takes on this CPU (docs/PERF.md, "Rows on cache lines and pair blocks"), three probes:
//   loop   a loop of tile loads and multiplies, A from a 64 KB buffer (L2): tdpbssd at 64 and 32 columns,
//          tdpbf16ps at 32 and 16, ns per multiply;
//   rows   the kernels' pattern per group: C zeroed, three A loads and multiplies (bf16), C stored, A rows of
//          16 tokens walked along K, for row lengths of 128..14336 columns, ns per multiply: rows strided (each
//          token's three parts one after the other, as the backend lays them out) or contiguous (a group's tiles
//          1 KB apart), with the rows at offset 0, 16 or 32 bytes from a 64-byte line; and one A load serving
//          one B tile or two;
//   order  whether tdpbf16ps's fp32 sums match an order of fp32 additions a vector kernel could repeat:
//          outputs (of 512 thousand random ones) that differ from each of five candidate orders.
// Not part of the build; on a CPU with AMX-BF16 and AMX-INT8 (Linux 5.16+):
//   g++ -O2 -std=c++17 -mamx-tile -mamx-int8 -mamx-bf16 -o /tmp/amx_tile_probe bench/amx_tile_probe.cpp
//   /tmp/amx_tile_probe [loop|rows|order]   (default: all three)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0..7 of 16 rows; tile 0 (A) `a_bytes` to a row, tile 2 (B) a_bytes / 4 rows.
void configure(int a_bytes) {
  TileConfig c;
  for (int i = 0; i < 8; ++i) c.rows[i] = 16, c.colsb[i] = 64;
  c.colsb[0] = uint16_t(a_bytes), c.rows[2] = uint8_t(a_bytes / 4);
  _tile_loadconfig(&c);
}

double ns_since(std::chrono::steady_clock::time_point t0, long ops) {
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / double(ops);
}

alignas(64) int8_t g_b[2][1024];
alignas(64) float g_c[4][16][16];

void probe_loop() {
  alignas(64) static int8_t a[64][1024];  // 64 KB: past L1
  std::memset(a, 1, sizeof a);
  std::memset(g_b, 1, sizeof g_b);
  const long n = 3000000;
  for (int bf16 = 0; bf16 < 2; ++bf16)
    for (int bytes : {64, 32}) {
      configure(bytes);
      _tile_zero(3); _tile_zero(4); _tile_zero(1);
      _tile_loadd(2, g_b[0], 64);
      const auto t0 = std::chrono::steady_clock::now();
      for (long i = 0; i < n; ++i) {
        const int8_t* p = a[i & 63];
        if (bf16) {
          _tile_loadd(0, p, 64); _tile_dpbf16ps(3, 0, 2);
          _tile_loadd(0, p + 32, 64); _tile_dpbf16ps(4, 0, 2);
          _tile_loadd(0, p, 64); _tile_dpbf16ps(1, 0, 2);
        } else {
          _tile_loadd(0, p, 64); _tile_dpbssd(3, 0, 2);
          _tile_loadd(0, p + 32, 64); _tile_dpbssd(4, 0, 2);
          _tile_loadd(0, p, 64); _tile_dpbssd(1, 0, 2);
        }
      }
      _tile_stored(3, g_c[0], 64);
      std::printf("loop  %-9s %2d columns: %5.2f ns a load + multiply\n", bf16 ? "tdpbf16ps" : "tdpbssd",
                  bf16 ? bytes / 2 : bytes, ns_since(t0, 3 * n));
    }
}

// One group per iteration: tiles of A at a, a + ps, a + 2 ps (stride st), B from g_b, C zeroed and stored.
template <bool TWO_B>
double rows_run(const int8_t* base, int64_t st, int64_t ps, int64_t group_step, int64_t groups, long reps) {
  configure(64);
  long n = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (long r = 0; r < reps; ++r)
    for (int64_t g = 0; g < groups; ++g, ++n) {
      const int8_t* a = base + g * group_step;
      _tile_zero(3);
      _tile_loadd(2, g_b[0], 64);
      if constexpr (TWO_B) {
        _tile_zero(4);
        _tile_loadd(6, g_b[1], 64);
      }
      _tile_loadd(0, a, st); _tile_dpbf16ps(3, 0, 2);
      if constexpr (TWO_B) _tile_dpbf16ps(4, 0, 6);
      _tile_loadd(1, a + ps, st); _tile_dpbf16ps(3, 1, 2);
      if constexpr (TWO_B) _tile_dpbf16ps(4, 1, 6);
      _tile_loadd(0, a + 2 * ps, st); _tile_dpbf16ps(3, 0, 2);
      if constexpr (TWO_B) _tile_dpbf16ps(4, 0, 6);
      _tile_stored(3, g_c[g & 3], 64);
      if constexpr (TWO_B) _tile_stored(4, g_c[(g + 1) & 3], 64);
    }
  return ns_since(t0, n * (TWO_B ? 6 : 3));
}

void probe_rows() {
  std::mt19937_64 rng(1);
  for (int i = 0; i < 1024; i += 2) g_b[0][i] = g_b[1][i] = int8_t(rng()), g_b[0][i + 1] = g_b[1][i + 1] = 0x40;
  for (int64_t K : {128, 768, 4096, 14336}) {
    const int64_t width = 2 * K, ps = width + 64, row = 3 * ps, groups = width / 64;
    std::vector<int8_t> buf(size_t(16 * row + 192));
    for (size_t i = 0; i + 1 < buf.size(); i += 2) buf[i] = int8_t(rng()), buf[i + 1] = int8_t(0x3f + (rng() % 2) * 0x80);
    int8_t* line = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    const long reps = long(100000000 / (K * 16 * 6)) + 1;
    std::printf("rows  K = %5lld (%.2f MB of A), ns a multiply:", static_cast<long long>(K), 16.0 * double(row) / 1e6);
    for (int off : {0, 16, 32})
      std::printf("  +%d B: strided %5.2f contiguous %5.2f", off,
                  rows_run<false>(line + off, row, ps, 64, groups, reps),
                  rows_run<false>(line + off, 64, 1024, 3072, std::min<int64_t>(groups, 16 * row / 3072), reps));
    std::printf("  two B a load (+0 B, strided): %5.2f\n", rows_run<true>(line, row, ps, 64, groups, reps));
  }
}

float bf(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t to_bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}

void probe_order() {
  configure(64);
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<float> d(-2.f, 2.f);
  alignas(64) uint16_t A[16][32], B[16][32];
  alignas(64) float C0[16][16], C[16][16];
  const char* names[5] = {"even then odd product", "odd then even", "each pair summed, then added",
                          "each pair and the sum rounded once", "the whole row in double, rounded once"};
  long differ[5] = {}, total = 0;
  for (int it = 0; it < 2000; ++it) {
    for (auto& r : A)
      for (auto& v : r) v = to_bf(std::ldexp(d(rng), int(rng() % 20) - 10));
    for (auto& r : B)
      for (auto& v : r) v = to_bf(float(int(rng() % 31) - 15));  // q - z
    for (auto& r : C0)
      for (auto& v : r) v = it % 2 ? std::ldexp(d(rng), int(rng() % 20) - 10) : 0.f;
    _tile_loadd(1, C0, 64); _tile_loadd(0, A, 64); _tile_loadd(2, B, 64);
    _tile_dpbf16ps(1, 0, 2);
    _tile_stored(1, C, 64);
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n, ++total) {
        float e[5] = {C0[m][n], C0[m][n], C0[m][n], C0[m][n], 0.f};
        double whole = C0[m][n];
        for (int k = 0; k < 16; ++k) {
          const float p0 = bf(A[m][2 * k]) * bf(B[k][2 * n]), p1 = bf(A[m][2 * k + 1]) * bf(B[k][2 * n + 1]);
          e[0] = (e[0] + p0) + p1;
          e[1] = (e[1] + p1) + p0;
          e[2] = e[2] + (p0 + p1);
          e[3] = float(double(e[3]) + double(p0) + double(p1));
          whole += double(p0) + double(p1);
        }
        e[4] = float(whole);
        for (int v = 0; v < 5; ++v) differ[v] += std::memcmp(&e[v], &C[m][n], 4) != 0;
      }
  }
  for (int v = 0; v < 5; ++v)
    std::printf("order %-40s differs in %ld of %ld outputs\n", names[v], differ[v], total);
}

}  // namespace

int main(int argc, char** argv) {
  // Linux hands out the tile state on request: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
    std::fprintf(stderr, "amx_tile_probe: the OS did not grant the AMX tile state\n");
    return 1;
  }
  const std::string what = argc > 1 ? argv[1] : "all";
  if (what != "all" && what != "loop" && what != "rows" && what != "order") {
    std::fprintf(stderr, "usage: amx_tile_probe [loop|rows|order]\n");
    return 2;
  }
  if (what == "all" || what == "loop") probe_loop();
  if (what == "all" || what == "rows") probe_rows();
  if (what == "all" || what == "order") probe_order();
}
