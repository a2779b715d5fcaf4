// safetensors reader/writer: round trips, alignment, sharded indexes, and hostile files (every
// malformed header must give a qmoe::Error naming the problem, never a crash; run under
// -DQMOE_SANITIZE=ON to check for out-of-bounds reads too).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "qmoe/error.h"
#include "qmoe/safetensors.h"

#include "temp_dir.h"

using namespace qmoe;
namespace fs = std::filesystem;

namespace {

using test::TempDir;

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

// A raw safetensors file from a header string and a data region.
std::string raw_file(const std::string& header, const std::string& data, uint64_t forced_len = UINT64_MAX) {
  const uint64_t n = forced_len == UINT64_MAX ? header.size() : forced_len;
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char(uint8_t(n >> (8 * i)));
  return s + header + data;
}

void expect_error(const std::string& path, const std::string& needle) {
  try {
    SafetensorsFile::open(path);
    FAIL() << "expected an error containing '" << needle << "' opening " << path;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

Tensor iota_f32(Shape shape) {
  Tensor t(DType::f32, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.data_as<float>()[i] = float(i) * 0.5f - 3.f;
  return t;
}

}  // namespace

TEST(Safetensors, RoundTripAllDtypesAndMetadata) {
  TempDir dir;
  Tensor a = iota_f32({3, 5});
  Tensor b(DType::u8, {7});
  for (int i = 0; i < 7; ++i) b.data_as<uint8_t>()[i] = uint8_t(i * 37);
  Tensor c(DType::bf16, {2, 3});
  Tensor d(DType::f16, {5});
  for (int i = 0; i < 6; ++i) c.data_as<uint16_t>()[i] = float_to_bf16(float(i) - 2.f);
  for (int i = 0; i < 5; ++i) d.data_as<uint16_t>()[i] = float_to_half(float(i) * 0.25f);
  Tensor empty(DType::f32, {0, 4});
  const std::string path = dir / "t.safetensors";
  // u8 first in the list: the writer must still place the f32/f16 tensors aligned.
  write_safetensors(path, {{"b", b.view()}, {"a", a.view()}, {"c", c.view()}, {"d", d.view()}, {"e", empty.view()}},
                    {{"format", "pt"}, {"note", "x\"y"}});
  SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("note"), "x\"y");
  EXPECT_EQ(f.names().size(), 5u);
  for (const auto& [name, src] : std::vector<std::pair<std::string, Tensor*>>{{"a", &a}, {"b", &b}, {"c", &c}, {"d", &d}, {"e", &empty}}) {
    Tensor t = f.tensor(name);
    EXPECT_EQ(t.dtype(), src->dtype()) << name;
    EXPECT_EQ(t.shape(), src->shape()) << name;
    EXPECT_EQ(std::memcmp(t.data(), src->data(), src->nbytes()), 0) << name;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % dtype_size(t.dtype()), 0u) << name;
  }
  EXPECT_EQ(f.entry("a").dtype_name, "F32");
  EXPECT_THROW(f.tensor("zzz"), Error);
}

TEST(Safetensors, HeaderIsPaddedToEightBytes) {
  TempDir dir;
  Tensor a = iota_f32({3});
  const std::string path = dir / "p.safetensors";
  for (const std::string meta : {"", "a", "ab", "abc", "abcd", "abcde", "abcdef", "abcdefg"}) {
    write_safetensors(path, {{"a", a.view()}}, {{"m", meta}});
    std::ifstream in(path, std::ios::binary);
    uint64_t n = 0;
    in.read(reinterpret_cast<char*>(&n), 8);
    EXPECT_EQ((8 + n) % 8, 0u) << meta;
    EXPECT_EQ(SafetensorsFile::open(path).metadata().at("m"), meta);
  }
}

TEST(Safetensors, TensorOutlivesFileHandle) {
  TempDir dir;
  Tensor a = iota_f32({4, 4});
  const std::string path = dir / "a.safetensors";
  write_safetensors(path, {{"a", a.view()}});
  Tensor t;
  {
    SafetensorsFile f = SafetensorsFile::open(path);
    t = f.tensor("a");
  }
  EXPECT_EQ(t.data_as<float>()[15], a.data_as<float>()[15]);  // the mapping is kept alive by t
}

TEST(Safetensors, ReadsForeignDtypesOnlyByName) {
  TempDir dir;
  const std::string path = dir / "i64.safetensors";
  const std::string hdr = R"({"pos":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},"w":{"dtype":"F32","shape":[1],"data_offsets":[16,20]}})";
  std::string data(20, '\0');
  write_bytes(path, raw_file(hdr, data));
  SafetensorsFile f = SafetensorsFile::open(path);
  EXPECT_FALSE(f.entry("pos").dtype.has_value());
  EXPECT_NO_THROW(f.tensor("w"));
  try {
    f.tensor("pos");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("dtype I64"), std::string::npos) << e.what();
  }
}

TEST(Safetensors, MisalignedTensorIsCopied) {
  TempDir dir;
  const std::string path = dir / "mis.safetensors";
  // Header of 8 bytes exactly padded; tensor "f" starts at data offset 1 (not 4-aligned).
  std::string hdr = R"({"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"f":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
  hdr.append((8 - hdr.size() % 8) % 8, ' ');
  std::string data(9, '\0');
  const float vals[2] = {1.5f, -2.25f};
  std::memcpy(&data[1], vals, 8);
  write_bytes(path, raw_file(hdr, data));
  Tensor t = SafetensorsFile::open(path).tensor("f");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % 4, 0u);
  EXPECT_EQ(t.data_as<float>()[0], 1.5f);
  EXPECT_EQ(t.data_as<float>()[1], -2.25f);
}

TEST(Safetensors, RejectsMalformedFiles) {
  TempDir dir;
  const std::string p = dir / "bad.safetensors";
  const std::string ok_entry = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::string data8(8, '\0');

  write_bytes(p, "abc");
  expect_error(p, "too short");
  write_bytes(p, raw_file("{" + ok_entry + "}", data8, uint64_t(1) << 40));
  expect_error(p, "exceeds");
  write_bytes(p, raw_file("{" + ok_entry + "}", data8, 1000));
  expect_error(p, "runs past the end");
  write_bytes(p, raw_file("{" + ok_entry + "}", data8, UINT64_MAX - 1));
  expect_error(p, "exceeds");
  write_bytes(p, raw_file("[1,2]", data8));
  expect_error(p, "JSON object");
  write_bytes(p, raw_file("{\"a\":", data8));
  expect_error(p, "not valid JSON");
  write_bytes(p, raw_file(std::string("{\"m\":") + std::string(100000, '[') + std::string(100000, ']') + "}", ""));
  expect_error(p, "nests deeper");
  // Out of range, wrong sizes, overlap, bad dtypes and shapes.
  write_bytes(p, raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(4, '\0')));
  expect_error(p, "run past");
  write_bytes(p, raw_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data8));
  expect_error(p, "needs 12 bytes");
  write_bytes(p, raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", data8));
  expect_error(p, "end before begin");
  write_bytes(p, raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})", data8));
  expect_error(p, "overlap");
  write_bytes(p, raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", data8));
  expect_error(p, "overlap");
  write_bytes(p, raw_file(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", data8));
  expect_error(p, "unknown dtype 'Q4'");
  write_bytes(p, raw_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data8));
  expect_error(p, "non-negative integer");
  write_bytes(p, raw_file(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", data8));
  expect_error(p, "non-negative integer");
  write_bytes(p, raw_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}})", data8));
  expect_error(p, "too many elements");
  write_bytes(p, raw_file(R"({"a":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,8]}})", data8));
  expect_error(p, "too large");
  write_bytes(p, raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", data8));
  expect_error(p, "data_offsets");
  write_bytes(p, raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551615,18446744073709551615]}})", data8));
  expect_error(p, "needs 8 bytes");
  write_bytes(p, raw_file(R"({"a":[1]})", data8));
  expect_error(p, "expected an object");
  write_bytes(p, raw_file(R"({"__metadata__":{"x":1}})", ""));
  expect_error(p, "not a string");
  expect_error(dir / "missing.safetensors", "cannot open");
  expect_error(dir.path().string(), "not a regular file");
}

TEST(Safetensors, WriterRejectsBadNamesAndLeavesNoPartialFile) {
  TempDir dir;
  Tensor a = iota_f32({2});
  const std::string p = dir / "w.safetensors";
  EXPECT_THROW(write_safetensors(p, {{"a", a.view()}, {"a", a.view()}}), Error);
  EXPECT_THROW(write_safetensors(p, {{"__metadata__", a.view()}}), Error);
  EXPECT_FALSE(fs::exists(p));
  EXPECT_THROW(write_safetensors(dir / "no/such/dir/w.safetensors", {{"a", a.view()}}), Error);
  size_t files = 0;
  for (auto& e : fs::directory_iterator(dir.path())) (void)e, ++files;
  EXPECT_EQ(files, 0u);  // no temporary left behind
}

TEST(SafetensorsCheckpoint, ShardedIndex) {
  TempDir dir;
  Tensor a = iota_f32({2, 2}), b = iota_f32({3});
  write_safetensors(dir / "model-00001-of-00002.safetensors", {{"x.a", a.view()}});
  fs::create_directories(dir.path() / "sub");
  write_safetensors(dir / "sub/model-00002-of-00002.safetensors", {{"x.b", b.view()}});
  write_bytes(dir / "model.safetensors.index.json",
              R"({"metadata":{"total_size":28},"weight_map":{"x.a":"model-00001-of-00002.safetensors","x.b":"sub/model-00002-of-00002.safetensors"}})");
  for (const std::string& open_path : {dir.path().string(), dir / "model.safetensors.index.json"}) {
    SafetensorsCheckpoint c = SafetensorsCheckpoint::open(open_path);
    EXPECT_EQ(c.names(), (std::vector<std::string>{"x.a", "x.b"}));
    EXPECT_EQ(c.tensor("x.b").data_as<float>()[2], b.data_as<float>()[2]);
    EXPECT_EQ(c.entry("x.a").shape, (Shape{2, 2}));
    EXPECT_THROW(c.tensor("x.c"), Error);
  }
}

TEST(SafetensorsCheckpoint, IndexPathsAreConfined) {
  TempDir dir;
  Tensor a = iota_f32({2});
  write_safetensors(dir / "m.safetensors", {{"x", a.view()}});
  for (const std::string target : {"../m.safetensors", "/etc/passwd", "sub/../../m.safetensors", ""}) {
    write_bytes(dir / "model.safetensors.index.json", R"({"weight_map":{"x":")" + target + R"("}})");
    try {
      SafetensorsCheckpoint::open(dir.path().string());
      FAIL() << target;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("shard path"), std::string::npos) << e.what();
    }
  }
  // The index names a shard that lacks the tensor.
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map":{"y":"m.safetensors"}})");
  EXPECT_THROW(SafetensorsCheckpoint::open(dir.path().string()).tensor("y"), Error);
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map":[1]})");
  EXPECT_THROW(SafetensorsCheckpoint::open(dir.path().string()), Error);
}

TEST(SafetensorsCheckpoint, FolderWithoutIndexUnionsFiles) {
  TempDir dir;
  Tensor a = iota_f32({2});
  write_safetensors(dir / "a.safetensors", {{"x", a.view()}});
  write_safetensors(dir / "b.safetensors", {{"y", a.view()}});
  SafetensorsCheckpoint c = SafetensorsCheckpoint::open(dir.path().string());
  EXPECT_EQ(c.names().size(), 2u);
  write_safetensors(dir / "c.safetensors", {{"y", a.view()}});
  EXPECT_THROW(SafetensorsCheckpoint::open(dir.path().string()), Error);  // y twice
}

TEST(Safetensors, RandomCorruptionNeverCrashes) {
  // Mutation fuzzing of a valid file: flipped bytes anywhere in the length or header, and
  // truncation. Every outcome must be a clean open (then every tensor readable in bounds) or a
  // qmoe::Error. Under -DQMOE_SANITIZE=ON this also proves no out-of-bounds access. Seeded: a
  // failure prints the iteration so it can be replayed.
  TempDir dir;
  Tensor a = iota_f32({3, 4});
  Tensor b(DType::u8, {5});
  Tensor c(DType::bf16, {2, 2});
  const std::string good = dir / "good.safetensors";
  write_safetensors(good, {{"alpha", a.view()}, {"b", b.view()}, {"c", c.view()}}, {{"k", "v"}});
  std::ifstream in(good, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  std::mt19937 rng(1234);
  const std::string p = dir / "fuzz.safetensors";
  const char interesting[] = {'"', '[', ']', '{', '}', ',', ':', '-', '0', '9', ' ', '\0', '\xff'};
  int opened = 0;
  for (int it = 0; it < 800; ++it) {
    std::string m = bytes;
    const int edits = 1 + int(rng() % 4);
    for (int j = 0; j < edits; ++j) {
      const size_t pos = rng() % (8 + header_len);  // length field or header text
      m[pos] = rng() % 2 ? interesting[rng() % sizeof interesting] : char(rng());
    }
    if (rng() % 8 == 0) m.resize(rng() % m.size());
    write_bytes(p, m);
    try {
      SafetensorsFile f = SafetensorsFile::open(p);
      ++opened;
      for (const std::string& n : f.names()) {
        try {
          Tensor t = f.tensor(n);
          volatile uint8_t sink = 0;
          for (size_t i = 0; i < t.nbytes(); ++i) sink = sink ^ static_cast<const uint8_t*>(t.data())[i];
        } catch (const Error&) {
        }
      }
    } catch (const Error&) {
    } catch (const std::exception& e) {
      FAIL() << "iteration " << it << ": non-qmoe exception " << e.what();
    }
  }
  EXPECT_GT(opened, 0);  // some mutations (e.g. inside metadata strings) leave a valid file
}
