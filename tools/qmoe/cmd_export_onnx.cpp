// qmoe export-onnx: a raw QMoE .safetensors file (qmoe quantize's output) -> a one-node
// com.microsoft::QMoE model that ONNX Runtime runs (issue 6 item 3). Raw weights, weights_prepacked
// = 0, attributes from the file's metadata, the source facts as the model's metadata_props.
//
// export_onnx writes atomically (external data first, then the model; neither is left on failure).
// Initializers over 2 GB together go to "<model>.data" next to the model (protobuf's message limit);
// --external-data forces that for smaller layers too.
#include <cstdio>
#include <filesystem>
#include <memory>

#include "commands.h"
#include "progress.h"
#include "qmoe/checkpoint.h"
#include "qmoe/error.h"
#include "qmoe/onnx_export.h"

namespace qmoe::cli {

namespace {

struct ExportArgs {
  std::string input, output;
  std::string node_name = "QMoE";
  bool router_weights = false;
  bool external_data = false;
  bool json = false, quiet = false;
};

void export_command(const ExportArgs& a) {
  require_input_file("RAW", a.input);
  require_writable_output("-o", a.output);
  require_distinct(a.input, "-o", a.output);
  const FileKind kind = detect_file_kind(a.input);
  if (kind == FileKind::onnx)
    throw Error("RAW " + a.input + ": is not a safetensors file; export-onnx takes the raw .safetensors written by qmoe quantize");
  if (kind == FileKind::packed)
    throw Error("RAW " + a.input +
                ": is a qmoe packed weight file (one backend's layout); export-onnx takes the raw .safetensors it was packed from");
  if (kind == FileKind::checkpoint)
    throw Error("RAW " + a.input + ": is a Hugging Face checkpoint, not a quantized layer; quantize it first: qmoe quantize " +
                a.input + " --layer N -o raw.safetensors");

  Progress progress("export-onnx: reading " + a.input, 0, !a.quiet);
  RawLayer L = read_raw_safetensors(a.input);
  OnnxExportOptions opt;
  opt.node_name = a.node_name;
  if (a.router_weights) opt.router_weights_name = "router_weights";
  if (a.external_data) opt.external_data_threshold = 0;
  opt.metadata = L.metadata;
  opt.metadata["producer"] = writer_string();
  progress.phase("export-onnx: writing " + a.output);
  Stopwatch clock;
  export_onnx(a.output, L.spec, L.raw, opt);
  const double write_ms = clock.ms();
  progress.finish();

  namespace fs = std::filesystem;
  std::error_code ec;
  const double model_bytes = double(fs::file_size(a.output, ec));
  const std::string data_path = a.output + ".data";
  const bool has_data = fs::exists(data_path, ec);
  if (a.json) {
    nlohmann::json j;
    j["input"] = a.input;
    j["output"] = a.output;
    j["spec"] = spec_json(L.spec);
    j["node"] = a.node_name;
    j["model_bytes"] = model_bytes;
    if (has_data) j["external_data"] = {{"path", data_path}, {"bytes", double(fs::file_size(data_path, ec))}};
    j["time_ms"] = write_ms;
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("%s: %s\n", a.input.c_str(), L.spec.to_string().c_str());
    std::printf("wrote %s (%s%s) in %.1f ms: node %s, com.microsoft::QMoE, weights_prepacked = 0\n", a.output.c_str(),
                human_bytes(model_bytes).c_str(), has_data ? (" + " + data_path).c_str() : "", write_ms,
                a.node_name.c_str());
  }
}

}  // namespace

Subcommand add_export_onnx(CLI::App& root) {
  auto args = std::make_shared<ExportArgs>();
  CLI::App* app = root.add_subcommand(
      "export-onnx", "Write a raw QMoE .safetensors file as a one-node com.microsoft::QMoE ONNX model");
  app->footer(
      "Examples:\n"
      "  qmoe export-onnx layer3.safetensors -o layer3.onnx\n"
      "  qmoe export-onnx layer3.safetensors -o layer3.onnx --external-data   # weights in layer3.onnx.data\n"
      "Graph inputs: input [tokens, H], router_probs [tokens, E] (+ router_weights); output: output.\n");
  app->add_option("RAW", args->input, "Raw .safetensors written by qmoe quantize")->required();
  app->add_option("-o,--output", args->output, "ONNX model to write (atomically)")->required();
  app->add_option("--node-name", args->node_name, "Name of the QMoE node")->capture_default_str();
  app->add_flag("--router-weights", args->router_weights,
                "Add the optional graph input router_weights (operator input 14: mixing weights apart from the logits)");
  app->add_flag("--external-data", args->external_data,
                "Store the weights in <model>.data next to the model (automatic above 2 GB)");
  app->add_flag("--json", args->json, "Print a JSON summary instead of text");
  add_quiet_flag(*app, args->quiet);
  return {app, [args] { export_command(*args); }};
}

}  // namespace qmoe::cli
