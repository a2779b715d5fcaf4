// The weight side of a random pair job for the CPU pair-kernel tests: two packed 16-row tiles of
// codes, per-block scales and optional zero points (cpu_layout.h), and the float64 weight of any
// element, written from the packed format's definition. Each kernel test adds its own activation rows.
// Also two checks every compute mode's kernels must pass, for a test's case type.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_layout.h"
#include "qmoe/dtype.h"
#include "test_seed.h"

namespace qmoe::test {

struct RandomPairWeights {
  int bits = 4;
  int64_t K = 0, block = 0;  // block 0: row-wise
  DType sdt = DType::f32;
  bool zp[2] = {false, false};
  int64_t J = 0, nb = 1, block_bytes = 0;
  std::vector<uint8_t> codes[2], zeros[2];
  std::vector<uint8_t> scales[2];  // [nb][16] of sdt

  std::string weights_str() const {
    std::ostringstream os;
    os << "int" << bits << " K=" << K << " block=" << block << " scales=" << dtype_name(sdt) << " zp=" << zp[0] << zp[1];
    return os.str();
  }

  // A random shape for `bits` and `block`: odd K, short (under 80 columns, sometimes under one block) for
  // rep < 2, else up to ~2000 columns; random scale type and zero points.
  void random_shape(std::mt19937_64& rng, int bits_, int64_t block_, int rep) {
    static constexpr DType kScaleTypes[] = {DType::f32, DType::f16, DType::bf16};
    bits = bits_, block = block_;
    K = 2 * int64_t(rng() % (rep == 0 ? 4 : rep == 1 ? 40 : 1000)) + 1;  // rep 0: rows of 1..7 columns
    sdt = kScaleTypes[rng() % 3];
    zp[0] = rng() % 2, zp[1] = rng() % 2;
  }

  // Random codes, signed scales of magnitude ~1/K and zero points for the shape set above.
  void make_weights(std::mt19937_64& rng) {
    const int pack = 8 / bits;
    J = (K + pack - 1) / pack;
    J += J % 2;
    nb = block ? (K + block - 1) / block : 1;
    block_bytes = block ? block / pack : J;
    std::uniform_real_distribution<float> sd(0.25f, 2.f);
    for (int tile = 0; tile < 2; ++tile) {
      codes[tile].resize(size_t(J * cpu::kTileRows));
      for (auto& c : codes[tile]) c = uint8_t(rng());
      scales[tile].resize(size_t(nb * cpu::kTileRows) * dtype_size(sdt));
      for (int64_t i = 0; i < nb * cpu::kTileRows; ++i) {
        const float s = (rng() & 1 ? 1.f : -1.f) * sd(rng) / float(K);
        store_from_float(sdt, scales[tile].data(), i, s);
      }
      zeros[tile].clear();
      if (zp[tile]) {
        zeros[tile].resize(size_t(nb * cpu::kTileRows));
        for (auto& z : zeros[tile]) z = uint8_t(rng() & ((1u << bits) - 1));
      }
    }
  }

  // The job's weight fields (codes, scales, zero points and shapes).
  void fill(cpu::PairJob& jb) const {
    for (int tile = 0; tile < 2; ++tile) {
      jb.codes[tile] = codes[tile].data();
      jb.scales[tile] = scales[tile].data();
      jb.zero_points[tile] = zp[tile] ? zeros[tile].data() : nullptr;
    }
    jb.jbytes = J, jb.nb = nb, jb.block_bytes = block_bytes, jb.K = K, jb.bits = bits, jb.scale_dtype = sdt;
  }

  // w = s * (q - z) of lane l of `tile`, column c, in float64.
  double weight(int tile, int l, int64_t c) const {
    const int pack = 8 / bits, mask = (1 << bits) - 1;
    const int64_t b = block ? c / block : 0;
    const int q = (codes[tile][size_t((c / pack) * cpu::kTileRows + l)] >> ((c % pack) * bits)) & mask;
    const int z = zp[tile] ? zeros[tile][size_t(b * cpu::kTileRows + l)] : 1 << (bits - 1);
    return double(load_as_float(sdt, scales[tile].data(), b * cpu::kTileRows + l)) * double(q - z);
  }
};

inline cpu::PairKernel kernel_of(const cpu::KernelSet& ks, int bits) { return bits == 4 ? ks.w4 : ks.w8; }

// A token's result does not depend on the other tokens of its call (determinism across chunk sizes
// depends on it): each token alone gives bitwise what it gives in a full call. Case: a RandomPairWeights
// with its activation rows, `tokens`, make(rng) and job(acc).
template <class Case>
void expect_tokens_independent(const cpu::KernelSet& ks, std::mt19937_64& rng) {
  for (int bits : {4, 8})
    for (int64_t block : {int64_t(0), int64_t(32)}) {
      Case c;
      const int n = ks.tokens_per_call(bits);
      c.bits = bits, c.block = block, c.K = 301, c.zp[0] = true, c.tokens = n;
      c.make(rng);
      std::vector<float> all(size_t(n * cpu::kPairRows)), one(cpu::kPairRows);
      kernel_of(ks, bits)(c.job(all.data()));
      for (int t = 0; t < n; ++t) {
        cpu::PairJob jb = c.job(one.data());
        jb.tokens = 1, jb.x[0] = jb.x[t], jb.xb[0] = jb.xb[t], jb.xq[0] = jb.xq[t], jb.xneg_sum[0] = jb.xneg_sum[t];
        jb.xscale[0] = jb.xscale[t];
        kernel_of(ks, bits)(jb);
        ASSERT_EQ(std::memcmp(one.data(), all.data() + t * cpu::kPairRows, sizeof(float) * cpu::kPairRows), 0)
            << c.str() << " token " << t << " alone differs from the same token in a call of " << n << " (base seed "
            << base_seed() << ")";
      }
    }
}

// A pair with an infinite scale gives exactly the exact portable kernel's result (the fallback, on the
// fp32 rows).
template <class Case>
void expect_infinite_scale_falls_back(const cpu::KernelSet& ks, std::mt19937_64& rng) {
  for (int bits : {4, 8}) {
    Case c;
    c.bits = bits, c.block = 32, c.K = 97, c.tokens = 3;
    c.make(rng);
    store_from_float(c.sdt, c.scales[1].data(), 1 * cpu::kTileRows + 5, -INFINITY);
    std::vector<float> got(size_t(3 * cpu::kPairRows)), want(size_t(3 * cpu::kPairRows));
    kernel_of(ks, bits)(c.job(got.data()));
    cpu::portable_kernels().w4(c.job(want.data()));  // the portable kernel serves every bit width
    ASSERT_EQ(std::memcmp(got.data(), want.data(), sizeof(float) * got.size()), 0) << c.str();
  }
}

}  // namespace qmoe::test
