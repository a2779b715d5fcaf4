// Helpers shared by the subcommands (see commands.h).
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "commands.h"
#include "qmoe/error.h"
#include "qmoe/layer.h"

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

}  // namespace qmoe::cli
