// safetensors reader (mmap + validated header) and atomic writer. See include/qmoe/safetensors.h.
//
// Order of checks when opening, each before anything depending on it: file size >= 8; header length
// <= min(file size - 8, kSafetensorsMaxHeader); JSON nesting depth (nlohmann's value destructor and
// our walk must not recurse without bound); the JSON shape of every entry; shape element counts
// (overflow-checked); byte lengths against the dtype; offsets within the data region; no two tensors
// overlapping. Only then are views handed out.
#include "qmoe/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>

#include "checkpoint/file_util.h"
#include "qmoe/error.h"

namespace qmoe {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Element sizes of every dtype the safetensors format defines, so offsets of tensors qmoe cannot
// compute with (I64 position ids, FP8 weights) are still checked. 0 = unknown dtype string.
struct DtypeInfo {
  const char* name;
  size_t size;
  std::optional<DType> qmoe;
};
const DtypeInfo kDtypes[] = {
    {"F32", 4, DType::f32},  {"F16", 2, DType::f16},      {"BF16", 2, DType::bf16},
    {"U8", 1, DType::u8},    {"F64", 8, std::nullopt},    {"I64", 8, std::nullopt},
    {"U64", 8, std::nullopt}, {"I32", 4, std::nullopt},   {"U32", 4, std::nullopt},
    {"I16", 2, std::nullopt}, {"U16", 2, std::nullopt},   {"I8", 1, std::nullopt},
    {"BOOL", 1, std::nullopt}, {"F8_E4M3", 1, std::nullopt}, {"F8_E5M2", 1, std::nullopt},
};

const DtypeInfo* find_dtype(const std::string& s) {
  for (const DtypeInfo& d : kDtypes)
    if (s == d.name) return &d;
  return nullptr;
}

// Deepest legal header: object -> entry -> shape array = 3; 16 leaves room for odd but harmless
// metadata while refusing "[[[[...]]]]" bombs before nlohmann builds (and later destroys) them.
constexpr int kMaxJsonDepth = 16;

void check_json_depth(const std::string& path, const char* p, size_t n) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < n; ++i) {
    const char c = p[i];
    if (in_string) {
      if (c == '\\') ++i;  // skip the escaped character (a quote or backslash must not end the string)
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if (c == '{' || c == '[') {
      if (++depth > kMaxJsonDepth)
        throw Error(path + ": safetensors header nests deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
}

// An mmap region released when the last Tensor viewing it goes away.
struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr) munmap(addr, size);
  }
};

uint64_t json_u64(const json& v, const std::string& what) {
  if (!v.is_number_unsigned()) {
    // nlohmann stores non-negative literals as unsigned; anything else (negative, float, string) is bad.
    throw Error(what + ": expected a non-negative integer, got " + v.dump());
  }
  return v.get<uint64_t>();
}

SafetensorsEntry parse_entry(const std::string& where, const std::string& name, const json& v) {
  const std::string what = where + ": tensor '" + name + "'";
  if (!v.is_object()) throw Error(what + ": expected an object with dtype, shape, data_offsets");
  SafetensorsEntry e;
  e.name = name;
  const auto dt = v.find("dtype");
  const auto sh = v.find("shape");
  const auto off = v.find("data_offsets");
  if (dt == v.end() || !dt->is_string()) throw Error(what + ": missing string field 'dtype'");
  if (sh == v.end() || !sh->is_array()) throw Error(what + ": missing array field 'shape'");
  if (off == v.end() || !off->is_array() || off->size() != 2)
    throw Error(what + ": 'data_offsets' must be an array [begin, end]");
  e.dtype_name = dt->get<std::string>();
  const DtypeInfo* info = find_dtype(e.dtype_name);
  if (!info) throw Error(what + ": unknown dtype '" + e.dtype_name + "'");
  e.dtype = info->qmoe;
  if (sh->size() > 8) throw Error(what + ": rank " + std::to_string(sh->size()) + " is larger than 8");
  for (const json& d : *sh) {
    const uint64_t dim = json_u64(d, what + " shape");
    if (dim > uint64_t(INT64_MAX)) throw Error(what + ": shape dimension " + std::to_string(dim) + " is too large");
    e.shape.push_back(int64_t(dim));
  }
  e.begin = json_u64((*off)[0], what + " data_offsets[0]");
  e.end = json_u64((*off)[1], what + " data_offsets[1]");
  if (e.end < e.begin)
    throw Error(what + ": data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "] end before begin");
  int64_t numel;
  try {
    numel = shape_numel(e.shape);
  } catch (const Error& err) {
    throw Error(what + ": " + err.what());
  }
  if (uint64_t(numel) > UINT64_MAX / info->size) throw Error(what + ": shape " + shape_str(e.shape) + " is too large");
  const uint64_t want = uint64_t(numel) * info->size;
  if (e.end - e.begin != want)
    throw Error(what + ": " + e.dtype_name + " " + shape_str(e.shape) + " needs " + std::to_string(want) +
                " bytes, data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "] hold " +
                std::to_string(e.end - e.begin));
  return e;
}

}  // namespace

const char* safetensors_dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::f16: return "F16";
    case DType::bf16: return "BF16";
    case DType::u8: return "U8";
  }
  throw Error("safetensors: no name for dtype " + std::to_string(int(t)));
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path + ": not a regular file");
  }
  const uint64_t file_size = uint64_t(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    throw Error(path + ": " + std::to_string(file_size) + " bytes is too short for a safetensors file (needs an 8-byte header length)");
  }
  auto mapping = std::make_shared<Mapping>();
  void* addr = mmap(nullptr, size_t(file_size), PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);  // the mapping keeps the file contents reachable
  if (addr == MAP_FAILED) throw Error(path + ": mmap failed (" + std::strerror(map_errno) + ")");
  mapping->addr = addr;
  mapping->size = size_t(file_size);
  const auto* base = static_cast<const uint8_t*>(addr);

  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= uint64_t(base[i]) << (8 * i);  // little-endian on any host
  if (header_len > kSafetensorsMaxHeader)
    throw Error(path + ": header length " + std::to_string(header_len) + " exceeds the " +
                std::to_string(kSafetensorsMaxHeader) + "-byte limit (not a safetensors file?)");
  if (header_len > file_size - 8)
    throw Error(path + ": header length " + std::to_string(header_len) + " runs past the end of the " +
                std::to_string(file_size) + "-byte file");
  if (header_len < 2 || base[8] != '{')
    throw Error(path + ": header does not start with a JSON object (not a safetensors file?)");
  const char* hdr = reinterpret_cast<const char*>(base + 8);
  check_json_depth(path, hdr, size_t(header_len));
  json j;
  try {
    j = json::parse(hdr, hdr + header_len);
  } catch (const json::exception& e) {
    throw Error(path + ": header is not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) throw Error(path + ": header is not a JSON object");

  const uint64_t data_size = file_size - 8 - header_len;
  auto entries = std::make_shared<std::vector<SafetensorsEntry>>();
  auto metadata = std::make_shared<std::map<std::string, std::string>>();
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) throw Error(path + ": __metadata__ must be an object of strings");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) throw Error(path + ": __metadata__['" + m.key() + "'] is not a string");
        (*metadata)[m.key()] = m->get<std::string>();
      }
      continue;
    }
    entries->push_back(parse_entry(path, it.key(), *it));
  }
  // Offsets: each range inside the data region, and no two overlapping (sorted by begin, each must
  // start at or after the previous end). Zero-byte tensors overlap nothing.
  std::sort(entries->begin(), entries->end(), [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const SafetensorsEntry* prev = nullptr;
  for (const SafetensorsEntry& e : *entries) {
    if (e.end > data_size)
      throw Error(path + ": tensor '" + e.name + "' data_offsets [" + std::to_string(e.begin) + ", " +
                  std::to_string(e.end) + "] run past the " + std::to_string(data_size) + "-byte data region");
    if (e.begin == e.end) continue;
    if (prev && e.begin < prev->end)
      throw Error(path + ": tensors '" + prev->name + "' [" + std::to_string(prev->begin) + ", " +
                  std::to_string(prev->end) + ") and '" + e.name + "' [" + std::to_string(e.begin) + ", " +
                  std::to_string(e.end) + ") overlap");
    prev = &e;
  }
  auto index = std::make_shared<std::map<std::string, size_t>>();
  for (size_t i = 0; i < entries->size(); ++i) (*index)[(*entries)[i].name] = i;

  SafetensorsFile f;
  f.path_ = path;
  f.mapping_ = mapping;
  f.data_ = base + 8 + header_len;
  f.entries_ = std::move(entries);
  f.index_ = std::move(index);
  f.metadata_ = std::move(metadata);
  return f;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(entries_->size());
  for (const SafetensorsEntry& e : *entries_) out.push_back(e.name);
  return out;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  const auto it = index_->find(name);
  if (it == index_->end()) throw Error(path_ + ": no tensor named '" + name + "'");
  return (*entries_)[it->second];
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  if (!e.dtype)
    throw Error(path_ + ": tensor '" + name + "' has dtype " + e.dtype_name +
                ", which qmoe does not read (F32, F16, BF16 or U8; convert the checkpoint first)");
  // The data pointer of a zero-byte tensor may sit at the very end of the mapping; it is never read.
  void* p = const_cast<uint8_t*>(data_ + e.begin);
  Tensor t = Tensor::wrap(*e.dtype, e.shape, p, mapping_);
  // Misaligned fp32/fp16 loads are undefined behaviour in C++ (and slow on some CPUs): copy those.
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(*e.dtype) != 0) return Tensor::copy_of(t.view());
  return t;
}

Tensor SafetensorsFile::bytes(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  return Tensor::wrap(DType::u8, {int64_t(e.end - e.begin)}, const_cast<uint8_t*>(data_ + e.begin), mapping_);
}

// ---- checkpoint (one file or shards) ----

namespace {

// A shard name from an index is trusted only as a plain relative path below the folder: an index
// is data, and "../../etc/passwd" or "/dev/zero" must not make qmoe open files elsewhere.
fs::path confined_path(const fs::path& folder, const std::string& name, const std::string& index_path) {
  const fs::path rel(name);
  if (name.empty() || rel.is_absolute() || rel.has_root_name() || rel.has_root_directory())
    throw Error(index_path + ": shard path '" + name + "' must be relative to the checkpoint folder");
  for (const fs::path& part : rel)
    if (part == "..")
      throw Error(index_path + ": shard path '" + name + "' leaves the checkpoint folder ('..')");
  return folder / rel;
}

std::string read_small_file(const fs::path& p, uint64_t limit) {
  std::error_code ec;
  const auto size = fs::file_size(p, ec);
  if (ec) throw Error(p.string() + ": cannot read (" + ec.message() + ")");
  if (size > limit) throw Error(p.string() + ": " + std::to_string(size) + " bytes is larger than the " + std::to_string(limit) + "-byte limit");
  std::ifstream in(p, std::ios::binary);
  if (!in) throw Error(p.string() + ": cannot open");
  std::string s(size_t(size), '\0');
  in.read(s.data(), std::streamsize(size));
  if (!in) throw Error(p.string() + ": read failed");
  return s;
}

std::mutex& shard_mutex() {
  // One lock for lazy shard opening across all checkpoints; opening is rare and cheap to serialise.
  static std::mutex m;
  return m;
}

}  // namespace

SafetensorsCheckpoint SafetensorsCheckpoint::open(const std::string& path_in) {
  const fs::path path(path_in);
  std::error_code ec;
  SafetensorsCheckpoint c;
  c.files_ = std::make_shared<std::map<std::string, SafetensorsFile>>();
  auto add_file = [&](const fs::path& p) {
    SafetensorsFile f = SafetensorsFile::open(p.string());
    for (const std::string& n : f.names()) {
      const auto [it, fresh] = c.where_.emplace(n, p.string());
      if (!fresh) throw Error(c.folder_ + ": tensor '" + n + "' appears in both " + it->second + " and " + p.string());
    }
    (*c.files_)[p.string()] = std::move(f);
  };
  auto load_index = [&](const fs::path& index_path) {
    const fs::path folder = index_path.parent_path().empty() ? fs::path(".") : index_path.parent_path();
    c.folder_ = folder.string();
    json j;
    try {
      const std::string text = read_small_file(index_path, kSafetensorsMaxHeader);
      check_json_depth(index_path.string(), text.data(), text.size());
      j = json::parse(text);
    } catch (const json::exception& e) {
      throw Error(index_path.string() + ": not valid JSON (" + e.what() + ")");
    }
    const auto wm = j.is_object() ? j.find("weight_map") : j.end();
    if (wm == j.end() || !wm->is_object()) throw Error(index_path.string() + ": no 'weight_map' object");
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it->is_string()) throw Error(index_path.string() + ": weight_map['" + it.key() + "'] is not a string");
      c.where_[it.key()] = confined_path(folder, it->get<std::string>(), index_path.string()).string();
    }
  };

  if (fs::is_directory(path, ec)) {
    c.folder_ = path.string();
    const fs::path index = path / "model.safetensors.index.json";
    if (fs::exists(index, ec)) {
      load_index(index);
    } else {
      std::vector<fs::path> files;
      for (const auto& de : fs::directory_iterator(path, ec))
        if (de.path().extension() == ".safetensors" && de.is_regular_file(ec)) files.push_back(de.path());
      if (ec) throw Error(path.string() + ": cannot list (" + ec.message() + ")");
      if (files.empty())
        throw Error(path.string() + ": no model.safetensors.index.json and no *.safetensors files in the folder");
      std::sort(files.begin(), files.end());
      for (const fs::path& f : files) add_file(f);
    }
  } else if (path.extension() == ".json") {
    load_index(path);
  } else {
    c.folder_ = path.parent_path().empty() ? "." : path.parent_path().string();
    add_file(path);
  }
  return c;
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [n, f] : where_) out.push_back(n);
  return out;
}

const SafetensorsFile& SafetensorsCheckpoint::file_of(const std::string& name) const {
  const auto w = where_.find(name);
  if (w == where_.end()) throw Error(folder_ + ": checkpoint has no tensor named '" + name + "'");
  std::lock_guard<std::mutex> lock(shard_mutex());
  auto it = files_->find(w->second);
  if (it == files_->end()) it = files_->emplace(w->second, SafetensorsFile::open(w->second)).first;
  if (!it->second.contains(name))
    throw Error(w->second + ": the index says it holds tensor '" + name + "', but the file has no such tensor");
  return it->second;
}

const SafetensorsEntry& SafetensorsCheckpoint::entry(const std::string& name) const { return file_of(name).entry(name); }

Tensor SafetensorsCheckpoint::tensor(const std::string& name) const { return file_of(name).tensor(name); }

Tensor SafetensorsCheckpoint::bytes(const std::string& name) const { return file_of(name).bytes(name); }

// ---- writer ----

void write_safetensors(const std::string& path, const std::vector<NamedView>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Largest elements first: with the header padded to 8 bytes, every tensor then starts at a
  // multiple of its element size, so readers can use the mapping without copies. stable_sort keeps
  // the caller's order within one element size.
  std::vector<const NamedView*> order;
  std::set<std::string> seen;
  for (const NamedView& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__")
      throw Error(path + ": tensor name '" + t.name + "' is reserved or empty");
    if (!seen.insert(t.name).second) throw Error(path + ": tensor '" + t.name + "' given twice");
    if (t.view.nbytes() && !t.view.data) throw Error(path + ": tensor '" + t.name + "' has no data");
    order.push_back(&t);
  }
  std::stable_sort(order.begin(), order.end(), [](const NamedView* a, const NamedView* b) {
    return dtype_size(a->view.dtype) > dtype_size(b->view.dtype);
  });
  json h = json::object();
  if (!metadata.empty()) {
    json m = json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    h["__metadata__"] = m;
  }
  uint64_t offset = 0;
  for (const NamedView* t : order) {
    const uint64_t n = t->view.nbytes();
    h[t->name] = {{"dtype", safetensors_dtype_name(t->view.dtype)}, {"shape", t->view.shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string header = h.dump();
  header.append((8 - (8 + header.size()) % 8) % 8, ' ');

  AtomicFile out(path);
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(header.size()) >> (8 * i));
  out.write(len, 8);
  out.write(header.data(), header.size());
  for (const NamedView* t : order) out.write(t->view.data, t->view.nbytes());
  out.commit();
}

}  // namespace qmoe
