// The weight side of a random pair job for the CPU pair-kernel tests: two packed 16-row tiles of
// codes, per-block scales and optional zero points (cpu_layout.h), and the float64 weight of any
// element, written from the packed format's definition. Each kernel test adds its own activation rows.
#pragma once

#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu/cpu_layout.h"
#include "qmoe/dtype.h"

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

}  // namespace qmoe::test
