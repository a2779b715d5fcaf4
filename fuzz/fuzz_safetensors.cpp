// libFuzzer harness for the safetensors reader and the two parsers built on it
// (include/qmoe/safetensors.h, include/qmoe/checkpoint.h).
//
// The input is written to <scratch>/in.safetensors (the reader memory-maps a path), then:
//   1. SafetensorsFile::open; every entry is looked up and every computable tensor read byte by byte
//      (a view that reaches past the mapping is an ASan report);
//   2. read_raw_safetensors (qmoe's raw QMoE file): a layer it returns must validate, and small ones
//      run through the reference oracle;
//   3. open_checkpoint_layer for layers 0 and 1 (Hugging Face naming detection), converting expert 0.
#include <cstdlib>
#include <optional>

#include "fuzz_common_run.h"
#include "fuzz_util.h"
#include "qmoe/checkpoint.h"
#include "qmoe/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& dir = qmoe_fuzz::scratch_dir("safetensors");
  const std::string path = qmoe_fuzz::write_file(dir, "in.safetensors", data, size);

  FUZZ_GUARD({
    const qmoe::SafetensorsFile f = qmoe::SafetensorsFile::open(path);
    (void)f.metadata().size();
    for (const std::string& n : f.names()) {
      const qmoe::SafetensorsEntry& e = f.entry(n);
      if (e.end < e.begin) {
        __builtin_fprintf(stderr, "FINDING: entry '%s' has end < begin\n", n.c_str());
        std::abort();
      }
      if (!e.dtype) continue;
      try {
        const qmoe::Tensor t = f.tensor(n);
        if (t.nbytes() != e.end - e.begin) {
          __builtin_fprintf(stderr, "FINDING: tensor '%s' has %zu bytes, entry says %llu\n", n.c_str(), t.nbytes(),
                            (unsigned long long)(e.end - e.begin));
          std::abort();
        }
        (void)qmoe_fuzz::touch_bytes(t);
      } catch (const qmoe::Error&) {
      }
    }
  });

  bool known = false;
  if (qmoe_fuzz::skip_known()) {
    // F3 (fuzz/FINDINGS.md): a raw file's metadata can declare E/H/I/block_size past 2^31.
    try {
      const qmoe::SafetensorsFile f = qmoe::SafetensorsFile::open(path);
      for (const char* key : {"num_experts", "hidden_size", "inter_size", "block_size"}) {
        auto it = f.metadata().find(key);
        if (it == f.metadata().end()) continue;
        const long long v = std::strtoll(it->second.c_str(), nullptr, 10);
        if (qmoe_fuzz::spec_dims_known_overflow(v, 0, 0, 0) || v < -(1ll << 31)) known = true;
        // Values strtoll cannot hold saturate to LLONG_MAX/LLONG_MIN and are caught above.
      }
    } catch (const std::exception&) {
    }
  }
  if (!known) FUZZ_GUARD({
    qmoe::RawLayer r = qmoe::read_raw_safetensors(path);
    try {
      r.spec.validate();
      qmoe::validate_raw(r.spec, r.raw);
    } catch (const std::exception& e) {
      __builtin_fprintf(stderr, "FINDING: read_raw_safetensors returned a layer that fails validation: %s\n", e.what());
      std::abort();
    }
    (void)qmoe_fuzz::touch_raw(r.raw);
    if (r.router_weight) (void)qmoe_fuzz::touch_bytes(*r.router_weight);
    if (r.router_bias) (void)qmoe_fuzz::touch_bytes(*r.router_bias);
    qmoe_fuzz::tiny_reference_run(r.spec, r.raw, 2, uint32_t(size));
  });

  for (int64_t layer : {0, 1}) {
    FUZZ_GUARD({
      qmoe::CheckpointLayer c = qmoe::open_checkpoint_layer(path, layer);
      (void)c.summary();
      // Bounded: the tensors live in a file of at most max_len bytes.
      if (c.num_experts > 0 && c.hidden * c.inter <= (int64_t(1) << 16)) {
        qmoe::ExpertWeights w = c.expert(0);
        (void)qmoe_fuzz::touch_bytes(w.gate);
        (void)qmoe_fuzz::touch_bytes(w.up);
        (void)qmoe_fuzz::touch_bytes(w.down);
      }
      (void)qmoe_fuzz::touch_bytes(c.router_weight());
      (void)qmoe_fuzz::touch_bytes(c.router_bias());
    });
  }
  return 0;
}
