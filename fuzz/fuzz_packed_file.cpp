// libFuzzer harness for the packed weight file (include/qmoe/packed_file.h).
//
// Input: one control byte, then the file. Control bit 0 set: the harness rewrites the payload and
// header XXH64 fields to match the (mutated) bytes before use, so mutations reach the field decoder,
// the blob table and the backends' from_blobs() instead of stopping at the checksum; bit 1 also sets
// payload_bytes to what the file holds. Then:
//   1. decode_packed_header on the bytes in memory (header codec entry point);
//   2. inspect_packed on the file (`qmoe inspect`), including its printer;
//   3. load_packed into the reference and the CPU backend; a layer that loads is run on 2 tokens and
//      every output byte is read.
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "fuzz_util.h"
#include "qmoe/layer.h"
#include "qmoe/packed_file.h"

namespace {

uint64_t get64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}
void put64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i));
}

// Offsets in the 64-byte prelude (docs/FORMAT.md "Packed file header").
constexpr size_t kHeaderBytesAt = 16, kPayloadBytesAt = 24, kPayloadHashAt = 32, kHeaderHashAt = 40;

void fix_checksums(std::vector<uint8_t>& f, bool fix_payload_size) {
  if (f.size() < 64) return;
  const uint64_t hb = get64(f.data() + kHeaderBytesAt);
  if (hb < 64 || hb > f.size()) return;
  if (fix_payload_size) put64(f.data() + kPayloadBytesAt, f.size() - hb);
  put64(f.data() + kPayloadHashAt, qmoe::xxhash64(f.data() + hb, f.size() - hb));
  put64(f.data() + kHeaderHashAt, 0);
  put64(f.data() + kHeaderHashAt, qmoe::xxhash64(f.data(), hb));
}

void tiny_run(qmoe::Backend& be, const qmoe::PackedExperts& p) {
  const qmoe::MoeSpec& s = p.spec();
  if (s.num_experts > 4096 || s.hidden > 65536 || s.inter > 65536) return;  // (harness: no overflow below)
  const int64_t work = s.num_experts * (s.fc1_rows() + 2 * s.inter) * s.hidden;
  if (work <= 0 || work > (int64_t(1) << 20)) return;
  const int64_t T = 2;
  qmoe::Tensor x(s.act_dtype, {T, s.hidden}), logits(s.act_dtype, {T, s.num_experts});
  for (int64_t i = 0; i < x.numel(); ++i) qmoe::store_from_float(s.act_dtype, x.data(), i, float(i % 7) - 3.f);
  for (int64_t i = 0; i < logits.numel(); ++i) qmoe::store_from_float(s.act_dtype, logits.data(), i, float(i % 5));
  qmoe::MoeInputs in;
  in.input = x.view();
  in.router_probs = logits.view();
  qmoe::Tensor y(s.act_dtype, {T, s.hidden});
  be.run(p, in, y);
  uint64_t sum = 0;
  for (size_t i = 0; i < y.nbytes(); ++i) sum += static_cast<const uint8_t*>(y.data())[i];
  (void)sum;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t control = data[0];
  std::vector<uint8_t> file(data + 1, data + size);
  if (control & 1) fix_checksums(file, (control & 2) != 0);

  bool known = false;
  FUZZ_GUARD({
    const qmoe::PackedHeader h = qmoe::decode_packed_header(file.data(), file.size(), file.size(), "<fuzz>");
    known = qmoe_fuzz::skip_known() && qmoe_fuzz::spec_dims_known_overflow(h.spec.num_experts, h.spec.hidden,
                                                                          h.spec.inter, h.spec.block_size);
    // Whatever decodes must be within the file.
    for (const qmoe::PackedBlobEntry& b : h.blobs)
      if (b.offset > file.size() || b.nbytes > file.size() - b.offset) {
        __builtin_fprintf(stderr, "FINDING: decoded blob '%s' lies outside the file\n", b.name.c_str());
        std::abort();
      }
  });

  const std::string& dir = qmoe_fuzz::scratch_dir("packed_file");
  const std::string path = qmoe_fuzz::write_file(dir, "in.qmoepk", file.data(), file.size());
  FUZZ_GUARD({
    const qmoe::PackedFileInfo info = qmoe::inspect_packed(path);
    (void)info.to_string();
  });

  static std::unique_ptr<qmoe::Backend> reference = qmoe::make_reference_backend();
  static std::unique_ptr<qmoe::Backend> cpu = [] {
    qmoe::CpuBackendOptions o;
    o.threads = 1;
    return qmoe::make_cpu_backend(o);
  }();
  if (known) return 0;  // QMOE_FUZZ_SKIP_KNOWN: F3 (fuzz/FINDINGS.md)
  for (qmoe::Backend* be : {reference.get(), cpu.get()}) {
    FUZZ_GUARD({
      std::unique_ptr<qmoe::PackedExperts> p = qmoe::load_packed(path, *be);
      tiny_run(*be, *p);
    });
  }
  return 0;
}
