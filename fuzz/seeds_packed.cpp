// Seed files for fuzz_packed_file, written with the library's own writer (save_packed) so they are
// exactly what `qmoe pack` produces. Part of make_seeds (see make_seeds.cpp).
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "qmoe/layer.h"
#include "qmoe/packed_file.h"
#include "qmoe/synthetic.h"

namespace qmoe_fuzz {

std::vector<qmoe::MoeSpec> seed_specs();

namespace {
// The fuzz input for fuzz_packed_file is <control byte><file>; control 3 = fix both checksums.
void emit(const std::string& file, const std::string& out, uint8_t control) {
  std::ifstream in(file, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::ofstream o(out, std::ios::binary);
  o.put(char(control));
  o.write(bytes.data(), std::streamsize(bytes.size()));
}
}  // namespace

void write_packed_seeds(const std::string& dir) {
  int n = 0;
  for (const qmoe::MoeSpec& s : seed_specs()) {
    qmoe::SyntheticLayer l = qmoe::make_synthetic_layer(s, {.seed = uint64_t(n + 1), .tokens = 2});
    const char* backends[] = {"reference", "cpu"};
    for (const char* b : backends) {
      auto be = qmoe::make_backend(b, qmoe::LayerOptions{.backend = b, .prepack = true, .threads = 1});
      auto packed = be->prepack(s, l.raw);
      const std::string tmp = dir + "/.tmp.qmoepk";
      qmoe::save_packed(tmp, *packed, "qmoe-fuzz-seed");
      const std::string base = dir + "/" + b + "_" + std::to_string(n);
      emit(tmp, base + "_fixed", 3);  // checksums recomputed by the harness
      if (n < 2) emit(tmp, base + "_asis", 0);  // exactly as written
      std::remove(tmp.c_str());
    }
    ++n;
  }
}

}  // namespace qmoe_fuzz
