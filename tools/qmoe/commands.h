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
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "qmoe/spec.h"
#include "qmoe/tensor.h"

namespace qmoe::cli {

struct Subcommand {
  CLI::App* app = nullptr;
  std::function<void()> action;  // throws qmoe::Error on bad input
};

Subcommand add_run(CLI::App& root);
Subcommand add_demo(CLI::App& root);

// Options every command that runs a layer shares (--backend, --threads, --no-prepack).
struct BackendFlags {
  std::string backend = "auto";
  int threads = 0;
  bool no_prepack = false;
};
void add_backend_flags(CLI::App& app, BackendFlags& flags);

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

}  // namespace qmoe::cli
