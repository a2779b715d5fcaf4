// Reading and writing safetensors files (https://github.com/huggingface/safetensors), the format
// Hugging Face checkpoints and qmoe's raw QMoE files use.
//
// File layout: u64 little-endian header length n; n bytes of JSON, an object mapping each tensor name
// to {"dtype", "shape", "data_offsets": [begin, end]} plus an optional "__metadata__" string map; then
// the data region, offsets relative to its start. The reader memory-maps the file and hands out
// Tensor views into the mapping (the Tensor keeps the mapping alive), so opening a 100 GB checkpoint
// costs only its header. Every offset is checked against the file size, the dtype and shape, and the
// other tensors before anything is read or allocated: a hostile file yields a qmoe::Error, never an
// out-of-bounds read.
//
// qmoe computes with F32, F16, BF16 and U8 tensors; other dtypes (I64, F8_E4M3, ...) are listed so a
// checkpoint holding them still opens, and asking for one of them is an error naming the dtype.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "qmoe/tensor.h"

namespace qmoe {

// Largest JSON header qmoe accepts. Real headers are a few MB at most (DeepSeek-V3's biggest shard
// lists ~10k tensors in ~1.5 MB); the bound stops a forged length from driving a huge allocation.
inline constexpr uint64_t kSafetensorsMaxHeader = 100u << 20;

// One tensor's entry in a safetensors header.
struct SafetensorsEntry {
  std::string name;
  std::string dtype_name;      // as written in the file: "F32", "BF16", "I64", ...
  std::optional<DType> dtype;  // set when qmoe can compute with it (F32, F16, BF16, U8)
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte range within the data region
};

// One memory-mapped safetensors file. Copies share the mapping.
class SafetensorsFile {
 public:
  // Maps and validates `path`. Throws qmoe::Error naming the file and the problem.
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return *metadata_; }
  // Tensor names in file order (by data offset).
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return index_->count(name) != 0; }
  // Throws if the file has no tensor `name`.
  const SafetensorsEntry& entry(const std::string& name) const;
  // A view into the mapping (kept alive by the returned Tensor). Throws for dtypes qmoe does not
  // compute with. A tensor whose offset is not aligned for its dtype is copied into an aligned buffer.
  Tensor tensor(const std::string& name) const;
  // The bytes of any tensor, whatever its dtype, as a 1-D U8 view (for formats qmoe decodes itself,
  // such as FP8 weights).
  Tensor bytes(const std::string& name) const;

 private:
  std::string path_;
  std::shared_ptr<void> mapping_;  // owns the mmap; null data for a file without tensor bytes
  const uint8_t* data_ = nullptr;  // start of the data region
  std::shared_ptr<const std::vector<SafetensorsEntry>> entries_;  // sorted by begin
  std::shared_ptr<const std::map<std::string, size_t>> index_;    // name -> entries_ position
  std::shared_ptr<const std::map<std::string, std::string>> metadata_;
};

// A checkpoint: one safetensors file, a folder with `model.safetensors.index.json` (sharded), a
// folder with one or more *.safetensors files, or the index file itself. Shard names in the index must
// be relative paths inside the folder (no absolute paths, no ".."); symlinks inside it are followed
// because the Hugging Face cache links snapshot files to blobs elsewhere.
class SafetensorsCheckpoint {
 public:
  static SafetensorsCheckpoint open(const std::string& path);

  // The folder holding the files (where config.json would be).
  const std::string& folder() const { return folder_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const SafetensorsEntry& entry(const std::string& name) const;
  Tensor tensor(const std::string& name) const;
  Tensor bytes(const std::string& name) const;
  // The file holding `name` (opened on first use).
  const SafetensorsFile& file_of(const std::string& name) const;

 private:
  std::string folder_;
  std::map<std::string, std::string> where_;  // tensor name -> file path
  // Shards are opened lazily: a sharded 600 GB checkpoint maps only the files a layer needs.
  std::shared_ptr<std::map<std::string, SafetensorsFile>> files_;
};

// A tensor to write: its name and bytes (not copied; must stay valid during the call).
struct NamedView {
  std::string name;
  TensorView view;
};

// Writes a safetensors file atomically: to a temporary file next to `path`, then renamed over it, so
// a failure never leaves a partial file. Tensors are laid out by decreasing element size so each
// starts aligned for its dtype (the header is padded to a multiple of 8 bytes with spaces, as the
// format allows). Throws on duplicate or reserved names and on I/O errors.
void write_safetensors(const std::string& path, const std::vector<NamedView>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// "F32" etc. for qmoe's dtypes (the safetensors spelling).
const char* safetensors_dtype_name(DType t);

}  // namespace qmoe
