// libFuzzer harness for the ONNX loader (include/qmoe/onnx_model.h).
//
// load_onnx takes a path only, so each input is written to <scratch>/model.onnx. Next to it the
// harness keeps a fixed 64 KiB "weights.bin" (and a 100-byte "short.bin") so seeds with external data
// (location = "weights.bin", offset/length) exercise the external-data path, its bounds checks and its
// folder confinement. Every weights layout option is tried. A model that loads must pass validate_raw
// (the loader promises it), every byte of its tensors is read, and small layers are run through the
// reference oracle on a few tokens.
#include <optional>
#include <vector>

#include "fuzz_common_run.h"
#include "fuzz_util.h"
#include "qmoe/onnx_model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& dir = qmoe_fuzz::scratch_dir("onnx");
  static const bool init = [&] {
    std::vector<uint8_t> w(64 << 10);
    for (size_t i = 0; i < w.size(); ++i) w[i] = uint8_t(i * 131 + (i >> 8) * 7);
    // A few float-looking words so scale tensors read from it are finite and non-zero.
    qmoe_fuzz::write_file(dir, "weights.bin", w.data(), w.size());
    qmoe_fuzz::write_file(dir, "short.bin", w.data(), 100);
    return true;
  }();
  (void)init;
  const std::string path = qmoe_fuzz::write_file(dir, "model.onnx", data, size);
  for (qmoe::WeightsLayout layout : {qmoe::WeightsLayout::detect, qmoe::WeightsLayout::raw, qmoe::WeightsLayout::ort_cuda}) {
    qmoe::OnnxLoadOptions opt;
    opt.layout = layout;
    std::optional<qmoe::OnnxLayer> layer;
    FUZZ_GUARD(layer = qmoe::load_onnx(path, opt));
    if (!layer) continue;
    // The loader's promise: what it returns is valid. A throw here is a finding, not an outcome.
    try {
      layer->spec.validate();
      qmoe::validate_raw(layer->spec, layer->raw);
    } catch (const std::exception& e) {
      __builtin_fprintf(stderr, "FINDING: load_onnx returned a layer that fails validation: %s\n", e.what());
      std::abort();
    }
    (void)qmoe_fuzz::touch_raw(layer->raw);
    FUZZ_GUARD(qmoe_fuzz::tiny_reference_run(layer->spec, layer->raw, 3, uint32_t(size)));
  }
  return 0;
}
