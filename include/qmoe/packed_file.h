// Packed weight files: a backend's packed experts written once offline (`qmoe pack`) and loaded at
// start-up without repacking (issue 3 item 4). docs/FORMAT.md "Packed file header" is the byte-level
// specification; this header is the API.
//
// A file holds one PackedExperts: its layout tag (name, version, target), the full MoeSpec it was
// validated against, and its blobs (PackedExperts::to_blobs()) at 64-byte aligned offsets, with an
// XXH64 checksum of the payload and one of the header. Loading checks, in this order and each with its
// own error: magic (a raw .npy/ONNX/safetensors file is named as such), format version, header size and
// checksum, header fields and limits, layout tag against backend.layout_for(spec), spec against the
// caller's, every blob's bounds against the file size before any allocation, payload checksum; only
// then does backend.from_blobs() see the bytes. A hostile file can make loading fail, never crash or
// read out of bounds.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qmoe/backend.h"
#include "qmoe/spec.h"
#include "qmoe/tensor.h"

namespace qmoe {

// First 8 bytes of every packed file. Chosen so no file qmoe is offered elsewhere can start with them:
// 0x8F is not a valid first byte of a protobuf (ONNX) message (its wire type, 7, does not exist) and
// not .npy's 0x93; read as safetensors' little-endian u64 header length it is ~1.9e18 bytes, far past
// any file; non-ASCII first byte and 0x1A catch text-mode mangling as in PNG.
inline constexpr std::array<uint8_t, 8> kPackedMagic = {0x8F, 'Q', 'M', 'O', 'E', 'P', 'K', 0x1A};
inline constexpr uint32_t kPackedFormatVersion = 1;
inline constexpr uint64_t kPackedAlign = 64;       // header end and every blob offset
inline constexpr uint64_t kPackedPreludeBytes = 64;  // fixed part of the header

// Sanity limits on what a header may declare (checked before anything is allocated).
inline constexpr uint64_t kPackedMaxHeaderBytes = 16ull << 20;
inline constexpr uint32_t kPackedMaxBlobs = 4096;
inline constexpr uint32_t kPackedMaxString = 1024;
inline constexpr uint32_t kPackedMaxRank = 8;
inline constexpr uint64_t kPackedMaxBlobBytes = 1ull << 40;  // 1 TiB

struct PackedBlobEntry {
  std::string name;
  DType dtype = DType::u8;
  Shape shape;
  uint64_t offset = 0;  // absolute file offset, multiple of 64
  uint64_t nbytes = 0;  // = numel(shape) * dtype_size(dtype)
};

// Everything the header says, as decoded (or to be encoded).
struct PackedHeader {
  uint32_t format_version = kPackedFormatVersion;
  std::string writer;  // e.g. "qmoe 0.1.0"
  LayoutTag layout;
  MoeSpec spec;
  std::vector<PackedBlobEntry> blobs;
  uint64_t header_bytes = 0;   // = payload offset, multiple of 64
  uint64_t payload_bytes = 0;  // from header_bytes to the end of the file
  uint64_t payload_hash = 0;   // XXH64 (seed 0) of the payload bytes, padding included
  uint64_t header_hash = 0;    // XXH64 (seed 0) of the header bytes with this field zeroed
};

// Writes `packed` to `path` atomically: a temporary file in the same directory, fsync, rename. No
// partial file is ever visible under `path`. Throws qmoe::Error naming the path on I/O failure or on
// blobs that cannot be written (duplicate or empty names, too many blobs).
void save_packed(const std::string& path, const PackedExperts& packed, const std::string& writer = "qmoe");

// Reads, checks (see the file comment) and hands the blobs to backend.from_blobs(). With
// `expected`, the file's spec must equal it field by field (error names the first differing field).
std::unique_ptr<PackedExperts> load_packed(const std::string& path, Backend& backend,
                                           const std::optional<MoeSpec>& expected = std::nullopt);

// What `qmoe inspect FILE` prints: header fields, the spec, the blob table and whether both
// checksums hold. Throws qmoe::Error (as load_packed would) when the file is not a packed file (magic,
// version) or its header fields cannot be decoded within the file (truncated, sizes past the end,
// invalid spec); a header that decodes but fails its checksum, and a payload that fails its
// checksum, are reported in the description instead (header_ok / payload_ok / problem).
struct PackedFileInfo {
  std::string path;
  uint64_t file_bytes = 0;
  bool header_ok = false;   // header checksum holds and every field decoded
  bool payload_ok = false;  // payload checksum holds (checked only when header_ok)
  std::string problem;      // why not ok, empty when both are ok
  std::optional<PackedHeader> header;
  std::string to_string() const;
};
PackedFileInfo inspect_packed(const std::string& path);

// True if `prefix` (the first bytes of a file) starts with kPackedMagic; loaders of raw formats use it
// to say "this is a qmoe packed file, load it with load_packed/--packed" instead of a parse error.
bool has_packed_magic(const void* prefix, size_t n);
// A short guess at what a file that is not a packed file holds, from its first bytes: "a NumPy .npy
// file", "an ONNX model (protobuf)", "a safetensors file", "a zip archive (.npz or PyTorch)", ...
std::string sniff_file_kind(const void* prefix, size_t n, uint64_t file_size);

// Header codec, public for tools and for tests that craft damaged files. encode fills header_bytes
// and header_hash (payload fields must already be set); decode checks every bound against `size`
// (bytes available) and `file_size`, throwing qmoe::Error prefixed with `name`.
std::vector<uint8_t> encode_packed_header(PackedHeader& h);
PackedHeader decode_packed_header(const uint8_t* data, size_t size, uint64_t file_size, const std::string& name);

// XXH64 (Yann Collet's xxHash, 64-bit variant), written from the algorithm's description: ~10 GB/s
// per core, far faster than the disk, and a real 64-bit hash (unlike a sum). Streaming and one-shot.
class Xxh64 {
 public:
  explicit Xxh64(uint64_t seed = 0);
  void update(const void* data, size_t n);
  uint64_t digest() const;

 private:
  uint64_t v_[4];
  uint64_t seed_;
  uint64_t total_ = 0;
  uint8_t buf_[32];
  size_t buffered_ = 0;
};
uint64_t xxhash64(const void* data, size_t n, uint64_t seed = 0);

}  // namespace qmoe
