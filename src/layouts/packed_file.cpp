// Packed weight files (include/qmoe/packed_file.h; byte layout in docs/FORMAT.md "Packed file header").
//
// How it fits: `qmoe pack` calls save_packed on a backend's PackedExperts; start-up calls load_packed,
// which verifies everything the header claims before a single blob is allocated, so a truncated,
// corrupted, foreign or hostile file fails with an error that says which of those it is. The payload is
// read with pread() straight into the blob tensors and hashed chunk by chunk while still in cache, so
// loading costs one pass over the bytes.
#include "qmoe/packed_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>

#include "qmoe/error.h"
#include "core/str_builder.h"

namespace qmoe {

// ---------------------------------------------------------------------------------------------
// XXH64. Four independent 64-bit lanes consume 32-byte stripes (so the multiplies pipeline), then the
// lanes are merged, the tail mixed in and the result avalanched. Constants are the algorithm's primes.
namespace {
constexpr uint64_t kP1 = 0x9E3779B185EBCA87ull, kP2 = 0xC2B2AE3D27D4EB4Full, kP3 = 0x165667B19E3779F9ull,
                   kP4 = 0x85EBCA77C2B2AE63ull, kP5 = 0x27D4EB2F165667C5ull;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  if constexpr (std::endian::native == std::endian::big) v = __builtin_bswap64(v);
  return v;
}
inline uint32_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  if constexpr (std::endian::native == std::endian::big) v = __builtin_bswap32(v);
  return v;
}
inline uint64_t xround(uint64_t acc, uint64_t in) { return rotl(acc + in * kP2, 31) * kP1; }
inline uint64_t xmerge(uint64_t acc, uint64_t v) { return (acc ^ xround(0, v)) * kP1 + kP4; }
}  // namespace

Xxh64::Xxh64(uint64_t seed) : v_{seed + kP1 + kP2, seed + kP2, seed, seed - kP1}, seed_(seed) {}

void Xxh64::update(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  total_ += n;
  if (buffered_ + n < 32) {
    if (n) std::memcpy(buf_ + buffered_, p, n);
    buffered_ += n;
    return;
  }
  if (buffered_) {  // complete the pending stripe first
    const size_t take = 32 - buffered_;
    std::memcpy(buf_ + buffered_, p, take);
    for (int i = 0; i < 4; ++i) v_[i] = xround(v_[i], load64(buf_ + 8 * i));
    p += take;
    n -= take;
    buffered_ = 0;
  }
  uint64_t v0 = v_[0], v1 = v_[1], v2 = v_[2], v3 = v_[3];
  for (; n >= 32; p += 32, n -= 32) {
    v0 = xround(v0, load64(p));
    v1 = xround(v1, load64(p + 8));
    v2 = xround(v2, load64(p + 16));
    v3 = xround(v3, load64(p + 24));
  }
  v_[0] = v0, v_[1] = v1, v_[2] = v2, v_[3] = v3;
  if (n) std::memcpy(buf_, p, n);
  buffered_ = n;
}

uint64_t Xxh64::digest() const {
  uint64_t h;
  if (total_ >= 32) {
    h = rotl(v_[0], 1) + rotl(v_[1], 7) + rotl(v_[2], 12) + rotl(v_[3], 18);
    for (int i = 0; i < 4; ++i) h = xmerge(h, v_[i]);
  } else {
    h = seed_ + kP5;
  }
  h += total_;
  const uint8_t* p = buf_;
  size_t n = buffered_;
  for (; n >= 8; p += 8, n -= 8) h = rotl(h ^ xround(0, load64(p)), 27) * kP1 + kP4;
  if (n >= 4) {
    h = rotl(h ^ (uint64_t(load32(p)) * kP1), 23) * kP2 + kP3;
    p += 4;
    n -= 4;
  }
  for (; n > 0; ++p, --n) h = rotl(h ^ (*p * kP5), 11) * kP1;
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h;
}

uint64_t xxhash64(const void* data, size_t n, uint64_t seed) {
  Xxh64 h(seed);
  h.update(data, n);
  return h.digest();
}

// ---------------------------------------------------------------------------------------------
namespace {

constexpr size_t kOffVersion = 8, kOffHeaderBytes = 16, kOffPayloadBytes = 24, kOffPayloadHash = 32,
                 kOffHeaderHash = 40;
constexpr size_t kChunk = size_t(8) << 20;  // I/O and hashing granularity

// The spec is encoded field by field (docs/FORMAT.md). A new MoeSpec field must be added to the
// encoding, the decoder, spec_mismatch() and the docs, with kPackedFormatVersion bumped; this assert
// is the reminder (it fires when MoeSpec's size changes).
static_assert(sizeof(MoeSpec) == 80,
              "MoeSpec changed: update packed_file.cpp (encode/decode/spec_mismatch), docs/FORMAT.md and "
              "kPackedFormatVersion");

uint64_t align_up(uint64_t x) { return (x + kPackedAlign - 1) / kPackedAlign * kPackedAlign; }

std::string hex64(uint64_t v) {
  char b[24];
  std::snprintf(b, sizeof b, "%016llx", (unsigned long long)v);
  return b;
}

// Strings from a file are shown sanitized so a hostile name cannot garble a terminal.
std::string printable(const std::string& s) {
  std::string o;
  for (unsigned char c : s) o += (c >= 0x20 && c < 0x7f) ? char(c) : '?';
  return o;
}

// ---- little-endian writer ----
struct Writer {
  std::vector<uint8_t> b;
  void u8(uint8_t v) { b.push_back(v); }
  void u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) b.push_back(uint8_t(v >> (8 * i)));
  }
  void u64(uint64_t v) {
    for (int i = 0; i < 8; ++i) b.push_back(uint8_t(v >> (8 * i)));
  }
  void i64(int64_t v) { u64(uint64_t(v)); }
  void f32(float v) { u32(std::bit_cast<uint32_t>(v)); }
  void str(const std::string& s) {
    u32(uint32_t(s.size()));
    b.insert(b.end(), s.begin(), s.end());
  }
};
void put_u64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i));
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}
uint32_t get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(p[i]) << (8 * i);
  return v;
}

// ---- bounds-checked reader: every read names what it was reading when the header ran out ----
struct Reader {
  const uint8_t* p;
  size_t n, pos;
  std::string name;
  void need(size_t k, const char* what) {
    if (k > n - pos)
      throw Error(name + ": header is cut short while reading " + what + " (at byte " + std::to_string(pos) +
                  " of " + std::to_string(n) + "): the file is corrupted");
  }
  uint8_t u8(const char* what) {
    need(1, what);
    return p[pos++];
  }
  uint32_t u32(const char* what) {
    need(4, what);
    const uint32_t v = get_u32(p + pos);
    pos += 4;
    return v;
  }
  uint64_t u64(const char* what) {
    need(8, what);
    const uint64_t v = get_u64(p + pos);
    pos += 8;
    return v;
  }
  int64_t i64(const char* what) { return int64_t(u64(what)); }
  float f32(const char* what) { return std::bit_cast<float>(u32(what)); }
  bool flag(const char* what) {
    const uint8_t v = u8(what);
    if (v > 1) throw Error(name + ": header field " + what + " must be 0 or 1, got " + std::to_string(v));
    return v == 1;
  }
  std::string str(const char* what) {
    const uint32_t len = u32(what);
    if (len > kPackedMaxString)
      throw Error(name + ": header string " + what + " declares " + std::to_string(len) + " bytes, over the limit of " +
                  std::to_string(kPackedMaxString));
    need(len, what);
    std::string s(reinterpret_cast<const char*>(p + pos), len);
    pos += len;
    return s;
  }
};

void encode_spec(Writer& w, const MoeSpec& s) {
  w.i64(s.num_experts);
  w.i64(s.hidden);
  w.i64(s.inter);
  w.i64(s.k);
  w.u32(uint32_t(s.bits));
  w.i64(s.block_size);
  w.str(std::string(activation_name(s.activation)));
  w.u32(uint32_t(s.swiglu_fusion));
  w.f32(s.swiglu_limit);
  w.f32(s.activation_alpha);
  w.f32(s.activation_beta);
  w.u8(s.normalize_routing_weights);
  w.u8(s.use_sparse_mixer);
  w.str(std::string(dtype_name(s.act_dtype)));
  w.str(std::string(dtype_name(s.scale_dtype)));
  for (bool b : {s.fc1_bias, s.fc2_bias, s.fc3_bias, s.fc1_zero_points, s.fc2_zero_points, s.fc3_zero_points})
    w.u8(b);
}

MoeSpec decode_spec(Reader& r) {
  MoeSpec s;
  s.num_experts = r.i64("spec.num_experts");
  s.hidden = r.i64("spec.hidden");
  s.inter = r.i64("spec.inter");
  s.k = r.i64("spec.k");
  s.bits = int(r.u32("spec.bits"));
  s.block_size = r.i64("spec.block_size");
  const std::string act = r.str("spec.activation");
  const uint32_t fusion = r.u32("spec.swiglu_fusion");
  s.swiglu_limit = r.f32("spec.swiglu_limit");
  s.activation_alpha = r.f32("spec.activation_alpha");
  s.activation_beta = r.f32("spec.activation_beta");
  s.normalize_routing_weights = r.flag("spec.normalize_routing_weights");
  s.use_sparse_mixer = r.flag("spec.use_sparse_mixer");
  const std::string t = r.str("spec.act_dtype"), t2 = r.str("spec.scale_dtype");
  s.fc1_bias = r.flag("spec.fc1_bias");
  s.fc2_bias = r.flag("spec.fc2_bias");
  s.fc3_bias = r.flag("spec.fc3_bias");
  s.fc1_zero_points = r.flag("spec.fc1_zero_points");
  s.fc2_zero_points = r.flag("spec.fc2_zero_points");
  s.fc3_zero_points = r.flag("spec.fc3_zero_points");
  try {
    s.activation = parse_activation(act);
    if (fusion > 2) throw Error("swiglu_fusion: expected 0, 1 or 2, got " + std::to_string(fusion));
    s.swiglu_fusion = SwigluFusion(fusion);
    s.act_dtype = parse_dtype(t);
    s.scale_dtype = parse_dtype(t2);
    s.validate();
  } catch (const Error& e) {
    throw Error(r.name + ": the header's spec is invalid: " + e.what());
  }
  return s;
}

// The first field where two specs differ, as "hidden: file has 64, expected 128"; empty if equal.
// Floats compare by bits so an infinite swiglu_limit equals itself.
std::string spec_mismatch(const MoeSpec& f, const MoeSpec& x) {
  StrBuilder os;
  auto cmp = [&](const char* name, auto a, auto b) {
    if (os.empty() && !(a == b)) os << name << ": file has " << a << ", expected " << b;
  };
  auto cmpf = [&](const char* name, float a, float b) {
    if (os.empty() && std::bit_cast<uint32_t>(a) != std::bit_cast<uint32_t>(b))
      os << name << ": file has " << a << ", expected " << b;
  };
  cmp("num_experts", f.num_experts, x.num_experts);
  cmp("hidden", f.hidden, x.hidden);
  cmp("inter", f.inter, x.inter);
  cmp("k", f.k, x.k);
  cmp("bits", f.bits, x.bits);
  cmp("block_size", f.block_size, x.block_size);
  cmp("activation", activation_name(f.activation), activation_name(x.activation));
  cmp("swiglu_fusion", int(f.swiglu_fusion), int(x.swiglu_fusion));
  cmpf("swiglu_limit", f.swiglu_limit, x.swiglu_limit);
  cmpf("activation_alpha", f.activation_alpha, x.activation_alpha);
  cmpf("activation_beta", f.activation_beta, x.activation_beta);
  cmp("normalize_routing_weights", f.normalize_routing_weights, x.normalize_routing_weights);
  cmp("use_sparse_mixer", f.use_sparse_mixer, x.use_sparse_mixer);
  cmp("T (act_dtype)", dtype_name(f.act_dtype), dtype_name(x.act_dtype));
  cmp("T2 (scale_dtype)", dtype_name(f.scale_dtype), dtype_name(x.scale_dtype));
  cmp("fc1_bias", f.fc1_bias, x.fc1_bias);
  cmp("fc2_bias", f.fc2_bias, x.fc2_bias);
  cmp("fc3_bias", f.fc3_bias, x.fc3_bias);
  cmp("fc1_zero_points", f.fc1_zero_points, x.fc1_zero_points);
  cmp("fc2_zero_points", f.fc2_zero_points, x.fc2_zero_points);
  cmp("fc3_zero_points", f.fc3_zero_points, x.fc3_zero_points);
  return os.str();
}

// Magic, version and declared header size, from the first 64 bytes. Each failure has its own message.
uint64_t check_prelude(const uint8_t* p, size_t n, uint64_t file_size, const std::string& name) {
  if (n < kPackedMagic.size() || std::memcmp(p, kPackedMagic.data(), kPackedMagic.size()) != 0)
    throw Error(name + ": not a qmoe packed file (no qmoe packed-file magic; it looks like " +
                sniff_file_kind(p, n, file_size) + ")");
  if (n < kPackedPreludeBytes)
    throw Error(name + ": qmoe packed file is truncated: " + std::to_string(file_size) +
                " bytes, shorter than the 64-byte fixed header");
  const uint32_t version = get_u32(p + kOffVersion);
  if (version != kPackedFormatVersion)
    throw Error(name + ": qmoe packed file format version " + std::to_string(version) + ", but this build reads version " +
                std::to_string(kPackedFormatVersion) + " only; repack the model with this qmoe (qmoe pack)");
  const uint64_t hb = get_u64(p + kOffHeaderBytes);
  if (hb < kPackedPreludeBytes || hb % kPackedAlign != 0 || hb > kPackedMaxHeaderBytes)
    throw Error(name + ": header declares a header size of " + std::to_string(hb) +
                " bytes (must be a multiple of 64 in [64, " + std::to_string(kPackedMaxHeaderBytes) +
                "]): the file is corrupted");
  if (hb > file_size)
    throw Error(name + ": qmoe packed file is truncated: the header alone needs " + std::to_string(hb) +
                " bytes, the file has " + std::to_string(file_size));
  return hb;
}

uint64_t header_hash_of(const uint8_t* data, size_t header_bytes) {
  Xxh64 h;
  h.update(data, kOffHeaderHash);
  const uint8_t zero[8] = {};
  h.update(zero, 8);
  h.update(data + kOffHeaderHash + 8, header_bytes - kOffHeaderHash - 8);
  return h.digest();
}

PackedHeader decode_impl(const uint8_t* data, size_t size, uint64_t file_size, const std::string& name,
                         bool verify_hash) {
  PackedHeader h;
  h.header_bytes = check_prelude(data, size, file_size, name);
  if (size < h.header_bytes)
    throw Error(name + ": header needs " + std::to_string(h.header_bytes) + " bytes, only " + std::to_string(size) +
                " given");
  h.format_version = get_u32(data + kOffVersion);
  h.payload_bytes = get_u64(data + kOffPayloadBytes);
  h.payload_hash = get_u64(data + kOffPayloadHash);
  h.header_hash = get_u64(data + kOffHeaderHash);
  if (verify_hash) {
    const uint64_t got = header_hash_of(data, size_t(h.header_bytes));
    if (got != h.header_hash)
      throw Error(name + ": header checksum mismatch (stored xxh64 " + hex64(h.header_hash) + ", computed " +
                  hex64(got) + "): the file's header is corrupted");
  }
  if (get_u32(data + 12) != 0 || get_u64(data + 48) != 0 || get_u64(data + 56) != 0)
    throw Error(name + ": reserved header bytes are not zero: the file is corrupted or from a newer writer");

  Reader r{data, size_t(h.header_bytes), size_t(kPackedPreludeBytes), name};
  h.writer = r.str("writer");
  h.layout.name = r.str("layout name");
  h.layout.version = r.u32("layout version");
  h.layout.target = r.str("layout target");
  h.spec = decode_spec(r);
  const uint32_t count = r.u32("blob count");
  if (count > kPackedMaxBlobs)
    throw Error(name + ": header declares " + std::to_string(count) + " blobs, over the limit of " +
                std::to_string(kPackedMaxBlobs) + ": the file is corrupted");

  // The declared total must fit the file before any blob is looked at: a cut-off copy says so plainly.
  if (h.payload_bytes > file_size - h.header_bytes)
    throw Error(name + ": qmoe packed file is truncated: header declares " + std::to_string(h.header_bytes) + " + " +
                std::to_string(h.payload_bytes) + " bytes, the file has " + std::to_string(file_size));
  if (h.payload_bytes != file_size - h.header_bytes)
    throw Error(name + ": file has " + std::to_string(file_size - h.header_bytes - h.payload_bytes) +
                " bytes after the declared payload: not a file save_packed wrote, or corrupted");

  uint64_t cursor = h.header_bytes;  // blobs follow each other at the next 64-byte boundary
  std::set<std::string> names;
  for (uint32_t i = 0; i < count; ++i) {
    PackedBlobEntry b;
    b.name = r.str("blob name");
    const std::string bn = "blob " + std::to_string(i) + " '" + printable(b.name) + "'";
    if (b.name.empty() || !names.insert(b.name).second)
      throw Error(name + ": " + bn + ": empty or duplicate blob name: the file is corrupted");
    const std::string dt = r.str("blob dtype");
    try {
      b.dtype = parse_dtype(dt);
    } catch (const Error& e) {
      throw Error(name + ": " + bn + ": " + e.what());
    }
    const uint32_t rank = r.u32("blob rank");
    if (rank > kPackedMaxRank)
      throw Error(name + ": " + bn + ": rank " + std::to_string(rank) + " over the limit of " +
                  std::to_string(kPackedMaxRank));
    for (uint32_t d = 0; d < rank; ++d) b.shape.push_back(r.i64("blob shape"));
    b.offset = r.u64("blob offset");
    b.nbytes = r.u64("blob byte length");
    // Bounds against the file first: these numbers decide how much is allocated and read.
    if (b.offset > file_size || b.nbytes > file_size - b.offset)
      throw Error(name + ": " + bn + " declares " + std::to_string(b.nbytes) + " bytes at offset " +
                  std::to_string(b.offset) + ", past the end of the file (" + std::to_string(file_size) +
                  " bytes): the file is truncated or corrupted");
    if (b.nbytes > kPackedMaxBlobBytes)
      throw Error(name + ": " + bn + " declares " + std::to_string(b.nbytes) + " bytes, over the limit of " +
                  std::to_string(kPackedMaxBlobBytes));
    int64_t numel;
    try {
      numel = shape_numel(b.shape);
    } catch (const Error& e) {
      throw Error(name + ": " + bn + ": " + e.what());
    }
    if (uint64_t(numel) > kPackedMaxBlobBytes || uint64_t(numel) * dtype_size(b.dtype) != b.nbytes)
      throw Error(name + ": " + bn + ": shape " + shape_str(b.shape) + " of " + std::string(dtype_name(b.dtype)) +
                  " does not match its byte length " + std::to_string(b.nbytes) + ": the file is corrupted");
    if (b.offset != align_up(cursor))
      throw Error(name + ": " + bn + " starts at offset " + std::to_string(b.offset) + ", expected " +
                  std::to_string(align_up(cursor)) + " (blobs follow each other at 64-byte boundaries)");
    cursor = b.offset + b.nbytes;
    h.blobs.push_back(std::move(b));
  }
  if (align_up(cursor) != file_size)
    throw Error(name + ": blobs end at byte " + std::to_string(cursor) + " but the payload runs to " +
                std::to_string(file_size) + ": the file is corrupted");
  for (size_t i = r.pos; i < size_t(h.header_bytes); ++i)
    if (data[i] != 0) throw Error(name + ": header padding is not zero: the file is corrupted");
  return h;
}

// ---- POSIX file helpers ----
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

std::string errno_str() { return std::strerror(errno); }

// Reads exactly n bytes at off; a short read means the file shrank under us.
void pread_all(int fd, void* dst, size_t n, uint64_t off, const std::string& name) {
  uint8_t* p = static_cast<uint8_t*>(dst);
  while (n) {
    const ssize_t got = ::pread(fd, p, n, off_t(off));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw Error(name + ": read failed at offset " + std::to_string(off) + ": " + errno_str());
    }
    if (got == 0) throw Error(name + ": unexpected end of file at offset " + std::to_string(off) + " (truncated)");
    p += got;
    n -= size_t(got);
    off += uint64_t(got);
  }
}

void write_all(int fd, const void* src, size_t n, const std::string& name) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  while (n) {
    const ssize_t put = ::write(fd, p, n);
    if (put < 0) {
      if (errno == EINTR) continue;
      throw Error(name + ": write failed: " + errno_str());
    }
    p += put;
    n -= size_t(put);
  }
}

struct OpenFile {
  Fd fd;
  uint64_t size = 0;
  std::vector<uint8_t> prelude;  // up to 64 bytes
};

OpenFile open_for_read(const std::string& path) {
  OpenFile f;
  f.fd.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd.fd < 0) throw Error(path + ": cannot open: " + errno_str());
  struct stat st;
  if (::fstat(f.fd.fd, &st) != 0) throw Error(path + ": cannot stat: " + errno_str());
  if (!S_ISREG(st.st_mode)) throw Error(path + ": not a regular file");
  f.size = uint64_t(st.st_size);
  f.prelude.resize(size_t(std::min<uint64_t>(f.size, kPackedPreludeBytes)));
  pread_all(f.fd.fd, f.prelude.data(), f.prelude.size(), 0, path);
  return f;
}

// Reads and checks the header: prelude, size, checksum, fields. The buffer is sized from header_bytes
// only after check_prelude bounded it by the file size and the 16 MiB limit.
PackedHeader read_header(OpenFile& f, const std::string& path) {
  const uint64_t hb = check_prelude(f.prelude.data(), f.prelude.size(), f.size, path);
  std::vector<uint8_t> head(static_cast<size_t>(hb));
  pread_all(f.fd.fd, head.data(), head.size(), 0, path);
  return decode_impl(head.data(), head.size(), f.size, path, true);
}

// Hashes the payload; with `blobs` non-null also reads each blob into a new tensor.
uint64_t read_payload(OpenFile& f, const PackedHeader& h, const std::string& path, std::vector<NamedTensor>* blobs) {
  Xxh64 hash;
  std::vector<uint8_t> scratch;
  uint64_t pos = h.header_bytes;
  auto skim = [&](uint64_t end) {  // hash bytes we do not keep (padding, or everything when !blobs)
    while (pos < end) {
      const size_t n = size_t(std::min<uint64_t>(kChunk, end - pos));
      scratch.resize(std::max(scratch.size(), n));
      pread_all(f.fd.fd, scratch.data(), n, pos, path);
      hash.update(scratch.data(), n);
      pos += n;
    }
  };
  if (blobs) {
    for (const PackedBlobEntry& b : h.blobs) {
      skim(b.offset);
      Tensor t(b.dtype, b.shape);  // size already bounded by the file (decode_impl)
      uint8_t* dst = t.data_as<uint8_t>();
      for (uint64_t done = 0; done < b.nbytes;) {
        const size_t n = size_t(std::min<uint64_t>(kChunk, b.nbytes - done));
        pread_all(f.fd.fd, dst + done, n, pos, path);
        hash.update(dst + done, n);
        done += n;
        pos += n;
      }
      blobs->push_back({b.name, std::move(t)});
    }
  }
  skim(f.size);
  return hash.digest();
}

std::atomic<uint64_t> g_tmp_counter{0};

}  // namespace

// ---------------------------------------------------------------------------------------------

std::vector<uint8_t> encode_packed_header(PackedHeader& h) {
  Writer w;
  w.b.resize(kPackedPreludeBytes, 0);
  w.str(h.writer);
  w.str(h.layout.name);
  w.u32(h.layout.version);
  w.str(h.layout.target);
  encode_spec(w, h.spec);
  w.u32(uint32_t(h.blobs.size()));
  for (const PackedBlobEntry& b : h.blobs) {
    w.str(b.name);
    w.str(std::string(dtype_name(b.dtype)));
    w.u32(uint32_t(b.shape.size()));
    for (int64_t d : b.shape) w.i64(d);
    w.u64(b.offset);
    w.u64(b.nbytes);
  }
  w.b.resize(size_t(align_up(w.b.size())), 0);
  h.header_bytes = w.b.size();
  h.format_version = kPackedFormatVersion;
  uint8_t* p = w.b.data();
  std::memcpy(p, kPackedMagic.data(), kPackedMagic.size());
  for (int i = 0; i < 4; ++i) p[kOffVersion + i] = uint8_t(h.format_version >> (8 * i));
  put_u64(p + kOffHeaderBytes, h.header_bytes);
  put_u64(p + kOffPayloadBytes, h.payload_bytes);
  put_u64(p + kOffPayloadHash, h.payload_hash);
  h.header_hash = header_hash_of(p, w.b.size());
  put_u64(p + kOffHeaderHash, h.header_hash);
  return std::move(w.b);
}

PackedHeader decode_packed_header(const uint8_t* data, size_t size, uint64_t file_size, const std::string& name) {
  return decode_impl(data, size, file_size, name, true);
}

bool has_packed_magic(const void* prefix, size_t n) {
  return n >= kPackedMagic.size() && std::memcmp(prefix, kPackedMagic.data(), kPackedMagic.size()) == 0;
}

std::string sniff_file_kind(const void* prefix, size_t n, uint64_t file_size) {
  const uint8_t* p = static_cast<const uint8_t*>(prefix);
  auto starts = [&](const char* s, size_t len) { return n >= len && std::memcmp(p, s, len) == 0; };
  if (file_size == 0) return "an empty file";
  if (n >= 7 && std::memcmp(p + 1, "QMOEPK", 6) == 0)
    return "a qmoe packed file whose magic bytes were altered (copied in text mode?)";
  if (starts("\x93NUMPY", 6)) return "a NumPy .npy file (raw tensor data, not packed weights)";
  if (starts("PK\x03\x04", 4)) return "a zip archive (.npz or a PyTorch checkpoint)";
  if (starts("GGUF", 4)) return "a GGUF file";
  if (n >= 9) {
    const uint64_t len = get_u64(p);
    if (p[8] == '{' && len >= 2 && len <= file_size - 8) return "a safetensors file (raw tensors, not packed weights)";
  }
  // ModelProto's first field is normally ir_version (field 1, varint): tag byte 0x08.
  if (p[0] == 0x08) return "an ONNX model (protobuf starting with ir_version)";
  // Text: printable ASCII, whitespace and well-formed UTF-8 sequences (one cut at the end is fine).
  bool text = true;
  for (size_t i = 0; i < n && text;) {
    const uint8_t c = p[i];
    if (c < 0x80) {
      text = !(c < 0x09 || (c > 0x0d && c < 0x20) || c == 0x7f);
      ++i;
      continue;
    }
    const size_t len = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
    if (len == 0) text = false;
    for (size_t j = 1; text && j < len && i + j < n; ++j) text = (p[i + j] & 0xC0) == 0x80;
    i += len ? len : 1;
  }
  if (text) return "a text file";
  return "unrecognized binary data (a headerless raw dump?)";
}

void save_packed(const std::string& path, const PackedExperts& packed, const std::string& writer) {
  std::vector<NamedTensor> blobs = packed.to_blobs();
  PackedHeader h;
  h.writer = writer;
  h.layout = packed.tag();
  h.spec = packed.spec();
  if (h.layout.name.size() > kPackedMaxString || h.layout.target.size() > kPackedMaxString ||
      writer.size() > kPackedMaxString)
    throw Error(path + ": layout name, target or writer string longer than " + std::to_string(kPackedMaxString));
  if (blobs.size() > kPackedMaxBlobs)
    throw Error(path + ": " + std::to_string(blobs.size()) + " blobs, over the limit of " +
                std::to_string(kPackedMaxBlobs));
  std::set<std::string> names;
  for (const NamedTensor& b : blobs) {
    if (b.name.empty() || b.name.size() > kPackedMaxString || !names.insert(b.name).second)
      throw Error(path + ": blob name '" + printable(b.name) + "' is empty, too long or used twice");
    if (b.tensor.empty()) throw Error(path + ": blob '" + b.name + "' has no data");
    if (b.tensor.rank() > int(kPackedMaxRank))
      throw Error(path + ": blob '" + b.name + "' has rank " + std::to_string(b.tensor.rank()) + ", over the limit of " +
                  std::to_string(kPackedMaxRank));
    h.blobs.push_back({b.name, b.tensor.dtype(), b.tensor.shape(), 0, uint64_t(b.tensor.nbytes())});
  }
  // Offsets depend on the header's length, which does not depend on offsets or hashes (fixed width).
  encode_packed_header(h);
  uint64_t cursor = h.header_bytes;
  for (PackedBlobEntry& b : h.blobs) {
    b.offset = align_up(cursor);
    cursor = b.offset + b.nbytes;
  }
  h.payload_bytes = align_up(cursor) - h.header_bytes;

  const std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(g_tmp_counter++);
  Fd fd;
  fd.fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd.fd < 0) throw Error(path + ": cannot create temporary file " + tmp + ": " + errno_str());
  try {
    // Payload first (hashing as it goes), then the header with the hash over the placeholder.
    const std::vector<uint8_t> placeholder(size_t(h.header_bytes), 0);
    write_all(fd.fd, placeholder.data(), placeholder.size(), tmp);
    Xxh64 hash;
    static const uint8_t zeros[kPackedAlign] = {};
    uint64_t pos = h.header_bytes;
    for (size_t i = 0; i < blobs.size(); ++i) {
      const size_t pad = size_t(h.blobs[i].offset - pos);
      write_all(fd.fd, zeros, pad, tmp);
      hash.update(zeros, pad);
      const uint8_t* src = blobs[i].tensor.data_as<uint8_t>();
      for (uint64_t done = 0; done < h.blobs[i].nbytes;) {
        const size_t n = size_t(std::min<uint64_t>(kChunk, h.blobs[i].nbytes - done));
        hash.update(src + done, n);
        write_all(fd.fd, src + done, n, tmp);
        done += n;
      }
      pos = h.blobs[i].offset + h.blobs[i].nbytes;
    }
    const size_t tail = size_t(h.header_bytes + h.payload_bytes - pos);
    write_all(fd.fd, zeros, tail, tmp);
    hash.update(zeros, tail);
    h.payload_hash = hash.digest();
    const std::vector<uint8_t> head = encode_packed_header(h);
    if (::pwrite(fd.fd, head.data(), head.size(), 0) != ssize_t(head.size()))
      throw Error(tmp + ": writing the header failed: " + errno_str());
    if (::fsync(fd.fd) != 0) throw Error(tmp + ": fsync failed: " + errno_str());
    if (::close(fd.fd) != 0) {
      fd.fd = -1;
      throw Error(tmp + ": close failed: " + errno_str());
    }
    fd.fd = -1;
    if (::rename(tmp.c_str(), path.c_str()) != 0) throw Error(path + ": rename from " + tmp + " failed: " + errno_str());
    // Make the rename itself durable (a crash right after could otherwise lose the directory entry).
    // Best effort: the file is complete either way.
    const size_t slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
  } catch (...) {
    if (fd.fd >= 0) {
      ::close(fd.fd);
      fd.fd = -1;
    }
    ::unlink(tmp.c_str());
    throw;
  }
}

std::unique_ptr<PackedExperts> load_packed(const std::string& path, Backend& backend,
                                           const std::optional<MoeSpec>& expected) {
  OpenFile f = open_for_read(path);
  const PackedHeader h = read_header(f, path);
  const LayoutTag want = backend.layout_for(h.spec);
  if (h.layout != want)
    throw Error(path + ": packed file holds layout " + printable(h.layout.to_string()) + ", but backend '" +
                backend.name() + "' runs layout " + want.to_string() + " for this spec; repack the model for it (qmoe pack --target " +
                want.target + ")");
  if (expected) {
    const std::string diff = spec_mismatch(h.spec, *expected);
    if (!diff.empty())
      throw Error(path + ": packed file was made for a different layer spec (" + diff + "); file spec: " +
                  h.spec.to_string());
  }
  std::vector<NamedTensor> blobs;
  const uint64_t got = read_payload(f, h, path, &blobs);
  if (got != h.payload_hash)
    throw Error(path + ": payload checksum mismatch (stored xxh64 " + hex64(h.payload_hash) + ", computed " +
                hex64(got) + "): the file is corrupted");
  try {
    return backend.from_blobs(h.spec, std::move(blobs));
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
}

PackedFileInfo inspect_packed(const std::string& path) {
  PackedFileInfo info;
  info.path = path;
  OpenFile f = open_for_read(path);
  info.file_bytes = f.size;
  // Not a packed file at all (magic, version, header larger than the file): same errors as load_packed.
  const uint64_t hb = check_prelude(f.prelude.data(), f.prelude.size(), f.size, path);
  std::vector<uint8_t> head(static_cast<size_t>(hb));
  pread_all(f.fd.fd, head.data(), head.size(), 0, path);
  // Checksum first, then the fields. A header whose fields do not decode (sizes past the end of the
  // file, bad strings, an invalid spec) is refused like load_packed refuses it: there is nothing
  // trustworthy to print. One whose fields decode but whose checksum fails is shown, marked damaged.
  const uint64_t stored = get_u64(head.data() + kOffHeaderHash), computed = header_hash_of(head.data(), head.size());
  const bool hash_ok = stored == computed;
  const std::string hash_problem = "header checksum mismatch (stored xxh64 " + hex64(stored) + ", computed " +
                                   hex64(computed) + "): the header is corrupted";
  try {
    info.header = decode_impl(head.data(), head.size(), f.size, path, false);
  } catch (const Error& e) {
    if (hash_ok) throw;
    throw Error(path + ": " + hash_problem + "; its fields do not decode either: " + e.what());
  }
  if (!hash_ok) info.problem = hash_problem + "; the fields shown may be wrong";
  if (!hash_ok) return info;
  info.header_ok = true;
  try {
    const uint64_t got = read_payload(f, *info.header, path, nullptr);
    info.payload_ok = got == info.header->payload_hash;
    if (!info.payload_ok)
      info.problem = "payload checksum mismatch (stored xxh64 " + hex64(info.header->payload_hash) + ", computed " +
                     hex64(got) + "): the payload is corrupted";
  } catch (const Error& e) {
    info.problem = e.what();
  }
  return info;
}

std::string PackedFileInfo::to_string() const {
  StrBuilder os;
  os << "qmoe packed file " << path << " (" << file_bytes << " bytes)\n";
  if (!header) {
    os << "  header: unreadable: " << problem << "\n";
    return os.str();
  }
  const PackedHeader& h = *header;
  const MoeSpec& s = h.spec;
  os << "  format version " << h.format_version << ", written by '" << printable(h.writer) << "'\n";
  os << "  layout: " << printable(h.layout.to_string()) << "\n";
  os << "  spec: " << s.to_string() << "\n";
  os << "    num_experts=" << s.num_experts << " hidden=" << s.hidden << " inter=" << s.inter << " k=" << s.k
     << " bits=" << s.bits << " block_size=" << s.block_size << "\n";
  os << "    activation=" << activation_name(s.activation) << " swiglu_fusion=" << int(s.swiglu_fusion)
     << " swiglu_limit=" << s.swiglu_limit << " activation_alpha=" << s.activation_alpha
     << " activation_beta=" << s.activation_beta << "\n";
  os << "    normalize_routing_weights=" << s.normalize_routing_weights << " use_sparse_mixer=" << s.use_sparse_mixer
     << " T=" << dtype_name(s.act_dtype) << " T2=" << dtype_name(s.scale_dtype) << "\n";
  os << "    bias fc1/fc2/fc3=" << s.fc1_bias << s.fc2_bias << s.fc3_bias << " zero_points fc1/fc2/fc3="
     << s.fc1_zero_points << s.fc2_zero_points << s.fc3_zero_points << "\n";
  os << "  header: " << h.header_bytes << " bytes, checksum xxh64 " << hex64(h.header_hash) << " "
     << (header_ok ? "ok" : "BAD") << "\n";
  os << "  payload: " << h.payload_bytes << " bytes at offset " << h.header_bytes << ", checksum xxh64 "
     << hex64(h.payload_hash) << " " << (payload_ok ? "ok" : header_ok ? "BAD" : "not checked") << "\n";
  os << "  blobs (" << h.blobs.size() << "):\n";
  char line[256];
  std::snprintf(line, sizeof line, "    %-24s %-9s %-22s %14s %14s\n", "name", "dtype", "shape", "offset", "bytes");
  os << line;
  for (const PackedBlobEntry& b : h.blobs) {
    std::snprintf(line, sizeof line, "    %-24s %-9s %-22s %14llu %14llu\n", printable(b.name).c_str(),
                  std::string(dtype_name(b.dtype)).c_str(), shape_str(b.shape).c_str(), (unsigned long long)b.offset,
                  (unsigned long long)b.nbytes);
    os << line;
  }
  if (!problem.empty()) os << "  problem: " << problem << "\n";
  os << "  status: " << (header_ok && payload_ok ? "OK" : "DAMAGED") << "\n";
  return os.str();
}

}  // namespace qmoe
