#include "fuzz_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>

namespace qmoe_fuzz {

namespace {
std::string g_dir;
void cleanup() {
  if (g_dir.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(g_dir, ec);
}
}  // namespace

const std::string& scratch_dir(const char* fuzzer_name) {
  if (g_dir.empty()) {
    const char* base = std::getenv("QMOE_FUZZ_TMP");
    std::string root = base && *base ? base : "/dev/shm";
    if (::access(root.c_str(), W_OK) != 0) root = "/tmp";
    g_dir = root + "/qmoe-fuzz-" + fuzzer_name + "-" + std::to_string(::getpid());
    std::error_code ec;
    std::filesystem::remove_all(g_dir, ec);
    if (!std::filesystem::create_directories(g_dir, ec) || ec) {
      std::fprintf(stderr, "fuzz harness: cannot create %s\n", g_dir.c_str());
      std::abort();
    }
    std::atexit(cleanup);
  }
  return g_dir;
}

std::string write_file(const std::string& dir, const std::string& file, const void* data, size_t size) {
  const std::string path = dir + "/" + file;
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    std::perror(path.c_str());
    std::abort();
  }
  const char* p = static_cast<const char*>(data);
  while (size) {
    const ssize_t w = ::write(fd, p, size);
    if (w <= 0) {
      std::perror(path.c_str());
      std::abort();
    }
    p += w;
    size -= size_t(w);
  }
  ::close(fd);
  return path;
}

void remove_file(const std::string& path) { ::unlink(path.c_str()); }

bool allow_std_exceptions() {
  static const bool v = [] {
    const char* e = std::getenv("QMOE_FUZZ_ALLOW_STD");
    return e && *e == '1';
  }();
  return v;
}

bool skip_known() {
  static const bool v = [] {
    const char* e = std::getenv("QMOE_FUZZ_SKIP_KNOWN");
    return e && *e == '1';
  }();
  return v;
}

bool verbose() {
  static const bool v = [] {
    const char* e = std::getenv("QMOE_FUZZ_VERBOSE");
    return e && *e == '1';
  }();
  return v;
}

}  // namespace qmoe_fuzz
