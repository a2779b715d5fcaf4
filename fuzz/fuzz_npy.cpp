// libFuzzer harness for the .npy reader (include/qmoe/npy.h).
//
// Each input goes through both entry points: parse_npy (in memory) and read_npy (from a file, which
// reads the header and the data with separate read() calls). Both must agree: same outcome, and on
// success the same dtype, shape and bytes. Every byte of a returned tensor is read, so a tensor that
// claims more bytes than it owns shows up as an ASan report. Then the tensor is written back with
// write_npy and re-read: the round trip must reproduce it exactly.
#include <cstring>
#include <optional>

#include "fuzz_util.h"
#include "qmoe/npy.h"

namespace {

uint64_t touch(const qmoe::Tensor& t) {
  uint64_t s = 0;
  const auto* p = static_cast<const uint8_t*>(t.data());
  for (size_t i = 0; i < t.nbytes(); ++i) s += p[i];
  return s;
}

bool same(const qmoe::Tensor& a, const qmoe::Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && a.nbytes() == b.nbytes() &&
         (a.nbytes() == 0 || std::memcmp(a.data(), b.data(), a.nbytes()) == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& dir = qmoe_fuzz::scratch_dir("npy");
  const std::string path = qmoe_fuzz::write_file(dir, "in.npy", data, size);
  for (bool bf16 : {false, true}) {
    qmoe::NpyReadOptions opt;
    opt.uint16_as_bf16 = bf16;
    std::optional<qmoe::Tensor> mem, file;
    FUZZ_GUARD(mem = qmoe::parse_npy(data, size, opt));
    FUZZ_GUARD(file = qmoe::read_npy(path, opt));
    if (mem.has_value() != file.has_value()) {
      __builtin_fprintf(stderr, "FINDING: parse_npy %s but read_npy %s on the same bytes\n",
                        mem ? "accepts" : "rejects", file ? "accepts" : "rejects");
      std::abort();
    }
    if (!mem) continue;
    (void)touch(*mem);
    (void)touch(*file);
    if (!same(*mem, *file)) {
      __builtin_fprintf(stderr, "FINDING: parse_npy and read_npy return different tensors\n");
      std::abort();
    }
    // Round trip through the writer.
    const std::string out = dir + "/out.npy";
    std::optional<qmoe::Tensor> back;
    FUZZ_GUARD(qmoe::write_npy(out, mem->view()); back = qmoe::read_npy(out, opt));
    if (!back || !same(*mem, *back)) {
      __builtin_fprintf(stderr, "FINDING: write_npy/read_npy round trip %s\n", back ? "differs" : "failed");
      std::abort();
    }
  }
  return 0;
}
