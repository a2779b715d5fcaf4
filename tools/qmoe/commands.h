// The qmoe program's subcommands and the helpers they share.
//
// Each subcommand lives in its own cmd_<name>.cpp and exposes one add_<name>() that declares its
// options on the root CLI11 app and returns the action to run once parsing succeeded. Parsing and
// running are kept apart so main() alone maps failures to exit codes: 2 for usage errors (CLI11),
// 1 for qmoe::Error (bad input files, shapes, attributes) with a one-line message, 0 on success.
// Actions report failure only by throwing.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "qmoe/layer.h"
#include "qmoe/raw_experts.h"
#include "qmoe/spec.h"
#include "qmoe/tensor.h"

namespace qmoe::cli {

struct Subcommand {
  CLI::App* app = nullptr;
  std::function<void()> action;  // throws qmoe::Error on bad input
};

Subcommand add_run(CLI::App& root);
Subcommand add_demo(CLI::App& root);
Subcommand add_pack(CLI::App& root);
Subcommand add_inspect(CLI::App& root);
Subcommand add_quantize(CLI::App& root);
Subcommand add_export_onnx(CLI::App& root);
Subcommand add_bench(CLI::App& root);

// Options every command that runs a layer shares (--backend, --threads, --no-prepack, --chunk-rows,
// --cuda-gemm, --cpu-compute).
struct BackendFlags {
  std::string backend = "auto";
  int threads = 0;
  bool no_prepack = false;
  int64_t chunk_rows = 0;
  std::string cuda_gemm = "auto";
  std::string cpu_compute = "exact";
};
void add_backend_flags(CLI::App& app, BackendFlags& flags);
LayerOptions layer_options(const BackendFlags& flags);

// Wall-clock milliseconds since construction.
class Stopwatch {
 public:
  double ms() const {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

// "88.1 MB", "512 B": bytes for humans (decimal units, like du --si).
std::string human_bytes(double bytes);
// Throws qmoe::Error "<flag> <path>: no such file" unless path names a readable regular file.
void require_input_file(const std::string& flag, const std::string& path);
// Throws qmoe::Error unless the output's directory exists and is writable, so a run fails before
// computing rather than after.
void require_writable_output(const std::string& flag, const std::string& path);
nlohmann::json spec_json(const MoeSpec& spec);

// What a path given as MODEL / FILE / CHECKPOINT holds, from its first bytes (never from the name
// alone, except that a damaged file named *.safetensors is still treated as one so the reader's
// error explains it):
//   packed      qmoe packed weights (kPackedMagic)
//   onnx        anything else that is a file: load_onnx() says precisely what is wrong with it
//   raw         a safetensors file whose __metadata__ format is "qmoe.raw" (qmoe quantize's output)
//   checkpoint  a folder, a model.safetensors.index.json, or any other safetensors file
enum class FileKind { packed, onnx, raw, checkpoint };
FileKind detect_file_kind(const std::string& path);
std::string_view file_kind_name(FileKind k);
// Throws qmoe::Error "<flag> <path>: ..." unless path exists (file or folder) and is readable.
void require_input_path(const std::string& flag, const std::string& path);
// Throws unless `out` names a different file than `in` (writing over the input is never intended).
void require_distinct(const std::string& in, const std::string& out_flag, const std::string& out);

// The raw tensors of a layer by their ONNX input names (fc1_experts_weights, fc1_scales, ...), in
// operator input order; absent optional tensors are left out.
struct NamedRawTensor {
  std::string name;
  const Tensor* tensor;
};
std::vector<NamedRawTensor> raw_tensor_list(const RawExperts& raw);
nlohmann::json tensor_json(const Tensor& t);
// A layer's raw weights from an ONNX model or a qmoe raw .safetensors file (`kind` from
// detect_file_kind; a packed file or a checkpoint is refused with what to run instead). `layout`
// ("detect", "raw", "ort-cuda") applies to ONNX models only; stating it for another kind is an error.
struct RawModel {
  FileKind kind = FileKind::onnx;
  MoeSpec spec;
  RawExperts raw;
  std::string node_name;                        // ONNX only
  std::map<std::string, std::string> metadata;  // raw .safetensors only (source facts)
};
RawModel load_raw_model(const std::string& flag, const std::string& path, FileKind kind,
                        const std::string& layout, bool layout_given);

// "--quiet": no progress line (it is drawn only on a terminal anyway).
void add_quiet_flag(CLI::App& app, bool& quiet);
// "qmoe 0.1.0": written into packed files and exported models.
std::string writer_string();

}  // namespace qmoe::cli
