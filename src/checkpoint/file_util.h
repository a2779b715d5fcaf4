// Atomic file output shared by the checkpoint writers (safetensors, ONNX, external data).
//
// Bytes go to a temporary file in the destination's folder (same file system, so rename(2) is
// atomic); commit() flushes it and renames it over the destination. Destroying an AtomicFile that was
// not committed (an exception on the way) deletes the temporary file: a failed export leaves no
// partial output, as the CLI promises.
#pragma once

#include <string>

namespace qmoe {

class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);
  // Makes the file visible under its final name. Throws on I/O errors (the temp file is removed).
  void commit();
  const std::string& path() const { return path_; }

 private:
  void discard() noexcept;
  std::string path_, tmp_;
  int fd_ = -1;
};

}  // namespace qmoe
