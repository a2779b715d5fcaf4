#include "checkpoint/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "qmoe/error.h"

namespace qmoe {

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  if (path_.empty()) throw Error("output path is empty");
  std::vector<char> templ(path_.begin(), path_.end());
  const std::string suffix = ".tmp-XXXXXX";
  templ.insert(templ.end(), suffix.begin(), suffix.end());
  templ.push_back('\0');
  fd_ = mkstemp(templ.data());
  if (fd_ < 0) throw Error(path_ + ": cannot create a temporary file next to it (" + std::strerror(errno) + ")");
  tmp_ = templ.data();
  // mkstemp creates 0600; a model file is meant to be shared like any other output.
  fchmod(fd_, 0644);
}

AtomicFile::~AtomicFile() { discard(); }

void AtomicFile::discard() noexcept {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  if (!tmp_.empty()) {
    ::unlink(tmp_.c_str());
    tmp_.clear();
  }
}

void AtomicFile::write(const void* data, size_t n) {
  if (fd_ < 0) throw Error(path_ + ": write after commit");
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    // write(2) may write less than asked (and Linux caps one call near 2 GiB): loop.
    const ssize_t w = ::write(fd_, p, n < (size_t(1) << 30) ? n : (size_t(1) << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      const std::string why = std::strerror(errno);
      discard();
      throw Error(path_ + ": write failed (" + why + ")");
    }
    p += w;
    n -= size_t(w);
  }
}

void AtomicFile::commit() {
  if (fd_ < 0) throw Error(path_ + ": commit twice");
  const bool synced = ::fsync(fd_) == 0;
  const std::string sync_why = synced ? "" : std::strerror(errno);
  const bool closed = ::close(fd_) == 0;
  fd_ = -1;
  if (!synced || !closed) {
    const std::string why = synced ? std::strerror(errno) : sync_why;
    discard();
    throw Error(path_ + ": flushing to disk failed (" + why + ")");
  }
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    discard();
    throw Error(path_ + ": cannot move the finished file into place (" + why + ")");
  }
  tmp_.clear();
}

}  // namespace qmoe
