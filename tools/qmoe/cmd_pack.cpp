// qmoe pack: raw weights (ONNX model or qmoe raw .safetensors) -> one backend's packed layout -> a
// packed file (issue 3 item 4), so start-up loads the kernel's layout without repacking.
//
// The target names a backend (or, as load_packed's "repack for target X" hint spells it, the target
// of its layout: "any" is the reference backend's raw layout, "cuda-sm80" the CUDA backend's). The
// layout written is whatever that backend's prepack() produces on this machine -- the same bytes
// `qmoe run` would compute at load -- and save_packed writes it atomically (temporary file, fsync,
// rename), so a failure at any step leaves no file under -o.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "commands.h"
#include "progress.h"
#include "qmoe/error.h"
#include "qmoe/layer.h"
#include "qmoe/packed_file.h"

namespace qmoe::cli {

namespace {

struct PackArgs {
  std::string model, output;
  std::string target = "auto";
  std::string weights_layout = "detect";
  bool weights_layout_given = false;
  int threads = 0;
  bool json = false, quiet = false;
};

// --target value -> backend name. Layout targets are accepted as aliases so the hint in
// load_packed's wrong-layout error can be pasted as is.
std::string backend_for_target(const std::string& target) {
  if (target == "any") return "reference";
  if (target == "cuda-sm80") return "cuda";
  return target;  // auto, cpu, reference, cuda
}

void pack_command(const PackArgs& a) {
  require_input_file("MODEL", a.model);
  require_writable_output("-o", a.output);
  require_distinct(a.model, "-o", a.output);
  const FileKind kind = detect_file_kind(a.model);

  LayerOptions lopt;
  lopt.threads = a.threads;
  const std::string backend_name = backend_for_target(a.target);
  if (backend_name == "cuda") {
    const auto avail = available_backends();
    if (std::find(avail.begin(), avail.end(), "cuda") == avail.end())
      throw Error("--target " + a.target +
                  ": the CUDA layout is packed on the GPU, and this machine has none (or this qmoe was built without "
                  "CUDA); run qmoe pack on the machine that will serve the model");
  }
  std::unique_ptr<Backend> backend = make_backend(backend_name, lopt);

  Progress progress("pack: loading " + a.model, 0, !a.quiet);
  Stopwatch load_clock;
  RawModel m = load_raw_model("MODEL", a.model, kind, a.weights_layout, a.weights_layout_given);
  const double load_ms = load_clock.ms();
  const MoeSpec spec = m.spec;
  const double raw_bytes = double(m.raw.nbytes());

  progress.phase("pack: prepacking for " + backend->name());
  Stopwatch prepack_clock;
  std::unique_ptr<PackedExperts> packed = backend->prepack(spec, std::move(m.raw));
  const double prepack_ms = prepack_clock.ms();

  progress.phase("pack: writing " + a.output);
  Stopwatch write_clock;
  save_packed(a.output, *packed, writer_string());
  const double write_ms = write_clock.ms();
  progress.finish();
  std::error_code ec;
  const double file_bytes = double(std::filesystem::file_size(a.output, ec));

  if (a.json) {
    nlohmann::json j;
    j["model"] = a.model;
    j["output"] = a.output;
    j["spec"] = spec_json(spec);
    j["backend"] = backend->name();
    j["layout"] = {{"name", packed->tag().name}, {"version", packed->tag().version}, {"target", packed->tag().target}};
    j["raw_bytes"] = raw_bytes;
    j["resident_bytes"] = packed->resident_bytes();
    j["file_bytes"] = file_bytes;
    j["time_ms"] = {{"load", load_ms}, {"prepack", prepack_ms}, {"write", write_ms}};
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("%s (%s): %s\n", a.model.c_str(), std::string(file_kind_name(kind)).c_str(), spec.to_string().c_str());
    std::printf("layout %s for backend %s\n", packed->tag().to_string().c_str(), backend->name().c_str());
    std::printf("raw %s -> packed %s, file %s\n", human_bytes(raw_bytes).c_str(),
                human_bytes(double(packed->resident_bytes())).c_str(), human_bytes(file_bytes).c_str());
    std::printf("load %.1f ms, prepack %.1f ms (%.2f GB/s), write %.1f ms\n", load_ms, prepack_ms,
                prepack_ms > 0 ? raw_bytes / prepack_ms / 1e6 : 0.0, write_ms);
    std::printf("wrote %s\n", a.output.c_str());
  }
}

}  // namespace

Subcommand add_pack(CLI::App& root) {
  auto args = std::make_shared<PackArgs>();
  CLI::App* app = root.add_subcommand("pack", "Prepack raw weights for one backend and write a packed file (fast start)");
  app->footer(
      "Examples:\n"
      "  qmoe pack layer.onnx --target cpu -o layer.cpu.qmoe\n"
      "  qmoe pack raw.safetensors --target auto -o layer.qmoe\n"
      "  qmoe run layer.cpu.qmoe --backend cpu --input x.npy --router-probs logits.npy --output y.npy\n"
      "The file holds the target backend's layout; loading it on another backend is refused.\n");
  app->add_option("MODEL", args->model, "ONNX model (one com.microsoft::QMoE node) or qmoe raw .safetensors")->required();
  app->add_option("-o,--output", args->output, "Packed file to write (atomically)")->required();
  app->add_option("--target", args->target,
                  "Backend whose layout to write: auto (the best here), cpu, reference, cuda; "
                  "or a layout target as printed by qmoe inspect (any = reference, cuda-sm80 = cuda)")
      ->check(CLI::IsMember({"auto", "cpu", "reference", "cuda", "any", "cuda-sm80"}))
      ->capture_default_str();
  app->add_option("--threads", args->threads, "CPU threads for prepacking; 0 = all cores")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  app->add_option("--weights-layout", args->weights_layout,
                  "Layout of an ONNX model's fc1/fc2 bytes: raw, ort-cuda (ORT's CUDA prepacked), or detect")
      ->check(CLI::IsMember({"detect", "raw", "ort-cuda"}))
      ->capture_default_str()
      ->each([args](const std::string&) { args->weights_layout_given = true; });
  app->add_flag("--json", args->json, "Print a JSON summary instead of text");
  add_quiet_flag(*app, args->quiet);
  return {app, [args] { pack_command(*args); }};
}

}  // namespace qmoe::cli
