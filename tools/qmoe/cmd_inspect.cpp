// qmoe inspect: what a file holds, without running anything.
//
//   packed file        inspect_packed(): header fields, spec, blob table, both checksums. A damaged file
//                      is still described (what can be trusted of it), then the command exits 1 with
//                      the problem on stderr, so `qmoe inspect F && deploy F` is a usable check.
//   ONNX model         the QMoE node's spec and its raw tensors (after load_onnx's full validation).
//   raw .safetensors   the spec, the source facts in __metadata__ and the tensors.
//   HF checkpoint      the decoder layers that have experts, and the family, shapes and routing facts
//                      of one of them (--layer, default the first).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "commands.h"
#include "qmoe/checkpoint.h"
#include "qmoe/error.h"
#include "qmoe/packed_file.h"

namespace qmoe::cli {

namespace {

struct InspectArgs {
  std::string path;
  std::string weights_layout = "detect";
  bool weights_layout_given = false;
  int64_t layer = -1;
  bool json = false;
};

std::string hex64(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

void inspect_packed_file(const InspectArgs& a) {
  const PackedFileInfo info = inspect_packed(a.path);
  const bool ok = info.header_ok && info.payload_ok;
  if (a.json) {
    nlohmann::json j;
    j["path"] = a.path;
    j["kind"] = "packed";
    j["file_bytes"] = info.file_bytes;
    j["header_ok"] = info.header_ok;
    j["payload_ok"] = info.payload_ok;
    j["ok"] = ok;
    if (!info.problem.empty()) j["problem"] = info.problem;
    if (info.header) {
      const PackedHeader& h = *info.header;
      j["format_version"] = h.format_version;
      j["writer"] = h.writer;
      j["layout"] = {{"name", h.layout.name}, {"version", h.layout.version}, {"target", h.layout.target},
                     {"summary", h.layout.to_string()}};
      j["spec"] = spec_json(h.spec);
      j["header_bytes"] = h.header_bytes;
      j["payload_bytes"] = h.payload_bytes;
      j["header_xxh64"] = hex64(h.header_hash);
      j["payload_xxh64"] = hex64(h.payload_hash);
      j["blobs"] = nlohmann::json::array();
      for (const PackedBlobEntry& b : h.blobs)
        j["blobs"].push_back({{"name", b.name},
                              {"dtype", std::string(dtype_name(b.dtype))},
                              {"shape", b.shape},
                              {"offset", b.offset},
                              {"bytes", b.nbytes}});
    }
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("%s", info.to_string().c_str());
  }
  std::fflush(stdout);
  if (!ok) throw Error(a.path + ": " + (info.problem.empty() ? std::string("damaged") : info.problem));
}

void print_tensors(const RawExperts& raw) {
  std::printf("  tensors:\n");
  std::printf("    %-22s %-9s %-18s %12s\n", "name", "dtype", "shape", "bytes");
  for (const NamedRawTensor& t : raw_tensor_list(raw))
    std::printf("    %-22s %-9s %-18s %12zu\n", t.name.c_str(), std::string(dtype_name(t.tensor->dtype())).c_str(),
                shape_str(t.tensor->shape()).c_str(), t.tensor->nbytes());
  std::printf("  weights: %s\n", human_bytes(double(raw.nbytes())).c_str());
}

void inspect_raw_model(const InspectArgs& a, FileKind kind) {
  const RawModel m = load_raw_model("FILE", a.path, kind, a.weights_layout, a.weights_layout_given);
  if (a.json) {
    nlohmann::json j;
    j["path"] = a.path;
    j["kind"] = kind == FileKind::onnx ? "onnx" : "raw-safetensors";
    if (!m.node_name.empty()) j["node"] = m.node_name;
    j["spec"] = spec_json(m.spec);
    j["weight_bytes"] = m.raw.nbytes();
    j["tensors"] = nlohmann::json::object();
    for (const NamedRawTensor& t : raw_tensor_list(m.raw)) j["tensors"][t.name] = tensor_json(*t.tensor);
    if (!m.metadata.empty()) j["metadata"] = m.metadata;
    j["ok"] = true;
    std::printf("%s\n", j.dump(2).c_str());
    return;
  }
  std::printf("%s: %s\n", a.path.c_str(), std::string(file_kind_name(kind)).c_str());
  if (!m.node_name.empty()) std::printf("  node: %s (com.microsoft::QMoE)\n", m.node_name.c_str());
  std::printf("  spec: %s\n", m.spec.to_string().c_str());
  if (!m.metadata.empty()) {
    std::printf("  metadata:\n");
    for (const auto& [k, v] : m.metadata) std::printf("    %s = %s\n", k.c_str(), v.c_str());
  }
  print_tensors(m.raw);
}

void inspect_checkpoint(const InspectArgs& a) {
  const std::vector<int64_t> layers = checkpoint_moe_layers(a.path);
  if (layers.empty())
    throw Error(a.path + ": no decoder layer with MoE experts in any recognised naming (see docs/CHECKPOINTS.md)");
  const int64_t layer = a.layer >= 0 ? a.layer : layers.front();
  const CheckpointLayer L = open_checkpoint_layer(a.path, layer);
  if (a.json) {
    nlohmann::json j;
    j["path"] = a.path;
    j["kind"] = "checkpoint";
    j["moe_layers"] = layers;
    j["layer"] = {{"index", L.layer},
                  {"family", L.family},
                  {"prefix", L.prefix},
                  {"num_experts", L.num_experts},
                  {"hidden", L.hidden},
                  {"inter", L.inter},
                  {"source_dtype", L.source_dtype},
                  {"has_bias", L.has_bias},
                  {"source_names", L.source_names},
                  {"notes", L.notes},
                  {"summary", L.summary()}};
    if (L.k) j["layer"]["k"] = *L.k;
    if (L.normalize_routing_weights) j["layer"]["normalize_routing_weights"] = *L.normalize_routing_weights;
    if (std::isfinite(L.swiglu_limit)) j["layer"]["swiglu_limit"] = L.swiglu_limit;
    j["ok"] = true;
    std::printf("%s\n", j.dump(2).c_str());
    return;
  }
  std::string list;
  for (int64_t l : layers) list += (list.empty() ? "" : ", ") + std::to_string(l);
  std::printf("%s: %s\n", a.path.c_str(), std::string(file_kind_name(FileKind::checkpoint)).c_str());
  std::printf("  MoE layers (%zu): %s\n", layers.size(), list.c_str());
  std::printf("  %s\n", L.summary().c_str());
  std::printf("  experts read from:\n");
  for (const std::string& n : L.source_names) std::printf("    %s\n", n.c_str());
  for (const std::string& n : L.notes) std::printf("  note: %s\n", n.c_str());
  std::printf("  quantize with: qmoe quantize %s --layer %lld --bits 4 --block-size 128 -o raw.safetensors\n",
              a.path.c_str(), static_cast<long long>(layer));
}

void inspect_command(const InspectArgs& a) {
  require_input_path("FILE", a.path);
  const FileKind kind = detect_file_kind(a.path);
  if (a.layer >= 0 && kind != FileKind::checkpoint)
    throw Error("--layer applies to Hugging Face checkpoints only; FILE " + a.path + " is " +
                std::string(file_kind_name(kind)));
  switch (kind) {
    case FileKind::packed:
      if (a.weights_layout_given && a.weights_layout != "detect")
        throw Error("--weights-layout " + a.weights_layout + ": applies to ONNX models only; FILE " + a.path +
                    " is a qmoe packed weight file");
      return inspect_packed_file(a);
    case FileKind::checkpoint:
      if (a.weights_layout_given && a.weights_layout != "detect")
        throw Error("--weights-layout " + a.weights_layout + ": applies to ONNX models only; FILE " + a.path +
                    " is a Hugging Face checkpoint");
      return inspect_checkpoint(a);
    case FileKind::onnx:
    case FileKind::raw:
      return inspect_raw_model(a, kind);
  }
}

}  // namespace

Subcommand add_inspect(CLI::App& root) {
  auto args = std::make_shared<InspectArgs>();
  CLI::App* app = root.add_subcommand(
      "inspect", "Describe a packed file (header, blobs, checksums), an ONNX model, a raw .safetensors or a checkpoint");
  app->footer(
      "Examples:\n"
      "  qmoe inspect layer.cpu.qmoe\n"
      "  qmoe inspect layer.onnx --json\n"
      "  qmoe inspect path/to/Mixtral-8x7B --layer 3\n"
      "Exits 1 when a packed file's header or payload checksum does not hold (the report is printed first).\n");
  app->add_option("FILE", args->path, "Packed file, ONNX model, raw .safetensors, or checkpoint (file, index or folder)")
      ->required();
  app->add_option("--layer", args->layer, "Checkpoints: the decoder layer to describe (default: the first MoE layer)")
      ->check(CLI::Range(int64_t(0), int64_t(1) << 20));
  app->add_option("--weights-layout", args->weights_layout,
                  "Layout of an ONNX model's fc1/fc2 bytes: raw, ort-cuda (ORT's CUDA prepacked), or detect")
      ->check(CLI::IsMember({"detect", "raw", "ort-cuda"}))
      ->capture_default_str()
      ->each([args](const std::string&) { args->weights_layout_given = true; });
  app->add_flag("--json", args->json, "Print JSON instead of text");
  return {app, [args] { inspect_command(*args); }};
}

}  // namespace qmoe::cli
