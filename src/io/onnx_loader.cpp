// ONNX loader (include/qmoe/onnx_model.h): turns a model holding one com.microsoft::QMoE node into a
// validated MoeSpec plus RawExperts, the same plain data every other entry point produces.
//
// The file is parsed with protobuf-lite classes generated from ONNX's own onnx.proto (see
// src/io/CMakeLists.txt for why they live in package `qmoe_onnx`). Everything after parsing is
// hostile-input checking: every dim, byte count, offset and path is checked before it is used, and
// every error names the file plus the tensor or attribute with the expected and the actual value.
// Rules this file decides (documented in docs/ONNX.md):
//  - T (activation dtype) comes from the declared element type of node input 0, else router_probs,
//    router_weights or the output, else a bias initializer; declared types must all agree.
//  - T2 is fc1_scales' dtype. E from fc1 weights; N1 = fc1_scales dim 1, H = fc2_scales dim 1
//    (scales have the same [E, N, ...] shape in both weight layouts, so they pin H and I down).
//  - The weights layout (contract §7): weights_prepacked = 0 means raw; otherwise the declared
//    shapes decide, and shapes that fit both layouts (H == I) are refused unless the caller states
//    the layout in OnnxLoadOptions.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string_view>

#include "qmoe/error.h"
#include "qmoe/onnx_model.h"
#include "qmoe/packed_file.h"
#include "qmoe/ort_cuda_layout.h"
#include "qmoe_onnx/onnx.pb.h"

namespace qmoe {

namespace {

namespace fs = std::filesystem;
namespace pb = ::qmoe_onnx;

// Contract §2: the operator's inputs, by index. 15-20 belong to the fp4/fp8 quant types.
constexpr const char* kInputNames[] = {
    "input",           "router_probs",       "fc1_experts_weights", "fc1_scales",        "fc1_experts_bias",
    "fc2_experts_weights", "fc2_scales",     "fc2_experts_bias",    "fc3_experts_weights", "fc3_scales",
    "fc3_experts_bias", "fc1_zero_points",   "fc2_zero_points",     "fc3_zero_points",   "router_weights",
    "fc1_global_scale", "fc2_global_scale",  "fc1_act_scale",       "fc2_act_scale",     "fc1_act_block_scale",
    "fc2_act_block_scale"};
constexpr int kNumInputs = int(sizeof(kInputNames) / sizeof(kInputNames[0]));
enum Input : int {
  kX = 0, kRouterProbs = 1, kFc1W = 2, kFc1S = 3, kFc1B = 4, kFc2W = 5, kFc2S = 6, kFc2B = 7,
  kFc3W = 8, kFc3S = 9, kFc3B = 10, kFc1Z = 11, kFc2Z = 12, kFc3Z = 13, kRouterWeights = 14,
  kFirstFp8Input = 15,
};

// ONNX TensorProto.DataType values qmoe maps (onnx.proto's enum; fixed by the ONNX standard).
std::optional<DType> dtype_from_onnx(int t) {
  switch (t) {
    case pb::TensorProto::FLOAT: return DType::f32;
    case pb::TensorProto::UINT8: return DType::u8;
    case pb::TensorProto::FLOAT16: return DType::f16;
    case pb::TensorProto::BFLOAT16: return DType::bf16;
    default: return std::nullopt;
  }
}

std::string onnx_type_name(int t) {
  if (pb::TensorProto_DataType_IsValid(t)) return pb::TensorProto_DataType_Name(pb::TensorProto_DataType(t));
  return "data type " + std::to_string(t);
}

std::string errno_text() { return std::strerror(errno); }

// A read-only view of a whole file through mmap; the mapping lives as long as any Tensor wrapping
// part of it (Tensor::wrap's owner), so large external weights are never copied.
class MappedFile {
 public:
  // `writable_copy`: map MAP_PRIVATE with PROT_WRITE so code that writes through Tensor::data()
  // gets copy-on-write pages instead of a fault; the file itself is never modified.
  static std::shared_ptr<MappedFile> open(const std::string& path, bool writable_copy) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error(path + ": cannot open: " + errno_text());
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const std::string msg = path + ": cannot stat: " + errno_text();
      ::close(fd);
      throw Error(msg);
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw Error(path + ": not a regular file");
    }
    auto m = std::shared_ptr<MappedFile>(new MappedFile());
    m->size_ = size_t(st.st_size);
    if (m->size_ > 0) {
      const int prot = writable_copy ? (PROT_READ | PROT_WRITE) : PROT_READ;
      void* p = ::mmap(nullptr, m->size_, prot, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const std::string msg = path + ": cannot map " + std::to_string(m->size_) + " bytes: " + errno_text();
        ::close(fd);
        throw Error(msg);
      }
      m->data_ = static_cast<uint8_t*>(p);
    }
    ::close(fd);  // the mapping stays valid without the descriptor
    return m;
  }
  ~MappedFile() {
    if (data_) ::munmap(data_, size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  MappedFile() = default;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Buffers qmoe allocates are 64-byte aligned; borrowed bytes are wrapped without a copy only when
// they are aligned as well, so no backend ever sees weaker alignment than qmoe's own tensors.
constexpr uintptr_t kWrapAlign = 64;

class Loader {
 public:
  Loader(std::string path, const OnnxLoadOptions& opt) : path_(std::move(path)), opt_(opt) {
    dir_ = fs::path(path_).parent_path();
    if (dir_.empty()) dir_ = ".";
  }

  OnnxLayer load();

 private:
  [[noreturn]] void fail(const std::string& what) const { throw Error(path_ + ": " + what); }

  void parse_model();
  void index_graph();
  void read_attributes();
  const std::string& input_name(int i) const {
    static const std::string empty;
    return i < node_->input_size() ? node_->input(i) : empty;
  }
  bool has_input(int i) const { return !input_name(i).empty(); }
  // The initializer feeding input i, loaded as a Tensor; error if it is not an initializer.
  Tensor initializer_for(int i);
  Tensor load_tensor(pb::TensorProto& t, const std::string& role);
  Tensor load_external(pb::TensorProto& t, const std::string& role, DType dtype, const Shape& shape);
  std::shared_ptr<MappedFile> external_file(const std::string& role, const std::string& location);
  DType infer_act_dtype(const RawExperts& raw) const;
  void check_declared_dims(const MoeSpec& spec) const;
  WeightsLayout decide_layout(const MoeSpec& spec, const Tensor& fc1, const Tensor& fc2) const;

  std::string path_;
  OnnxLoadOptions opt_;
  fs::path dir_;
  pb::ModelProto model_;
  pb::NodeProto* node_ = nullptr;
  std::map<std::string, pb::TensorProto*> inits_;
  std::map<std::string, bool> sparse_inits_;
  std::map<std::string, const pb::TypeProto*> declared_;  // graph inputs, outputs, value_info
  std::map<std::string, std::shared_ptr<MappedFile>> ext_files_;

  // Attribute values after defaults (contract §3).
  int64_t k_ = 1, normalize_ = 0, sparse_mixer_ = 0, bits_ = 4, swiglu_fusion_ = 0, prepacked_ = -1;
  std::optional<int64_t> block_size_;
  float limit_ = std::numeric_limits<float>::infinity(), alpha_ = 1.0f, beta_ = 0.0f;
  std::string activation_ = "relu", quant_type_ = "int";
};

void Loader::parse_model() {
  std::shared_ptr<MappedFile> file;
  try {
    file = MappedFile::open(path_, /*writable_copy=*/false);
  } catch (const Error& e) {
    throw Error(std::string(e.what()) + " (while loading an ONNX model)");
  }
  // Protobuf messages are limited to 2 GiB - 1; bigger models keep their weights in external data
  // files, which we read ourselves.
  if (file->size() > size_t(INT_MAX))
    fail("file is " + std::to_string(file->size()) + " bytes, above protobuf's 2 GiB message limit; save the "
         "model with external data (onnx.save_model(..., save_as_external_data=True))");
  if (has_packed_magic(file->data(), file->size()))
    fail("this is a qmoe packed weight file, not an ONNX model: load it with load_packed() "
         "(`qmoe run --packed`), or inspect it with `qmoe inspect`");
  google::protobuf::io::ArrayInputStream in(file->data(), int(file->size()));
  google::protobuf::io::CodedInputStream cis(&in);
  // The default limit may be lower than 2 GiB depending on the protobuf version; raise it to the
  // format's maximum so every file protobuf can represent parses.
  cis.SetTotalBytesLimit(INT_MAX);
  if (!model_.ParseFromCodedStream(&cis) || !cis.ConsumedEntireMessage())
    fail("not a valid ONNX model (protobuf parsing failed: the file is truncated, corrupt or not ONNX)");
  if (!model_.has_graph())
    fail("not an ONNX model (no graph; ir_version " + std::to_string(model_.ir_version()) + ")");
}

void Loader::index_graph() {
  pb::GraphProto& g = *model_.mutable_graph();
  if (g.node_size() != 1) {
    std::string ops;
    for (int i = 0; i < g.node_size() && i < 5; ++i) {
      const auto& n = g.node(i);
      ops += (i ? ", " : "") + (n.domain().empty() ? std::string("ai.onnx") : n.domain()) + "::" + n.op_type();
    }
    if (g.node_size() > 5) ops += ", ...";
    fail("expected a graph of exactly one node (com.microsoft::QMoE), found " + std::to_string(g.node_size()) +
         " nodes" + (ops.empty() ? std::string() : " (" + ops + ")"));
  }
  node_ = g.mutable_node(0);
  const std::string domain = node_->domain().empty() ? "ai.onnx" : node_->domain();
  if (node_->op_type() != "QMoE" || node_->domain() != "com.microsoft")
    fail("expected operator com.microsoft::QMoE, found " + domain + "::" + node_->op_type());

  for (int i = 0; i < g.initializer_size(); ++i) {
    pb::TensorProto* t = g.mutable_initializer(i);
    if (!inits_.emplace(t->name(), t).second) fail("initializer '" + t->name() + "' is defined twice");
  }
  for (int i = 0; i < g.sparse_initializer_size(); ++i) {
    const auto& s = g.sparse_initializer(i);
    sparse_inits_[s.values().name()] = true;
  }
  for (const auto& vi : g.input()) declared_[vi.name()] = &vi.type();
  for (const auto& vi : g.value_info()) declared_.emplace(vi.name(), &vi.type());
  for (const auto& vi : g.output()) declared_.emplace(vi.name(), &vi.type());

  if (node_->input_size() > kNumInputs)
    fail("QMoE node has " + std::to_string(node_->input_size()) + " inputs; the operator has at most " +
         std::to_string(kNumInputs));
  for (int i = kFirstFp8Input; i < node_->input_size(); ++i)
    if (!node_->input(i).empty())
      fail(std::string("input ") + std::to_string(i) + " (" + kInputNames[i] + ") is given ('" + node_->input(i) +
           "'): it belongs to the fp4/fp8 quant types, which qmoe does not implement (quant_type 'int' only)");
  for (int i : {int(kX), int(kRouterProbs), int(kFc1W), int(kFc1S), int(kFc2W), int(kFc2S)})
    if (!has_input(i))
      fail(std::string("required input ") + std::to_string(i) + " (" + kInputNames[i] + ") is missing (empty name)");
  if (node_->output_size() < 1 || node_->output(0).empty()) fail("QMoE node has no output");
  if (node_->output_size() > 1)
    fail("QMoE node has " + std::to_string(node_->output_size()) + " outputs; the operator has exactly 1");
}

void Loader::read_attributes() {
  enum Kind { kInt, kFloat, kString };
  struct Known {
    const char* name;
    Kind kind;
  };
  static const Known known[] = {
      {"k", kInt}, {"activation_type", kString}, {"normalize_routing_weights", kInt}, {"use_sparse_mixer", kInt},
      {"expert_weight_bits", kInt}, {"block_size", kInt}, {"swiglu_fusion", kInt}, {"swiglu_limit", kFloat},
      {"activation_alpha", kFloat}, {"activation_beta", kFloat}, {"quant_type", kString},
      {"weights_prepacked", kInt}};
  std::map<std::string, bool> seen;
  for (const pb::AttributeProto& a : node_->attribute()) {
    const Known* kn = nullptr;
    for (const Known& c : known)
      if (a.name() == c.name) kn = &c;
    if (!kn) {
      // An attribute we do not know could change the math; refuse rather than ignore it.
      std::string names;
      for (const Known& c : known) names += std::string(names.empty() ? "" : ", ") + c.name;
      fail("attribute '" + a.name() + "': unknown to qmoe (known: " + names + ")");
    }
    if (!seen.emplace(a.name(), true).second) fail("attribute '" + a.name() + "' is given twice");
    // Files from before IR version 4 may omit `type`; then the set field tells.
    int type = a.type();
    if (type == pb::AttributeProto::UNDEFINED)
      type = a.has_i() ? pb::AttributeProto::INT : a.has_f() ? pb::AttributeProto::FLOAT
             : a.has_s() ? pb::AttributeProto::STRING : pb::AttributeProto::UNDEFINED;
    const int want = kn->kind == kInt ? pb::AttributeProto::INT
                     : kn->kind == kFloat ? pb::AttributeProto::FLOAT : pb::AttributeProto::STRING;
    if (type != want) {
      const std::string got = pb::AttributeProto_AttributeType_IsValid(type)
                                  ? pb::AttributeProto_AttributeType_Name(pb::AttributeProto_AttributeType(type))
                                  : std::to_string(type);
      fail("attribute '" + a.name() + "': expected type " +
           pb::AttributeProto_AttributeType_Name(pb::AttributeProto_AttributeType(want)) + ", got " + got);
    }
    const std::string n = a.name();
    auto flag = [&](int64_t v) {
      if (v != 0 && v != 1) fail("attribute '" + n + "': expected 0 or 1, got " + std::to_string(v));
      return v;
    };
    if (n == "k") {
      k_ = a.i();
    } else if (n == "activation_type") {
      activation_ = a.s();
    } else if (n == "normalize_routing_weights") {
      normalize_ = flag(a.i());
    } else if (n == "use_sparse_mixer") {
      sparse_mixer_ = flag(a.i());
    } else if (n == "expert_weight_bits") {
      bits_ = a.i();
      if (bits_ != 2 && bits_ != 4 && bits_ != 8)
        fail("attribute 'expert_weight_bits': expected 2, 4 or 8, got " + std::to_string(bits_));
    } else if (n == "block_size") {
      block_size_ = a.i();
      const int64_t b = *block_size_;
      if (b < 0 || (b > 0 && (b < 16 || (b & (b - 1)) != 0)))
        fail("attribute 'block_size': expected 0 (row-wise) or a power of two >= 16, got " + std::to_string(b));
    } else if (n == "swiglu_fusion") {
      swiglu_fusion_ = a.i();
      if (swiglu_fusion_ < 0 || swiglu_fusion_ > 2)
        fail("attribute 'swiglu_fusion': expected 0, 1 or 2, got " + std::to_string(swiglu_fusion_));
    } else if (n == "swiglu_limit") {
      limit_ = a.f();
    } else if (n == "activation_alpha") {
      alpha_ = a.f();
    } else if (n == "activation_beta") {
      beta_ = a.f();
    } else if (n == "quant_type") {
      quant_type_ = a.s();
      if (quant_type_ != "int")
        fail("attribute 'quant_type': qmoe implements 'int' only, got '" + quant_type_ + "'");
    } else if (n == "weights_prepacked") {
      prepacked_ = a.i();
      if (prepacked_ < -1 || prepacked_ > 1)
        fail("attribute 'weights_prepacked': expected -1, 0 or 1, got " + std::to_string(prepacked_));
    }
  }
}

// Parses a decimal byte count from an external_data entry ("offset", "length"): digits only.
std::optional<uint64_t> parse_u64(const std::string& s) {
  if (s.empty()) return std::nullopt;
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size()) return std::nullopt;
  return v;
}

std::shared_ptr<MappedFile> Loader::external_file(const std::string& role, const std::string& location) {
  // ONNX external data is addressed relative to the model's folder. Refuse anything that could name
  // a file elsewhere: absolute paths, '..' after normalisation, and symlinks resolving outside.
  if (location.empty()) fail(role + ": external data has an empty 'location'");
  if (location.find('\0') != std::string::npos) fail(role + ": external data 'location' contains a NUL byte");
  const fs::path loc(location);
  if (loc.is_absolute() || loc.has_root_name() || loc.has_root_directory())
    fail(role + ": external data location '" + location + "' is absolute; it must be relative to the model's folder");
  const fs::path norm = loc.lexically_normal();
  if (norm.empty() || *norm.begin() == ".." || norm == ".")
    fail(role + ": external data location '" + location + "' escapes the model's folder " + dir_.string());
  std::error_code ec;
  const fs::path base = fs::canonical(dir_, ec);
  if (ec) fail("cannot resolve the model's folder " + dir_.string() + ": " + ec.message());
  const fs::path full = fs::canonical(base / norm, ec);
  if (ec) fail(role + ": cannot open external data file '" + (base / norm).string() + "': " + ec.message());
  auto [bi, fi] = std::mismatch(base.begin(), base.end(), full.begin(), full.end());
  if (bi != base.end())
    fail(role + ": external data location '" + location + "' resolves to " + full.string() +
         ", outside the model's folder " + base.string());
  auto it = ext_files_.find(full.string());
  if (it != ext_files_.end()) return it->second;
  auto m = MappedFile::open(full.string(), /*writable_copy=*/true);
  ext_files_.emplace(full.string(), m);
  return m;
}

Tensor Loader::load_external(pb::TensorProto& t, const std::string& role, DType dtype, const Shape& shape) {
  std::optional<std::string> location;
  std::optional<uint64_t> offset, length;
  for (const auto& kv : t.external_data()) {
    auto num = [&](std::optional<uint64_t>& dst) {
      if (dst) fail(role + ": external data key '" + kv.key() + "' is given twice");
      dst = parse_u64(kv.value());
      if (!dst) fail(role + ": external data '" + kv.key() + "': expected a non-negative decimal integer, got '" +
                     kv.value() + "'");
    };
    if (kv.key() == "location") {
      if (location) fail(role + ": external data key 'location' is given twice");
      location = kv.value();
    } else if (kv.key() == "offset") {
      num(offset);
    } else if (kv.key() == "length") {
      num(length);
    }
    // "checksum" and unknown keys carry no layout information; ignoring them is what ONNX does.
  }
  if (!location) fail(role + ": external data without a 'location'");
  const uint64_t need = uint64_t(shape_numel(shape)) * dtype_size(dtype);
  if (length && *length != need)
    fail(role + ": external data 'length' is " + std::to_string(*length) + " bytes; shape " + shape_str(shape) +
         " of " + std::string(dtype_name(dtype)) + " needs " + std::to_string(need));
  const uint64_t off = offset.value_or(0);
  std::shared_ptr<MappedFile> f = external_file(role, *location);
  if (off > f->size() || need > f->size() - off)
    fail(role + ": external data [" + std::to_string(off) + ", " + std::to_string(off + need) + ") lies beyond the end of '" +
         *location + "' (" + std::to_string(f->size()) + " bytes)");
  if (need == 0) return Tensor(dtype, shape);
  uint8_t* p = f->data() + off;
  if (reinterpret_cast<uintptr_t>(p) % kWrapAlign == 0) return Tensor::wrap(dtype, shape, p, f);
  Tensor out(dtype, shape);
  std::memcpy(out.data(), p, need);
  return out;
}

Tensor Loader::load_tensor(pb::TensorProto& t, const std::string& role) {
  const std::optional<DType> dt = dtype_from_onnx(t.data_type());
  if (!dt)
    fail(role + ": initializer '" + t.name() + "' has element type " + onnx_type_name(t.data_type()) +
         "; expected float32, float16, bfloat16 or uint8");
  Shape shape(t.dims().begin(), t.dims().end());
  for (int64_t d : shape)
    if (d < 0) fail(role + ": initializer '" + t.name() + "' has a negative dimension in " + shape_str(shape));
  int64_t numel = 0;
  try {
    numel = shape_numel(shape);
  } catch (const Error& e) {
    fail(role + ": initializer '" + t.name() + "': " + e.what());
  }
  if (t.has_segment()) fail(role + ": initializer '" + t.name() + "' is segmented; segmented tensors are not supported");
  const size_t esize = dtype_size(*dt);
  if (uint64_t(numel) > std::numeric_limits<uint64_t>::max() / esize)
    fail(role + ": initializer '" + t.name() + "' shape " + shape_str(shape) + " is too large");
  const uint64_t need = uint64_t(numel) * esize;

  if (t.data_location() == pb::TensorProto::EXTERNAL) {
    if (t.has_raw_data() || t.float_data_size() || t.int32_data_size())
      fail(role + ": initializer '" + t.name() + "' is marked EXTERNAL but also holds inline data");
    return load_external(t, role, *dt, shape);
  }
  if (t.external_data_size())
    fail(role + ": initializer '" + t.name() + "' has external_data entries but data_location is not EXTERNAL");

  const int typed = t.float_data_size() + t.int32_data_size() + t.int64_data_size() + t.double_data_size() +
                    t.uint64_data_size() + t.string_data_size();
  if (t.has_raw_data()) {
    if (typed) fail(role + ": initializer '" + t.name() + "' holds both raw_data and typed data fields");
    std::string* raw = t.mutable_raw_data();
    if (raw->size() != need)
      fail(role + ": initializer '" + t.name() + "' raw_data has " + std::to_string(raw->size()) + " bytes; shape " +
           shape_str(shape) + " of " + std::string(dtype_name(*dt)) + " needs " + std::to_string(need));
    if (need == 0) return Tensor(*dt, shape);
    // Move the bytes out of the message rather than copy them: the string becomes the tensor's
    // owner when it is aligned like qmoe's own buffers.
    auto owner = std::make_shared<std::string>(std::move(*raw));
    raw->clear();
    void* p = owner->data();
    if (reinterpret_cast<uintptr_t>(p) % kWrapAlign == 0) return Tensor::wrap(*dt, shape, p, owner);
    Tensor out(*dt, shape);
    std::memcpy(out.data(), p, need);
    return out;
  }

  // Typed fields (onnx.proto): FLOAT in float_data; FLOAT16, BFLOAT16 and UINT8 one value per int32
  // in int32_data (fp16/bf16 as their 16-bit patterns). Field and count are checked before the
  // output buffer is allocated: the dims alone may declare terabytes.
  auto wrong_field = [&](const char* field) {
    fail(role + ": initializer '" + t.name() + "' of " + onnx_type_name(t.data_type()) + " stores its values in " +
         field + "; expected " + (*dt == DType::f32 ? "float_data" : "int32_data") + " or raw_data");
  };
  if (t.int64_data_size()) wrong_field("int64_data");
  if (t.double_data_size()) wrong_field("double_data");
  if (t.uint64_data_size()) wrong_field("uint64_data");
  if (t.string_data_size()) wrong_field("string_data");
  if (*dt == DType::f32) {
    if (t.int32_data_size()) wrong_field("int32_data");
    if (uint64_t(t.float_data_size()) != uint64_t(numel))
      fail(role + ": initializer '" + t.name() + "' float_data has " + std::to_string(t.float_data_size()) +
           " values; shape " + shape_str(shape) + " needs " + std::to_string(numel));
    Tensor out(*dt, shape);
    if (numel) std::memcpy(out.data(), t.float_data().data(), need);
    return out;
  }
  if (t.float_data_size()) wrong_field("float_data");
  if (uint64_t(t.int32_data_size()) != uint64_t(numel))
    fail(role + ": initializer '" + t.name() + "' int32_data has " + std::to_string(t.int32_data_size()) +
         " values; shape " + shape_str(shape) + " needs " + std::to_string(numel));
  Tensor out(*dt, shape);
  const int32_t maxv = *dt == DType::u8 ? 0xff : 0xffff;
  for (int64_t i = 0; i < numel; ++i) {
    const int32_t v = t.int32_data(int(i));
    if (v < 0 || v > maxv)
      fail(role + ": initializer '" + t.name() + "' int32_data[" + std::to_string(i) + "] = " + std::to_string(v) +
           " is out of range for " + std::string(dtype_name(*dt)) + " [0, " + std::to_string(maxv) + "]");
    if (*dt == DType::u8)
      out.data_as<uint8_t>()[i] = uint8_t(v);
    else
      out.data_as<uint16_t>()[i] = uint16_t(v);
  }
  return out;
}

Tensor Loader::initializer_for(int i) {
  const std::string& name = input_name(i);
  const std::string role = kInputNames[i];
  auto it = inits_.find(name);
  if (it == inits_.end()) {
    if (sparse_inits_.count(name)) fail(role + ": '" + name + "' is a sparse initializer; qmoe needs dense initializers");
    fail(role + ": '" + name + "' is not an initializer of the graph; qmoe needs the weights stored in the model");
  }
  return load_tensor(*it->second, role + " ('" + name + "')");
}

DType Loader::infer_act_dtype(const RawExperts& raw) const {
  // Declared element types of the runtime tensors, in the order of trust stated in docs/ONNX.md.
  struct Source {
    std::string what;
    int elem;
  };
  std::vector<Source> declared;
  auto add = [&](const std::string& name, const std::string& what) {
    if (name.empty()) return;
    auto it = declared_.find(name);
    if (it == declared_.end() || !it->second->has_tensor_type() || !it->second->tensor_type().has_elem_type()) return;
    declared.push_back({what + " '" + name + "'", it->second->tensor_type().elem_type()});
  };
  add(input_name(kX), "input");
  add(input_name(kRouterProbs), "router_probs");
  add(input_name(kRouterWeights), "router_weights");
  add(node_->output(0), "output");
  for (const Source& s : declared) {
    if (s.elem != declared.front().elem)
      fail("T: " + declared.front().what + " is declared " + onnx_type_name(declared.front().elem) + " but " + s.what +
           " is declared " + onnx_type_name(s.elem) + "; all must have the same type T");
  }
  if (!declared.empty()) {
    const std::optional<DType> dt = dtype_from_onnx(declared.front().elem);
    if (!dt || *dt == DType::u8)
      fail("T: " + declared.front().what + " is declared " + onnx_type_name(declared.front().elem) +
           "; expected FLOAT, FLOAT16 or BFLOAT16");
    return *dt;
  }
  for (const std::optional<Tensor>* b : {&raw.fc1.bias, &raw.fc2.bias})
    if (*b) return (*b)->dtype();
  if (raw.fc3 && raw.fc3->bias) return raw.fc3->bias->dtype();
  fail("T: cannot determine the activation type: declare the element type of graph input '" + input_name(kX) +
       "' (or of router_probs / the output)");
}

// Static dims declared for the runtime tensors must agree with the weights (symbolic dims are fine).
void Loader::check_declared_dims(const MoeSpec& spec) const {
  auto last_dim = [&](const std::string& name, const char* role, int64_t want, const char* what) {
    if (name.empty()) return;
    auto it = declared_.find(name);
    if (it == declared_.end() || !it->second->has_tensor_type() || !it->second->tensor_type().has_shape()) return;
    const auto& shp = it->second->tensor_type().shape();
    if (shp.dim_size() == 0) return;
    const auto& d = shp.dim(shp.dim_size() - 1);
    if (d.has_dim_value() && d.dim_value() != want)
      fail(std::string(role) + " '" + name + "': last dimension is declared " + std::to_string(d.dim_value()) +
           ", expected " + what + " = " + std::to_string(want) + " (from the weights)");
  };
  last_dim(input_name(kX), "input", spec.hidden, "H");
  last_dim(input_name(kRouterProbs), "router_probs", spec.num_experts, "E");
  last_dim(input_name(kRouterWeights), "router_weights", spec.num_experts, "E");
  last_dim(node_->output(0), "output", spec.hidden, "H");
}

WeightsLayout Loader::decide_layout(const MoeSpec& s, const Tensor& fc1, const Tensor& fc2) const {
  const int64_t p = s.pack(), E = s.num_experts, N1 = s.fc1_rows(), H = s.hidden, I = s.inter;
  const Shape raw1{E, N1, H / p}, raw2{E, H, I / p};     // contract §5.1: [E, N, K/pack]
  const Shape cuda1{E, H, N1 / p}, cuda2{E, I, H / p};   // contract §7:   [E, K, N/pack]
  const bool raw_fits = fc1.shape() == raw1 && fc2.shape() == raw2;
  const bool cuda_fits = fc1.shape() == cuda1 && fc2.shape() == cuda2;
  const std::string actual = "fc1_experts_weights " + shape_str(fc1.shape()) + ", fc2_experts_weights " +
                             shape_str(fc2.shape());
  const std::string want_raw = "raw layout: fc1 " + shape_str(raw1) + ", fc2 " + shape_str(raw2);
  const std::string want_cuda = "ORT CUDA layout: fc1 " + shape_str(cuda1) + ", fc2 " + shape_str(cuda2);

  if (opt_.layout == WeightsLayout::raw) return WeightsLayout::raw;  // validate_raw checks the shapes
  if (opt_.layout == WeightsLayout::ort_cuda) {
    if (prepacked_ == 0)
      fail("weights_prepacked = 0 declares raw weights (what every ORT backend then reads), but the ORT CUDA "
           "layout was requested (--weights-layout ort-cuda); drop the option or fix the attribute");
    if (!cuda_fits) fail("weights do not have the " + want_cuda + " shapes; got " + actual);
    return WeightsLayout::ort_cuda;
  }
  if (prepacked_ == 0) return WeightsLayout::raw;
  if (raw_fits && cuda_fits)
    fail("cannot tell the weights layout: with H == I == " + std::to_string(H) + " the shapes (" + actual +
         ") fit both the raw layout and ORT's CUDA layout, and weights_prepacked is " + std::to_string(prepacked_) +
         " (not 0); state the layout with --weights-layout raw|ort-cuda (OnnxLoadOptions::layout)");
  if (raw_fits) return WeightsLayout::raw;
  if (cuda_fits) return WeightsLayout::ort_cuda;
  fail("weight shapes fit neither the " + want_raw + " nor the " + want_cuda + " (E=" + std::to_string(E) +
       " H=" + std::to_string(H) + " I=" + std::to_string(I) + " at " + std::to_string(s.bits) + " bits); got " +
       actual);
}

OnnxLayer Loader::load() {
  parse_model();
  index_graph();
  read_attributes();

  OnnxLayer out;
  out.node_name = node_->name();
  out.input_name = input_name(kX);
  out.router_probs_name = input_name(kRouterProbs);
  out.router_weights_name = input_name(kRouterWeights);
  out.output_name = node_->output(0);

  MoeSpec& s = out.spec;
  s.k = k_;
  try {
    s.activation = parse_activation(activation_);
  } catch (const Error& e) {
    fail(std::string("attribute ") + e.what());
  }
  s.normalize_routing_weights = normalize_ != 0;
  s.use_sparse_mixer = sparse_mixer_ != 0;
  s.bits = int(bits_);
  s.swiglu_fusion = SwigluFusion(swiglu_fusion_);
  s.swiglu_limit = limit_;
  s.activation_alpha = alpha_;
  s.activation_beta = beta_;

  RawExperts& raw = out.raw;
  Tensor fc1_w = initializer_for(kFc1W);
  raw.fc1.scales = initializer_for(kFc1S);
  Tensor fc2_w = initializer_for(kFc2W);
  raw.fc2.scales = initializer_for(kFc2S);
  if (has_input(kFc1B)) raw.fc1.bias = initializer_for(kFc1B);
  if (has_input(kFc2B)) raw.fc2.bias = initializer_for(kFc2B);
  if (has_input(kFc1Z)) raw.fc1.zero_points = initializer_for(kFc1Z);
  if (has_input(kFc2Z)) raw.fc2.zero_points = initializer_for(kFc2Z);
  if (has_input(kFc3W)) {
    raw.fc3.emplace();
    raw.fc3->weights = initializer_for(kFc3W);
    if (!has_input(kFc3S)) fail("fc3_scales: missing (empty name) although fc3_experts_weights is given");
    raw.fc3->scales = initializer_for(kFc3S);
    if (has_input(kFc3B)) raw.fc3->bias = initializer_for(kFc3B);
    if (has_input(kFc3Z)) raw.fc3->zero_points = initializer_for(kFc3Z);
  } else {
    for (int i : {int(kFc3S), int(kFc3B), int(kFc3Z)})
      if (has_input(i))
        fail(std::string(kInputNames[i]) + ": given ('" + input_name(i) + "') without fc3_experts_weights");
  }
  s.fc1_bias = bool(raw.fc1.bias);
  s.fc2_bias = bool(raw.fc2.bias);
  s.fc1_zero_points = bool(raw.fc1.zero_points);
  s.fc2_zero_points = bool(raw.fc2.zero_points);
  if (raw.fc3) {
    s.fc3_bias = bool(raw.fc3->bias);
    s.fc3_zero_points = bool(raw.fc3->zero_points);
  }

  // Dimensions. Scales are [E, N] or [E, N, nb] in both weight layouts, so they fix N1 and H
  // independently of how the weight bytes are arranged.
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&fc1_w, "fc1_experts_weights"}, {&fc2_w, "fc2_experts_weights"}}) {
    if (t->dtype() != DType::u8)
      fail(std::string(name) + ": expected dtype uint8, got " + std::string(dtype_name(t->dtype())));
    if (t->rank() != 3) fail(std::string(name) + ": expected a 3-D tensor, got shape " + shape_str(t->shape()));
  }
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&raw.fc1.scales, "fc1_scales"}, {&raw.fc2.scales, "fc2_scales"}}) {
    if (t->rank() != 2 && t->rank() != 3)
      fail(std::string(name) + ": expected shape [E, N] or [E, N, blocks], got " + shape_str(t->shape()));
    if (!is_float(t->dtype()))
      fail(std::string(name) + ": expected dtype float32, float16 or bfloat16, got " + std::string(dtype_name(t->dtype())));
  }
  s.scale_dtype = raw.fc1.scales.dtype();
  s.num_experts = fc1_w.dim(0);
  s.hidden = raw.fc2.scales.dim(1);
  const int64_t n1 = raw.fc1.scales.dim(1);
  const bool fused = s.is_swiglu() && s.swiglu_fusion != SwigluFusion::separate;
  if (fused && n1 % 2 != 0)
    fail("fc1_scales: swiglu with swiglu_fusion = " + std::to_string(swiglu_fusion_) +
         " needs 2*I rows, got an odd row count " + std::to_string(n1) + " (shape " + shape_str(raw.fc1.scales.shape()) + ")");
  s.inter = fused ? n1 / 2 : n1;

  // Contract §5.2: block-wise iff block_size > 0 and fc1_scales is 3-D with more than one block.
  const bool multi_block = raw.fc1.scales.rank() == 3 && raw.fc1.scales.dim(2) > 1;
  if (multi_block && block_size_.value_or(0) == 0)
    fail("fc1_scales: shape " + shape_str(raw.fc1.scales.shape()) + " has " + std::to_string(raw.fc1.scales.dim(2)) +
         " blocks per row, but attribute 'block_size' is " +
         (block_size_ ? std::string("0") : std::string("absent")) + " (row-wise)");
  s.block_size = multi_block ? *block_size_ : 0;

  try {
    s.validate();
  } catch (const Error& e) {
    fail(e.what());
  }
  s.act_dtype = infer_act_dtype(raw);
  try {
    s.validate();  // again, now with T
  } catch (const Error& e) {
    fail(e.what());
  }
  check_declared_dims(s);

  const WeightsLayout layout = decide_layout(s, fc1_w, fc2_w);
  if (layout == WeightsLayout::ort_cuda) {
    if (raw.fc3)
      fail("fc3_experts_weights: the ORT CUDA layout has no fc3 (ORT's CUDA QMoE rejects it); store fc3 with "
           "weights_prepacked = 0 or fuse SwiGLU into fc1");
    try {
      fc1_w = ort_cuda_to_raw(fc1_w, s.fc1_rows(), s.hidden, s.bits);
    } catch (const Error& e) {
      fail(std::string("fc1_experts_weights (ORT CUDA layout): ") + e.what());
    }
    try {
      fc2_w = ort_cuda_to_raw(fc2_w, s.hidden, s.inter, s.bits);
    } catch (const Error& e) {
      fail(std::string("fc2_experts_weights (ORT CUDA layout): ") + e.what());
    }
  }
  raw.fc1.weights = std::move(fc1_w);
  raw.fc2.weights = std::move(fc2_w);
  try {
    validate_raw(s, raw);
  } catch (const Error& e) {
    fail(e.what());
  }
  return out;
}

}  // namespace

OnnxLayer load_onnx(const std::string& path, const OnnxLoadOptions& opt) { return Loader(path, opt).load(); }

}  // namespace qmoe
