// Bounded resources (issue 7 item 3): a file whose header declares huge tensors is refused by a
// check on the declared sizes, before anything of that size is allocated, in every parser: .npy,
// safetensors (file and sharded index), the packed file and ONNX (external data, raw_data, typed
// fields).
//
// How "before allocation" is checked: each case runs in a child process (a gtest death test) that
//  - without ASan: limits its address space to what it already uses + 1 GiB (RLIMIT_AS), so an attempt
//    to allocate the declared size fails at once instead of paging the machine to death;
//  - with ASan (which cannot run under RLIMIT_AS): uses declared sizes >= 2^41 bytes, above ASan's
//    largest allocation (2^40), so an attempt aborts the child instead of allocating.
// The child passes only if the parser throws qmoe::Error whose message is not an allocation failure
// ("out of memory", "too large to allocate"): a refusal by a size check. A crash, an abort, a
// std::bad_alloc or an OOM message fails the case, and the child's stderr (printed by gtest) says which.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "qmoe/error.h"
#include "qmoe/npy.h"
#include "qmoe/onnx_model.h"
#include "qmoe/packed_file.h"
#include "qmoe/reference.h"
#include "qmoe/safetensors.h"
#include "qmoe_onnx/onnx.pb.h"

#if defined(__SANITIZE_ADDRESS__)
#define QMOE_BR_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define QMOE_BR_ASAN 1
#endif
#endif

namespace {

namespace fs = std::filesystem;
using qmoe::Error;

// Declared element counts far beyond any machine (and beyond ASan's 2^40-byte allocation limit).
constexpr int64_t kHugeDim = int64_t(1) << 21;  // three of these: 2^63 / 2^42 elements

void limit_address_space() {
#ifndef QMOE_BR_ASAN
  // Current virtual size from /proc/self/statm (pages), plus 1 GiB.
  long pages = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld", &pages) != 1) pages = 0;
    std::fclose(f);
  }
  const rlim_t cur = rlim_t(pages) * rlim_t(sysconf(_SC_PAGESIZE));
  struct rlimit rl {};
  rl.rlim_cur = rl.rlim_max = cur + (rlim_t(1) << 30);
  setrlimit(RLIMIT_AS, &rl);
#endif
}

// Runs `parse` in the death-test child; exits 0 only on a size-check refusal.
[[noreturn]] void child(const std::function<void()>& parse) {
  limit_address_space();
  try {
    parse();
    std::fprintf(stderr, "NOT REFUSED: the parser accepted the file\n");
    std::_Exit(3);
  } catch (const Error& e) {
    const std::string m = e.what();
    if (m.find("out of memory") != std::string::npos || m.find("too large to allocate") != std::string::npos) {
      std::fprintf(stderr, "ALLOCATION ATTEMPTED: %s\n", m.c_str());
      std::_Exit(2);
    }
    std::fprintf(stderr, "refused: %s\n", m.c_str());
    std::_Exit(0);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "ALLOCATION ATTEMPTED: std::bad_alloc\n");
    std::_Exit(2);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "WRONG EXCEPTION (not qmoe::Error): %s\n", e.what());
    std::_Exit(4);
  }
}

#define EXPECT_REFUSED_BEFORE_ALLOCATION(stmt) \
  EXPECT_EXIT(child([&] { stmt; }), ::testing::ExitedWithCode(0), "refused: ")

class BoundedResources : public ::testing::Test {
 protected:
  void SetUp() override {
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    dir_ = fs::temp_directory_path() / ("qmoe_bounded_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& bytes) {
    const fs::path p = dir_ / name;
    std::ofstream(p, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
    return p.string();
  }
  fs::path dir_;
};

// ---- .npy ----

std::string npy(const std::string& descr, const std::string& shape, size_t data_bytes, int major = 1,
                uint32_t header_len_override = 0) {
  std::string h = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  const size_t pre = major == 1 ? 10 : 12;
  while ((pre + h.size() + 1) % 64) h += ' ';
  h += '\n';
  std::string out = std::string("\x93NUMPY", 6) + char(major) + char(0);
  const uint32_t len = header_len_override ? header_len_override : uint32_t(h.size());
  if (major == 1) {
    out += char(len & 0xff);
    out += char(len >> 8);
  } else {
    for (int i = 0; i < 4; ++i) out += char((len >> (8 * i)) & 0xff);
  }
  return out + h + std::string(data_bytes, '\0');
}

TEST_F(BoundedResources, NpyHugeShapeInSmallFile) {
  // 2^63 bytes of float32 declared, 16 bytes present.
  const std::string shape = "(" + std::to_string(kHugeDim) + ", " + std::to_string(kHugeDim) + ", " +
                            std::to_string(kHugeDim / 4) + ")";
  const std::string bytes = npy("<f4", shape, 16);
  const std::string path = write("huge.npy", bytes);
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::read_npy(path));
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::parse_npy(bytes.data(), bytes.size()));
}

TEST_F(BoundedResources, NpyShapeOverflowingInt64) {
  const std::string bytes = npy("<f4", "(4294967296, 4294967296, 4294967296)", 0);
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::parse_npy(bytes.data(), bytes.size()));
}

TEST_F(BoundedResources, NpyTwoTerabytesDeclared) {
  // 2^41 bytes: realistic-looking dims (a "model" 2 TB big) in an 80-byte file.
  const std::string bytes = npy("<u2", "(1048576, 1048576)", 0);
  const std::string path = write("two_tb.npy", bytes);
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::read_npy(path, {.uint16_as_bf16 = true}));
}

TEST_F(BoundedResources, NpyHeaderLengthLargerThanFile) {
  // Format 2.0 header length field 2^31 - 1: the header buffer must not be sized from it.
  const std::string bytes = npy("<f4", "(2,)", 8, 2, 0x7fffffffu);
  const std::string path = write("hdr.npy", bytes);
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::read_npy(path));
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::parse_npy(bytes.data(), bytes.size()));
}

// ---- safetensors ----

std::string safetensors(const std::string& header_json, size_t data_bytes, uint64_t len_override = 0) {
  std::string h = header_json;
  while (h.size() % 8) h += ' ';
  const uint64_t n = len_override ? len_override : h.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out + h + std::string(data_bytes, '\0');
}

}  // namespace
namespace {

void open_and_read_all(const std::string& path) {
  const qmoe::SafetensorsFile f = qmoe::SafetensorsFile::open(path);
  for (const std::string& n : f.names()) (void)f.tensor(n);
}

TEST_F(BoundedResources, SafetensorsHugeShapeWithSmallOffsets) {
  const std::string d = std::to_string(kHugeDim);
  const std::string path =
      write("a.safetensors", safetensors(R"({"w":{"dtype":"F32","shape":[)" + d + "," + d + "," + d +
                                             R"(],"data_offsets":[0,16]}})", 16));
  EXPECT_REFUSED_BEFORE_ALLOCATION(open_and_read_all(path));
}

TEST_F(BoundedResources, SafetensorsOffsetsBeyondFile) {
  const std::string path = write(
      "b.safetensors",
      safetensors(R"({"w":{"dtype":"U8","shape":[2199023255552],"data_offsets":[0,2199023255552]}})", 16));
  EXPECT_REFUSED_BEFORE_ALLOCATION(open_and_read_all(path));
}

TEST_F(BoundedResources, SafetensorsHeaderLengthHuge) {
  // 2^62-byte JSON header declared; and one just under kSafetensorsMaxHeader but past the file end.
  const std::string p1 = write("c.safetensors", safetensors("{}", 0, uint64_t(1) << 62));
  EXPECT_REFUSED_BEFORE_ALLOCATION(open_and_read_all(p1));
  const std::string p2 = write("d.safetensors", safetensors("{}", 0, qmoe::kSafetensorsMaxHeader - 8));
  EXPECT_REFUSED_BEFORE_ALLOCATION(open_and_read_all(p2));
}

TEST_F(BoundedResources, SafetensorsIndexFileHuge) {
  // A sharded index larger than the JSON limit is refused without being read whole. Sparse file:
  // no disk space is used.
  const fs::path p = dir_ / "model.safetensors.index.json";
  { std::ofstream(p) << "{\"weight_map\": {}}"; }
  fs::resize_file(p, qmoe::kSafetensorsMaxHeader * 4);
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::SafetensorsCheckpoint::open(dir_.string()));
}

// ---- packed file ----

qmoe::MoeSpec small_spec() {
  qmoe::MoeSpec s;
  s.num_experts = 2, s.hidden = 16, s.inter = 32, s.k = 1, s.bits = 4;
  return s;
}

// A packed file whose header (valid checksum) declares one blob of `nbytes` with `shape`, followed by
// `payload` bytes of payload.
std::string packed_file(const qmoe::Shape& shape, uint64_t nbytes, uint64_t payload, uint64_t offset = 0) {
  qmoe::PackedHeader h;
  h.writer = "bounded-test";
  h.layout = qmoe::LayoutTag{"raw", 1, "any"};
  h.spec = small_spec();
  qmoe::PackedBlobEntry b;
  b.name = "fc1.weights";
  b.dtype = qmoe::DType::u8;
  b.shape = shape;
  b.nbytes = nbytes;
  h.payload_bytes = payload;
  h.blobs.push_back(b);
  // First encode to learn the header size, then place the blob right after it.
  std::vector<uint8_t> enc = qmoe::encode_packed_header(h);
  h.blobs[0].offset = offset ? offset : h.header_bytes;
  h.payload_hash = qmoe::xxhash64(std::string(payload, '\0').data(), payload);
  enc = qmoe::encode_packed_header(h);
  return std::string(enc.begin(), enc.end()) + std::string(payload, '\0');
}

TEST_F(BoundedResources, PackedBlobLargerThanFile) {
  const uint64_t n = uint64_t(1) << 42;
  const std::string bytes = packed_file({int64_t(1) << 21, int64_t(1) << 21}, n, 64);
  const std::string path = write("a.qmoepk", bytes);
  auto ref = qmoe::make_reference_backend();
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::load_packed(path, *ref));
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::decode_packed_header(
      reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), bytes.size(), "a.qmoepk"));
}

TEST_F(BoundedResources, PackedPayloadDeclaredBeyondFile) {
  // payload_bytes 2^50 in the header; the file has 64.
  std::string bytes = packed_file({64}, 64, 64);
  const uint64_t huge = uint64_t(1) << 50;
  std::memcpy(bytes.data() + 24, &huge, 8);  // payload_bytes (docs/FORMAT.md prelude)
  const std::string path = write("b.qmoepk", bytes);
  auto ref = qmoe::make_reference_backend();
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::load_packed(path, *ref));
  EXPECT_REFUSED_BEFORE_ALLOCATION((void)qmoe::inspect_packed(path).to_string());
}

TEST_F(BoundedResources, PackedHeaderSizeBeyondFile) {
  // header_bytes field at its limit (16 MiB) in a 128-byte file: the header buffer must not be sized
  // from it.
  std::string bytes = packed_file({64}, 64, 64);
  const uint64_t hb = qmoe::kPackedMaxHeaderBytes;
  std::memcpy(bytes.data() + 16, &hb, 8);
  const std::string path = write("c.qmoepk", bytes);
  auto ref = qmoe::make_reference_backend();
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::load_packed(path, *ref));
  const uint64_t hb2 = uint64_t(1) << 60;
  std::memcpy(bytes.data() + 16, &hb2, 8);
  const std::string path2 = write("d.qmoepk", bytes);
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::load_packed(path2, *ref));
}

// ---- ONNX ----

namespace pb = ::qmoe_onnx;

enum class Store { external, raw_data, typed };

// A QMoE model whose fc1_experts_weights declares [E, 2^21, 2^21] uint8 (2^43 bytes) stored as
// `store`; the other tensors are small and valid for E=2, H=16, I=32.
std::string onnx_with_huge_fc1(Store store, const std::string& location = "weights.bin") {
  pb::ModelProto m;
  m.set_ir_version(9);
  auto* op = m.add_opset_import();
  op->set_domain("com.microsoft");
  op->set_version(1);
  pb::GraphProto* g = m.mutable_graph();
  g->set_name("g");
  pb::NodeProto* n = g->add_node();
  n->set_op_type("QMoE");
  n->set_domain("com.microsoft");
  for (const char* in : {"input", "router_probs", "fc1_w", "fc1_s", "", "fc2_w", "fc2_s"}) n->add_input(in);
  n->add_output("output");
  auto* a = n->add_attribute();
  a->set_name("weights_prepacked");
  a->set_type(pb::AttributeProto::INT);
  a->set_i(0);
  for (const char* io : {"input", "router_probs"}) {
    auto* vi = g->add_input();
    vi->set_name(io);
    vi->mutable_type()->mutable_tensor_type()->set_elem_type(pb::TensorProto::FLOAT);
  }
  auto* vo = g->add_output();
  vo->set_name("output");
  vo->mutable_type()->mutable_tensor_type()->set_elem_type(pb::TensorProto::FLOAT);

  auto add = [&](const char* name, int type, std::vector<int64_t> dims, size_t esize) {
    pb::TensorProto* t = g->add_initializer();
    t->set_name(name);
    t->set_data_type(type);
    int64_t numel = 1;
    for (int64_t d : dims) {
      t->add_dims(d);
      numel *= d;
    }
    t->set_raw_data(std::string(size_t(numel) * esize, '\0'));
    return t;
  };
  pb::TensorProto* w1 = g->add_initializer();
  w1->set_name("fc1_w");
  w1->set_data_type(pb::TensorProto::UINT8);
  for (int64_t d : {int64_t(2), kHugeDim, kHugeDim}) w1->add_dims(d);
  switch (store) {
    case Store::external: {
      w1->set_data_location(pb::TensorProto::EXTERNAL);
      auto* e = w1->add_external_data();
      e->set_key("location");
      e->set_value(location);
      break;
    }
    case Store::raw_data:
      w1->set_raw_data(std::string(64, '\0'));
      break;
    case Store::typed:
      for (int i = 0; i < 8; ++i) w1->add_int32_data(1);
      break;
  }
  add("fc1_s", pb::TensorProto::FLOAT, {2, 32}, 4);
  add("fc2_w", pb::TensorProto::UINT8, {2, 16, 16}, 1);
  add("fc2_s", pb::TensorProto::FLOAT, {2, 16}, 4);
  return m.SerializeAsString();
}

TEST_F(BoundedResources, OnnxExternalDataHugeTensor) {
  write("weights.bin", std::string(4096, '\x11'));
  const std::string path = write("model.onnx", onnx_with_huge_fc1(Store::external));
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::load_onnx(path));
}

TEST_F(BoundedResources, OnnxExternalDataLengthAndOffsetHuge) {
  write("weights.bin", std::string(4096, '\x11'));
  pb::ModelProto m;
  ASSERT_TRUE(m.ParseFromString(onnx_with_huge_fc1(Store::external)));
  pb::TensorProto* w1 = m.mutable_graph()->mutable_initializer(0);
  w1->clear_dims();
  for (int64_t d : {2, 32, 8}) w1->add_dims(d);
  auto* off = w1->add_external_data();
  off->set_key("offset");
  off->set_value("18446744073709551000");  // near 2^64: offset + length must not wrap around
  const std::string path = write("model.onnx", m.SerializeAsString());
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::load_onnx(path));
}

TEST_F(BoundedResources, OnnxRawDataHugeTensor) {
  const std::string path = write("model.onnx", onnx_with_huge_fc1(Store::raw_data));
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::load_onnx(path));
}

TEST_F(BoundedResources, OnnxTypedFieldsHugeTensor) {
  // int32_data holds 8 values; the dims declare 2^43. The count must be compared before a buffer of
  // the declared size is allocated.
  const std::string path = write("model.onnx", onnx_with_huge_fc1(Store::typed));
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::load_onnx(path));
}

// ---- recursion: nesting depth is bounded before a recursive parser or destructor sees it ----

TEST_F(BoundedResources, SafetensorsDeeplyNestedHeader) {
  // 200k nested arrays would overflow the stack of a recursive JSON parser or destructor.
  const std::string path = write("deep.safetensors", safetensors(std::string(200000, '[') + std::string(200000, ']'), 0));
  EXPECT_REFUSED_BEFORE_ALLOCATION(open_and_read_all(path));
  const std::string path2 =
      write("deep2.safetensors", safetensors("{\"__metadata__\":" + std::string(200000, '[') + std::string(200000, ']') + "}", 0));
  EXPECT_REFUSED_BEFORE_ALLOCATION(open_and_read_all(path2));
}

TEST_F(BoundedResources, SafetensorsIndexDeeplyNested) {
  { std::ofstream(dir_ / "model.safetensors.index.json") << "{\"weight_map\": " << std::string(200000, '[') << std::string(200000, ']') << "}"; }
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::SafetensorsCheckpoint::open(dir_.string()));
}

// Protobuf wire bytes: tag (field << 3 | 2) and length, then the payload.
std::string pb_len_field(int field, const std::string& payload) {
  std::string out(1, char((field << 3) | 2));
  uint64_t n = payload.size();
  do {
    uint8_t b = n & 0x7f;
    n >>= 7;
    out += char(n ? (b | 0x80) : b);
  } while (n);
  return out + payload;
}

TEST_F(BoundedResources, OnnxDeeplyNestedSubgraphs) {
  // ModelProto.graph(7) -> GraphProto.node(1) -> NodeProto.attribute(5) -> AttributeProto.g(6) ->
  // GraphProto ... 5000 levels deep (15000 nested messages in ~100 KB): the parse must fail on
  // protobuf's recursion limit, not overflow the stack.
  std::string inner;
  for (int i = 0; i < 5000; ++i) inner = pb_len_field(1, pb_len_field(5, pb_len_field(6, inner)));
  const std::string model = std::string("\x08\x09", 2) + pb_len_field(7, inner);  // ir_version 9, graph
  const std::string path = write("deep.onnx", model);
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::load_onnx(path));
}

TEST_F(BoundedResources, OnnxManyNodes) {
  // 100k nodes: refused (exactly one QMoE node allowed) without per-node work beyond parsing.
  pb::ModelProto m;
  m.set_ir_version(9);
  pb::GraphProto* g = m.mutable_graph();
  for (int i = 0; i < 100000; ++i) {
    pb::NodeProto* n = g->add_node();
    n->set_op_type("Relu");
    n->add_input("x");
    n->add_output("x");
  }
  const std::string path = write("many.onnx", m.SerializeAsString());
  EXPECT_REFUSED_BEFORE_ALLOCATION(qmoe::load_onnx(path));
}

}  // namespace
