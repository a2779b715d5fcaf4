// qmoe run: one forward pass of a QMoE layer over .npy inputs, output to .npy.
//
// MODEL is an ONNX file, a qmoe raw .safetensors file (both prepacked at load for the backend), or a
// packed file from `qmoe pack` (told apart by its magic bytes, loaded with load_packed: every header
// field and the payload checksum are checked, and a file packed for another backend is refused with
// the library's error naming both layouts).
//
// Inputs are checked against the model before any work: the files exist, the output directory is
// writable, and every tensor's dtype is the model's T (qmoe never converts activations silently:
// an fp16 input to an fp32 model is an error naming both). The output is written atomically.
#include <cstdio>
#include <memory>
#include <optional>

#include "commands.h"
#include "progress.h"
#include "qmoe/error.h"
#include "qmoe/inputs.h"
#include "qmoe/layer.h"
#include "qmoe/npy.h"
#include "qmoe/packed_file.h"

namespace qmoe::cli {

namespace {

struct RunArgs {
  std::string model, input, router_probs, router_weights, output;
  std::string weights_layout = "detect";
  bool weights_layout_given = false;
  bool bf16 = false;
  bool json = false, quiet = false;
  BackendFlags backend;
};

Tensor read_input(const std::string& flag, const std::string& path, const MoeSpec& spec, bool bf16) {
  // A bf16 model's inputs can only be stored as uint16 bit patterns, so such a model implies --bf16.
  NpyReadOptions opt;
  opt.uint16_as_bf16 = bf16 || spec.act_dtype == DType::bf16;
  Tensor t = read_npy(path, opt);
  if (t.dtype() != spec.act_dtype)
    throw Error(flag + " " + path + ": dtype " + std::string(dtype_name(t.dtype())) + " does not match the model's T = " +
                std::string(dtype_name(spec.act_dtype)));
  return t;
}

void run_command(const RunArgs& a) {
  require_input_file("MODEL", a.model);
  require_input_file("--input", a.input);
  require_input_file("--router-probs", a.router_probs);
  if (!a.router_weights.empty()) require_input_file("--router-weights", a.router_weights);
  require_writable_output("--output", a.output);

  const LayerOptions lopt = layer_options(a.backend);
  std::unique_ptr<Backend> backend = make_backend(lopt.backend, lopt);

  // Raw weights are prepacked here, after the inputs are checked; a packed file is ready once loaded.
  const FileKind kind = detect_file_kind(a.model);
  std::optional<RawModel> model;
  std::unique_ptr<PackedExperts> packed;
  Progress progress("run: loading " + a.model, 0, !a.quiet);
  Stopwatch load_clock;
  if (kind == FileKind::packed) {
    if (a.weights_layout_given && a.weights_layout != "detect")
      throw Error("--weights-layout " + a.weights_layout + ": applies to ONNX models only; MODEL " + a.model +
                  " is a qmoe packed weight file");
    if (a.backend.no_prepack)
      throw Error("--no-prepack: MODEL " + a.model +
                  " is a qmoe packed file, already in a backend's packed layout; --no-prepack applies to raw weights "
                  "(run the ONNX model or raw .safetensors it was packed from)");
    packed = load_packed(a.model, *backend);
  } else {
    model = load_raw_model("MODEL", a.model, kind, a.weights_layout, a.weights_layout_given);
  }
  const double load_ms = load_clock.ms();
  const MoeSpec spec = packed ? packed->spec() : model->spec;

  const Tensor x = read_input("--input", a.input, spec, a.bf16);
  const Tensor logits = read_input("--router-probs", a.router_probs, spec, a.bf16);
  std::optional<Tensor> rw;
  if (!a.router_weights.empty()) rw = read_input("--router-weights", a.router_weights, spec, a.bf16);
  MoeInputs inputs{x.view(), logits.view(), std::nullopt};
  if (rw) inputs.router_weights = rw->view();
  try {
    validate_inputs(spec, inputs);
  } catch (const Error& e) {
    // The library names the tensor (input, router_probs, router_weights); add the file it came from.
    const std::string what = e.what();
    auto starts = [&](const char* p) { return what.rfind(p, 0) == 0; };
    const std::string from = starts("router_probs")   ? "--router-probs " + a.router_probs
                             : starts("router_weights") ? "--router-weights " + a.router_weights
                                                        : "--input " + a.input;
    throw Error(what + " (from " + from + ")");
  }

  const size_t weight_bytes = packed ? packed->resident_bytes() : model->raw.nbytes();
  progress.phase("run: prepacking for " + backend->name());
  Stopwatch prepack_clock;
  if (!packed) packed = backend->prepack(spec, std::move(model->raw));
  const double prepack_ms = kind == FileKind::packed ? 0.0 : prepack_clock.ms();

  progress.phase("run: running");
  Tensor y(x.dtype(), x.shape());
  Stopwatch run_clock;
  backend->run(*packed, inputs, y);
  const double run_ms = run_clock.ms();
  write_npy(a.output, y.view());
  progress.finish();

  if (a.json) {
    nlohmann::json j;
    j["model"] = a.model;
    j["model_kind"] = kind == FileKind::packed ? "packed" : kind == FileKind::raw ? "raw-safetensors" : "onnx";
    if (model && !model->node_name.empty()) j["node"] = model->node_name;
    j["spec"] = spec_json(spec);
    j["backend"] = backend->name();
    j["layout"] = packed->tag().to_string();
    j["weight_bytes"] = weight_bytes;
    j["resident_bytes"] = packed->resident_bytes();
    j["rows"] = input_rows(inputs);
    j["output"] = {{"path", a.output}, {"shape", y.shape()}, {"dtype", std::string(dtype_name(y.dtype()))}};
    j["time_ms"] = {{"load", load_ms}, {"prepack", prepack_ms}, {"run", run_ms}};
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("%s (%s): %s\n", a.model.c_str(), std::string(file_kind_name(kind)).c_str(), spec.to_string().c_str());
    std::printf("backend %s (%s): load %.1f ms, prepack %.1f ms, run %.2f ms for %lld rows\n",
                backend->name().c_str(), packed->tag().to_string().c_str(), load_ms, prepack_ms,
                run_ms, static_cast<long long>(input_rows(inputs)));
    std::printf("wrote %s %s %s\n", a.output.c_str(), shape_str(y.shape()).c_str(),
                std::string(dtype_name(y.dtype())).c_str());
  }
}

}  // namespace

Subcommand add_run(CLI::App& root) {
  auto args = std::make_shared<RunArgs>();
  CLI::App* app = root.add_subcommand("run", "Run a QMoE layer (ONNX model, raw .safetensors or packed file) on .npy inputs");
  app->footer(
      "Examples:\n"
      "  qmoe run layer.onnx --input x.npy --router-probs logits.npy --output y.npy --backend cpu\n"
      "  qmoe run layer.cpu.qmoe --input x.npy --router-probs logits.npy --output y.npy --json\n"
      "Inputs must have the model's dtype T (float32, float16; bfloat16 as uint16 .npy).\n");
  app->add_option("MODEL", args->model,
                  "ONNX file holding one com.microsoft::QMoE node, qmoe raw .safetensors, or a packed file (qmoe pack)")
      ->required();
  app->add_option("--input", args->input, ".npy [rows, H] or [B, S, H] (input 0)")->required();
  app->add_option("--router-probs", args->router_probs, ".npy [rows, E] router logits (input 1)")->required();
  app->add_option("--router-weights", args->router_weights, ".npy [rows, E] mixing weights (input 14)");
  app->add_option("--output", args->output, ".npy file to write; written atomically")->required();
  add_backend_flags(*app, args->backend);
  app->add_option("--weights-layout", args->weights_layout,
                  "Layout of fc1/fc2 bytes: raw, ort-cuda (ORT's CUDA prepacked), or detect from the file")
      ->check(CLI::IsMember({"detect", "raw", "ort-cuda"}))
      ->capture_default_str()
      ->each([args](const std::string&) { args->weights_layout_given = true; });
  app->add_flag("--bf16", args->bf16, "Read uint16 .npy inputs as bfloat16 bit patterns (implied by a bf16 model)");
  app->add_flag("--json", args->json, "Print a JSON summary instead of text");
  add_quiet_flag(*app, args->quiet);
  return {app, [args] { run_command(*args); }};
}

}  // namespace qmoe::cli
