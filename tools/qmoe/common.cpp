// Helpers shared by the subcommands (see commands.h).
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "commands.h"
#include "qmoe/error.h"
#include "qmoe/checkpoint.h"
#include "qmoe/layer.h"
#include "qmoe/onnx_model.h"
#include "qmoe/packed_file.h"
#include "qmoe/safetensors.h"

namespace qmoe::cli {

void add_backend_flags(CLI::App& app, BackendFlags& flags) {
  // Only backends present in this build and usable on this machine are accepted, so asking for
  // one that is not here is a usage error listing what is.
  std::vector<std::string> names{"auto"};
  for (const auto& n : available_backends()) names.push_back(n);
  app.add_option("--backend", flags.backend, "Backend that runs the layer; auto = the best present")
      ->check(CLI::IsMember(names))
      ->capture_default_str();
  app.add_option("--threads", flags.threads, "CPU threads; 0 = all cores")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  app.add_flag("--no-prepack", flags.no_prepack,
               "Run straight from the raw bytes instead of the backend's packed layout (slower)");
  app.add_option("--chunk-rows", flags.chunk_rows,
                 "CPU: tokens per chunk of a run, bounding its scratch memory; 0 = as many as fit 256 MiB")
      ->check(CLI::Range(int64_t(0), int64_t(1) << 40))
      ->capture_default_str();
  app.add_option("--cuda-gemm", flags.cuda_gemm,
                 "CUDA: FC kernels; auto = by batch size, sm80 = the mma.sync kernels, sm90 = the Hopper wgmma "
                 "kernels wherever they serve the layer")
      ->check(CLI::IsMember({"auto", "sm80", "sm90"}))
      ->capture_default_str();
  app.add_option("--cpu-compute", flags.cpu_compute,
                 "CPU: kernel arithmetic; exact = fp32 (default), bf16 = activations rounded to bf16 and multiplied "
                 "with vdpbf16ps (faster prefill; layer error ~3e-3 relative, tested to 8e-3; needs AVX512_BF16), "
                 "int8 = activations quantized to int8 per row and multiplied with vpdpbusd (faster still; layer "
                 "error ~1-2e-2 relative, tested to 4e-2; needs AVX512_VNNI), int8x3 = activations as three (or four) int8 "
                 "digits multiplied by AMX tile multiplies (fp32-level accuracy, faster prefill than exact; needs "
                 "AMX-INT8)")
      ->check(CLI::IsMember({"exact", "bf16", "int8", "int8x3"}))
      ->capture_default_str();
}

LayerOptions layer_options(const BackendFlags& flags) {
  LayerOptions o;
  o.backend = flags.backend;
  o.threads = flags.threads;
  o.prepack = !flags.no_prepack;
  o.chunk_rows = flags.chunk_rows;
  o.cuda_gemm = flags.cuda_gemm;
  o.cpu_compute = flags.cpu_compute;
  return o;
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "kB", "MB", "GB", "TB"};
  int u = 0;
  while (b >= 1000 && u < 4) b /= 1000, ++u;
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", b, units[u]);
  return buf;
}

void require_input_file(const std::string& flag, const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto st = fs::status(path, ec);
  if (!fs::exists(st)) throw Error(flag + " " + path + ": no such file");
  if (fs::is_directory(st)) throw Error(flag + " " + path + ": is a directory, expected a file");
  if (::access(path.c_str(), R_OK) != 0) throw Error(flag + " " + path + ": not readable (permission denied)");
}

void require_writable_output(const std::string& flag, const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (path.empty()) throw Error(flag + ": empty path");
  if (fs::is_directory(path, ec)) throw Error(flag + " " + path + ": is a directory, expected a file name");
  fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) dir = ".";
  if (!fs::is_directory(dir, ec)) throw Error(flag + " " + path + ": directory " + dir.string() + " does not exist");
  // write_npy writes a temporary file next to the target and renames it, so the directory itself
  // must be writable.
  if (::access(dir.c_str(), W_OK) != 0)
    throw Error(flag + " " + path + ": directory " + dir.string() + " is not writable");
}

nlohmann::json spec_json(const MoeSpec& s) {
  nlohmann::json j;
  j["num_experts"] = s.num_experts;
  j["k"] = s.k;
  j["hidden"] = s.hidden;
  j["inter"] = s.inter;
  j["bits"] = s.bits;
  j["block_size"] = s.block_size;
  j["activation"] = std::string(activation_name(s.activation));
  if (s.is_swiglu()) {
    j["swiglu_fusion"] = int(s.swiglu_fusion);
    if (std::isfinite(s.swiglu_limit)) j["swiglu_limit"] = s.swiglu_limit;
    j["activation_alpha"] = s.activation_alpha;
    j["activation_beta"] = s.activation_beta;
  }
  j["normalize_routing_weights"] = s.normalize_routing_weights;
  j["use_sparse_mixer"] = s.use_sparse_mixer;
  j["T"] = std::string(dtype_name(s.act_dtype));
  j["T2"] = std::string(dtype_name(s.scale_dtype));
  j["summary"] = s.to_string();
  return j;
}

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

FileKind detect_file_kind(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) return FileKind::checkpoint;
  if (ends_with(path, ".index.json")) return FileKind::checkpoint;
  uint8_t head[16] = {};
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(head), sizeof head);
  const size_t n = size_t(f.gcount());
  const uint64_t size = fs::file_size(path, ec);
  if (has_packed_magic(head, n)) return FileKind::packed;
  // safetensors: u64 little-endian header length, then the JSON header's '{'.
  uint64_t len = 0;
  if (n >= 9) std::memcpy(&len, head, 8);
  const bool looks_safetensors = n >= 9 && head[8] == '{' && len >= 2 && !ec && len <= size - 8;
  if (!looks_safetensors && !ends_with(path, ".safetensors")) return FileKind::onnx;
  // qmoe's own raw files say so in their metadata; every other safetensors file is a checkpoint. A
  // file that does not open is handed to read_raw_safetensors, whose error names the problem.
  try {
    const SafetensorsFile st = SafetensorsFile::open(path);
    const auto it = st.metadata().find("format");
    return it != st.metadata().end() && it->second == "qmoe.raw" ? FileKind::raw : FileKind::checkpoint;
  } catch (const Error&) {
    return FileKind::raw;
  }
}

std::string_view file_kind_name(FileKind k) {
  switch (k) {
    case FileKind::packed: return "a qmoe packed weight file";
    case FileKind::onnx: return "an ONNX model";
    case FileKind::raw: return "a qmoe raw .safetensors file";
    case FileKind::checkpoint: return "a Hugging Face checkpoint";
  }
  return "?";
}

void require_input_path(const std::string& flag, const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error(flag + " " + path + ": no such file or folder");
  if (::access(path.c_str(), R_OK) != 0) throw Error(flag + " " + path + ": not readable (permission denied)");
}

void require_distinct(const std::string& in, const std::string& out_flag, const std::string& out) {
  std::error_code ec;
  if (std::filesystem::equivalent(in, out, ec))
    throw Error(out_flag + " " + out + ": is the input file; choose another output path");
}

std::vector<NamedRawTensor> raw_tensor_list(const RawExperts& raw) {
  std::vector<NamedRawTensor> out;
  auto add = [&](const std::string& fc, const RawMatrix& m) {
    out.push_back({fc + "_experts_weights", &m.weights});
    out.push_back({fc + "_scales", &m.scales});
    if (m.bias) out.push_back({fc + "_experts_bias", &*m.bias});
    if (m.zero_points) out.push_back({fc + "_zero_points", &*m.zero_points});
  };
  add("fc1", raw.fc1);
  add("fc2", raw.fc2);
  if (raw.fc3) add("fc3", *raw.fc3);
  return out;
}

nlohmann::json tensor_json(const Tensor& t) {
  return {{"dtype", std::string(dtype_name(t.dtype()))}, {"shape", t.shape()}, {"bytes", t.nbytes()}};
}

RawModel load_raw_model(const std::string& flag, const std::string& path, FileKind kind, const std::string& layout,
                        bool layout_given) {
  RawModel m;
  m.kind = kind;
  if (kind != FileKind::onnx && layout_given && layout != "detect")
    throw Error("--weights-layout " + layout + ": applies to ONNX models only; " + flag + " " + path + " is " +
                std::string(file_kind_name(kind)));
  switch (kind) {
    case FileKind::packed:
      throw Error(flag + " " + path + ": is already a qmoe packed weight file; give the ONNX model or raw .safetensors it was made from");
    case FileKind::checkpoint:
      throw Error(flag + " " + path + ": is a Hugging Face checkpoint, not a quantized layer; quantize it first: "
                  "qmoe quantize " + path + " --layer N -o raw.safetensors");
    case FileKind::raw: {
      RawLayer L = read_raw_safetensors(path);
      m.spec = L.spec;
      m.raw = std::move(L.raw);
      m.metadata = std::move(L.metadata);
      return m;
    }
    case FileKind::onnx: {
      OnnxLoadOptions opt;
      opt.layout = layout == "raw" ? WeightsLayout::raw : layout == "ort-cuda" ? WeightsLayout::ort_cuda : WeightsLayout::detect;
      OnnxLayer L = load_onnx(path, opt);
      m.spec = L.spec;
      m.raw = std::move(L.raw);
      m.node_name = L.node_name;
      return m;
    }
  }
  throw Error("internal: unknown file kind");
}

void add_quiet_flag(CLI::App& app, bool& quiet) {
  app.add_flag("-q,--quiet", quiet, "No progress line on stderr (it is drawn only when stderr is a terminal)");
}

std::string writer_string() { return std::string("qmoe ") + QMOE_VERSION_STRING; }

}  // namespace qmoe::cli
