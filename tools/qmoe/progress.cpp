// The stderr progress line (see progress.h). Drawing costs one write(2) of < 100 bytes at most every
// 100 ms, so a callback per expert or per run is free next to the work it reports.
#include "progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace qmoe::cli {

namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kQuietStart = std::chrono::milliseconds(500);  // draw nothing for work shorter than this
constexpr auto kMinRedraw = std::chrono::milliseconds(100);
constexpr auto kTick = std::chrono::milliseconds(250);

int terminal_width() {
  winsize w{};
  if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &w) == 0 && w.ws_col >= 20) return w.ws_col;
  return 80;
}

void write_stderr(const std::string& s) {
  // Unbuffered: stderr's FILE is unbuffered anyway, but a single write keeps the line whole.
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t n = ::write(STDERR_FILENO, s.data() + off, s.size() - off);
    if (n <= 0) return;  // a closed terminal is not worth an error
    off += size_t(n);
  }
}

}  // namespace

bool Progress::stderr_is_terminal() { return ::isatty(STDERR_FILENO) == 1; }

Progress::Progress(std::string label, int64_t total, bool enabled)
    : enabled_(enabled && stderr_is_terminal()), label_(std::move(label)), total_(total), start_(Clock::now()) {
  if (enabled_) ticker_ = std::thread([this] { tick(); });
}

Progress::~Progress() { finish(); }

void Progress::update(int64_t done) {
  if (!enabled_) return;
  std::lock_guard<std::mutex> lock(mu_);
  done_ = done;
  draw_locked(false);
}

void Progress::phase(std::string label, int64_t total) {
  if (!enabled_) return;
  std::lock_guard<std::mutex> lock(mu_);
  label_ = std::move(label);
  total_ = total;
  done_ = 0;
  draw_locked(true);
}

void Progress::finish() {
  if (!enabled_) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    if (drawn_) write_stderr("\r\033[K");
    drawn_ = false;
  }
  cv_.notify_all();
  if (ticker_.joinable()) ticker_.join();
  enabled_ = false;
}

void Progress::tick() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, kTick);
    if (!stop_) draw_locked(true);
  }
}

void Progress::draw_locked(bool force) {
  if (stop_) return;
  const auto now = Clock::now();
  if (now - start_ < kQuietStart) return;
  if (!force && drawn_ && now - last_draw_ < kMinRedraw) return;
  last_draw_ = now;
  const double secs = std::chrono::duration<double>(now - start_).count();
  const int width = terminal_width();
  char tail[64];
  std::string line = label_;
  if (total_ > 0) {
    const int64_t d = std::clamp<int64_t>(done_, 0, total_);
    std::snprintf(tail, sizeof tail, " %lld/%lld %.1f s", static_cast<long long>(d), static_cast<long long>(total_), secs);
    const int bar = std::clamp(width - int(line.size()) - int(std::string(tail).size()) - 4, 0, 40);
    if (bar >= 5) {
      const int filled = int(double(bar) * double(d) / double(total_));
      line += " [" + std::string(size_t(filled), '#') + std::string(size_t(bar - filled), '.') + "]";
    }
    line += tail;
  } else {
    std::snprintf(tail, sizeof tail, " ... %.1f s", secs);
    line += tail;
  }
  if (int(line.size()) > width - 1) line.resize(size_t(width - 1));
  write_stderr("\r\033[K" + line);
  drawn_ = true;
}

}  // namespace qmoe::cli
