// A one-line progress indicator on stderr for the subcommands that can take more than a second or two
// (quantize, pack, bench, export-onnx of a large layer).
//
// It draws only when stderr is a terminal and --quiet was not given, so scripts, pipes and the test
// suites never see it: their stderr stays empty on success and holds exactly the one `qmoe: error:`
// line on failure. Nothing is drawn during the first half second (fast commands do not flicker), a
// background thread refreshes the elapsed time while a long library call runs without callbacks
// (prepack, writing a file), and the line is erased when the object goes away -- also when an
// exception unwinds through it, so the error message starts on a clean line.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

namespace qmoe::cli {

class Progress {
 public:
  // total > 0: a bar of done/total; total == 0: the label and the elapsed time only.
  Progress(std::string label, int64_t total, bool enabled);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  void update(int64_t done);
  // Starts a new phase: new label and total, done = 0 (elapsed time keeps running).
  void phase(std::string label, int64_t total = 0);
  // Erases the line and stops drawing (call before printing results on stdout).
  void finish();

  // True when progress would be drawn for this process (stderr is a terminal).
  static bool stderr_is_terminal();

 private:
  void draw_locked(bool force);
  void tick();

  std::mutex mu_;
  std::condition_variable cv_;
  std::thread ticker_;
  bool enabled_ = false, stop_ = false, drawn_ = false;
  std::string label_;
  int64_t total_ = 0, done_ = 0;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace qmoe::cli
