// libFuzzer harness for sharded safetensors checkpoints: the model.safetensors.index.json parser,
// shard path confinement and the lazy shard opening (include/qmoe/safetensors.h).
//
// The input is split at the first "\n@@\n": the part before becomes <scratch>/ckpt/
// model.safetensors.index.json, the part after (if any) becomes the shard "model-00001.safetensors".
// The folder also holds a fixed valid shard "model-00002.safetensors" (tensors "b.weight" F32 [2, 2]
// and "b.bias" BF16 [2]), a non-safetensors file "notes.txt", and a subfolder "sub/" with another copy
// of the valid shard, so indexes can point inside, outside ("../", absolute), at folders and at junk.
// Every tensor listed is opened through the checkpoint and read byte by byte.
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_common_run.h"
#include "fuzz_util.h"
#include "qmoe/safetensors.h"

namespace {

std::vector<uint8_t> valid_shard() {
  const std::string header =
      R"({"b.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
      R"("b.bias":{"dtype":"BF16","shape":[2],"data_offsets":[16,20]},"__metadata__":{"format":"pt"}})";
  std::string h = header;
  while (h.size() % 8) h += ' ';
  std::vector<uint8_t> out(8 + h.size() + 20, 0);
  const uint64_t n = h.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, h.data(), h.size());
  const float w[4] = {1.f, -2.f, 0.5f, 3.f};
  std::memcpy(out.data() + 8 + h.size(), w, 16);
  const uint16_t b[2] = {0x3f80, 0xc000};
  std::memcpy(out.data() + 8 + h.size() + 16, b, 4);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& root = qmoe_fuzz::scratch_dir("safetensors_index");
  const std::string dir = root + "/ckpt";
  static const bool init = [&] {
    std::filesystem::create_directories(dir + "/sub");
    const std::vector<uint8_t> s = valid_shard();
    qmoe_fuzz::write_file(dir, "model-00002.safetensors", s.data(), s.size());
    qmoe_fuzz::write_file(dir + "/sub", "model-00002.safetensors", s.data(), s.size());
    qmoe_fuzz::write_file(root, "outside.safetensors", s.data(), s.size());
    qmoe_fuzz::write_file(dir, "notes.txt", "hello\n", 6);
    return true;
  }();
  (void)init;

  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const size_t cut = in.find("\n@@\n");
  const std::string_view index = in.substr(0, cut);
  qmoe_fuzz::write_file(dir, "model.safetensors.index.json", index.data(), index.size());
  const std::string shard1 = dir + "/model-00001.safetensors";
  if (cut != std::string_view::npos) {
    const std::string_view shard = in.substr(cut + 4);
    qmoe_fuzz::write_file(dir, "model-00001.safetensors", shard.data(), shard.size());
  } else {
    qmoe_fuzz::remove_file(shard1);
  }

  // Both ways in: the folder and the index file itself.
  for (const std::string& p : {dir, dir + "/model.safetensors.index.json"}) {
    FUZZ_GUARD({
      const qmoe::SafetensorsCheckpoint c = qmoe::SafetensorsCheckpoint::open(p);
      (void)c.folder();
      for (const std::string& n : c.names()) {
        if (!c.contains(n)) {
          __builtin_fprintf(stderr, "FINDING: names() lists '%s' but contains() denies it\n", n.c_str());
          std::abort();
        }
        try {
          const qmoe::SafetensorsFile& f = c.file_of(n);
          // The index may list a name its shard does not hold: entry() must throw, not crash.
          const qmoe::SafetensorsEntry& e = c.entry(n);
          (void)f.path();
          if (e.dtype) (void)qmoe_fuzz::touch_bytes(c.tensor(n));
        } catch (const qmoe::Error&) {
        }
      }
    });
  }
  return 0;
}
