// Packed weight files: XXH64 against known vectors, a bitwise round trip through the reference
// backend, one test per way a file can be wrong (each expecting its own error), header fuzzing, and
// issue 3's four-way parity test on the CPU backend. The weights are random bytes and scales (the
// layer need not be meaningful to test the container).
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "qmoe/backend.h"
#include "qmoe/error.h"
#include "qmoe/ort_cuda_layout.h"
#include "qmoe/npy.h"
#include "qmoe/onnx_model.h"
#include "qmoe/packed_file.h"
#include "qmoe/raw_experts.h"

using namespace qmoe;
namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<uint8_t>;

MoeSpec test_spec() {
  MoeSpec s;
  s.num_experts = 4;
  s.hidden = 64;
  s.inter = 32;
  s.k = 2;
  s.bits = 4;
  s.block_size = 32;
  s.activation = Activation::swiglu;
  s.swiglu_fusion = SwigluFusion::interleaved;
  s.swiglu_limit = 7.0f;
  s.activation_alpha = 1.702f;
  s.activation_beta = 1.0f;
  s.normalize_routing_weights = true;
  s.scale_dtype = DType::f16;
  s.fc1_bias = true;
  s.fc2_zero_points = true;
  return s;
}

void fill_random(Tensor& t, std::mt19937_64& rng) {
  auto* p = t.data_as<uint8_t>();
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = uint8_t(rng());
}

// Scales as small random floats of the spec's T2 (random bytes could be NaN/inf, which would make a
// bitwise output comparison depend on NaN payloads rather than on the file).
Tensor random_floats(DType dt, const Shape& shape, std::mt19937_64& rng, float lo, float hi) {
  Tensor t(dt, shape);
  std::uniform_real_distribution<float> u(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) store_from_float(dt, t.data(), i, u(rng));
  return t;
}

RawMatrix random_matrix(const MoeSpec& s, Fc fc, bool bias, bool zp, std::mt19937_64& rng) {
  RawMatrix m;
  m.weights = Tensor(DType::u8, raw_weight_shape(s, fc));
  fill_random(m.weights, rng);
  m.scales = random_floats(s.scale_dtype, raw_scale_shape(s, fc), rng, -0.05f, 0.05f);
  if (zp) {
    m.zero_points = Tensor(DType::u8, raw_zero_point_shape(s, fc));
    fill_random(*m.zero_points, rng);
  }
  if (bias) m.bias = random_floats(s.act_dtype, raw_bias_shape(s, fc), rng, -0.5f, 0.5f);
  return m;
}

RawExperts random_raw(const MoeSpec& s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  RawExperts r;
  r.fc1 = random_matrix(s, Fc::fc1, s.fc1_bias, s.fc1_zero_points, rng);
  r.fc2 = random_matrix(s, Fc::fc2, s.fc2_bias, s.fc2_zero_points, rng);
  if (s.has_fc3()) r.fc3 = random_matrix(s, Fc::fc3, s.fc3_bias, s.fc3_zero_points, rng);
  return r;
}

// A PackedExperts with any tag and blobs, to write files a backend would not.
class FakePacked final : public PackedExperts {
 public:
  FakePacked(LayoutTag tag, MoeSpec spec, std::vector<NamedTensor> blobs)
      : PackedExperts(std::move(tag), std::move(spec)), blobs_(std::move(blobs)) {}
  size_t resident_bytes() const override { return 0; }
  std::vector<NamedTensor> to_blobs() const override { return blobs_; }

 private:
  std::vector<NamedTensor> blobs_;
};

class PackedFile : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "qmoe_packed_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    spec_ = test_spec();
    backend_ = make_reference_backend();
    packed_ = backend_->prepack(spec_, random_raw(spec_, seed_));
    good_ = path("good.qmoe");
    save_packed(good_, *packed_, "qmoe test");
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (fs::path(dir_) / name).string(); }
  static Bytes read(const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return Bytes((std::istreambuf_iterator<char>(f)), {});
  }
  std::string write(const std::string& name, const Bytes& b) const {
    const std::string p = path(name);
    std::ofstream f(p, std::ios::binary);
    f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
    return p;
  }
  // Expects load_packed to throw a qmoe::Error containing every needle.
  void expect_load_error(const std::string& p, std::vector<std::string> needles,
                         const std::optional<MoeSpec>& expected = std::nullopt) {
    try {
      load_packed(p, *backend_, expected);
      ADD_FAILURE() << "expected an error loading " << p << " (seed " << seed_ << ")";
    } catch (const Error& e) {
      for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
    }
  }
  Tensor run(const PackedExperts& p) {
    std::mt19937_64 rng(99);
    const int64_t rows = 5;
    Tensor x = random_floats(DType::f32, {rows, spec_.hidden}, rng, -1.f, 1.f);
    Tensor logits = random_floats(DType::f32, {rows, spec_.num_experts}, rng, -2.f, 2.f);
    MoeInputs in{x.view(), logits.view(), std::nullopt};
    Tensor out(DType::f32, {rows, spec_.hidden});
    backend_->run(p, in, out);
    return out;
  }

  const uint64_t seed_ = 20261126;
  std::string dir_, good_;
  MoeSpec spec_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<PackedExperts> packed_;
};

}  // namespace

TEST(Xxh64, KnownVectors) {
  // Reference values from the xxhash Python package (the C reference implementation).
  EXPECT_EQ(xxhash64("", 0), 0xef46db3751d8e999ull);
  EXPECT_EQ(xxhash64("", 0, 1), 0xd5afba1336a3be4bull);
  EXPECT_EQ(xxhash64("a", 1), 0xd24ec4f1a98c6e5bull);
  EXPECT_EQ(xxhash64("a", 1, 1), 0xdec2bc81c3cd46c6ull);
  EXPECT_EQ(xxhash64("abc", 3), 0x44bc2cf5ad770999ull);
  const char* s33 = "0123456789abcdef0123456789abcdef!";
  EXPECT_EQ(xxhash64(s33, 33), 0x8afff4daac4e677eull);
  EXPECT_EQ(xxhash64(s33, 33, 1), 0x72494c093cf3c86eull);
  Bytes b768(768);
  for (size_t i = 0; i < b768.size(); ++i) b768[i] = uint8_t(i);
  EXPECT_EQ(xxhash64(b768.data(), b768.size()), 0x8e03c838c596036full);
  EXPECT_EQ(xxhash64(b768.data(), b768.size(), 1), 0xa80257374b99ade3ull);
  // Streaming in uneven pieces gives the one-shot value.
  for (size_t piece : {1, 3, 7, 31, 32, 33, 100}) {
    Xxh64 h;
    for (size_t i = 0; i < b768.size(); i += piece) h.update(b768.data() + i, std::min(piece, b768.size() - i));
    EXPECT_EQ(h.digest(), 0x8e03c838c596036full) << "piece " << piece;
  }
}

TEST(Xxh64, Throughput) {
  // Informational (the FORMAT.md figure): one core, 64 MiB in cache-sized passes.
  Bytes buf(64 << 20, 0x5a);
  const auto t0 = std::chrono::steady_clock::now();
  const uint64_t h = xxhash64(buf.data(), buf.size());
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("xxh64: %.1f GB/s (hash %016llx)\n", buf.size() / s / 1e9, (unsigned long long)h);
  EXPECT_NE(h, 0u);
}

TEST_F(PackedFile, RoundTripIsBitwiseIdentical) {
  const auto loaded = load_packed(good_, *backend_, spec_);
  EXPECT_EQ(loaded->tag(), packed_->tag());
  const auto a = packed_->to_blobs(), b = loaded->to_blobs();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].name, b[i].name);
    EXPECT_EQ(a[i].tensor.shape(), b[i].tensor.shape()) << a[i].name;
    EXPECT_EQ(a[i].tensor.dtype(), b[i].tensor.dtype()) << a[i].name;
    EXPECT_EQ(std::memcmp(a[i].tensor.data(), b[i].tensor.data(), a[i].tensor.nbytes()), 0) << a[i].name;
  }
  const Tensor y0 = run(*packed_), y1 = run(*loaded);
  EXPECT_EQ(std::memcmp(y0.data(), y1.data(), y0.nbytes()), 0) << "outputs differ after a file round trip";
  // The file's layout: magic, 64-byte aligned blobs, nothing left behind by the atomic write.
  const Bytes f = read(good_);
  EXPECT_EQ(std::memcmp(f.data(), kPackedMagic.data(), 8), 0);
  const PackedHeader h = decode_packed_header(f.data(), f.size(), f.size(), good_);
  for (const auto& e : h.blobs) EXPECT_EQ(e.offset % 64, 0u) << e.name;
  EXPECT_EQ(h.spec.swiglu_limit, 7.0f);
  EXPECT_EQ(h.writer, "qmoe test");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1) << "temporary file left behind";
  // inspect agrees.
  const PackedFileInfo info = inspect_packed(good_);
  EXPECT_TRUE(info.header_ok && info.payload_ok) << info.to_string();
  const std::string text = info.to_string();
  EXPECT_NE(text.find("layout: raw v1 (target any)"), std::string::npos) << text;
  EXPECT_NE(text.find("fc2.zero_points"), std::string::npos) << text;
  EXPECT_NE(text.find("status: OK"), std::string::npos) << text;
}

TEST_F(PackedFile, OverwritesAtomicallyAndFailsCleanly) {
  save_packed(good_, *packed_);  // replace an existing file
  EXPECT_NO_THROW(load_packed(good_, *backend_));
  try {
    save_packed(path("no/such/dir/x.qmoe"), *packed_);
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot create temporary file"), std::string::npos) << e.what();
  }
  // Duplicate blob names are refused before anything is written.
  auto blobs = packed_->to_blobs();
  blobs.push_back(blobs[0]);
  FakePacked dup(packed_->tag(), spec_, blobs);
  EXPECT_THROW(save_packed(path("dup.qmoe"), dup), Error);
  EXPECT_FALSE(fs::exists(path("dup.qmoe")));
}

TEST_F(PackedFile, WrongTarget) {
  FakePacked other({"cpu-avx512-w4", 1, "cpu-avx512"}, spec_, packed_->to_blobs());
  save_packed(path("avx512.qmoe"), other);
  expect_load_error(path("avx512.qmoe"),
                    {"holds layout cpu-avx512-w4 v1 (target cpu-avx512)", "backend 'reference' runs layout raw v1 (target any)"});
}

TEST_F(PackedFile, WrongLayoutVersion) {
  FakePacked v2({"raw", 2, "any"}, spec_, packed_->to_blobs());
  save_packed(path("v2.qmoe"), v2);
  expect_load_error(path("v2.qmoe"), {"holds layout raw v2 (target any)", "runs layout raw v1 (target any)"});
}

TEST_F(PackedFile, WrongFormatVersion) {
  Bytes f = read(good_);
  f[8] = 2;  // format version field (little-endian u32 at byte 8)
  expect_load_error(write("fmt2.qmoe", f), {"format version 2, but this build reads version 1"});
  EXPECT_THROW(inspect_packed(path("fmt2.qmoe")), Error);
}

TEST_F(PackedFile, WrongSpec) {
  MoeSpec other = spec_;
  other.hidden = 128;
  expect_load_error(good_, {"different layer spec (hidden: file has 64, expected 128)"}, other);
  other = spec_;
  other.activation_alpha = 1.0f;
  expect_load_error(good_, {"activation_alpha: file has 1.702, expected 1"}, other);
}

TEST_F(PackedFile, Truncated) {
  const Bytes f = read(good_);
  expect_load_error(write("cut_payload.qmoe", Bytes(f.begin(), f.end() - 100)), {"truncated", "header declares"});
  expect_load_error(write("cut_header.qmoe", Bytes(f.begin(), f.begin() + 100)),
                    {"truncated: the header alone needs"});
  expect_load_error(write("cut_prelude.qmoe", Bytes(f.begin(), f.begin() + 30)),
                    {"truncated", "shorter than the 64-byte fixed header"});
  // inspect refuses a header whose sizes run past the end of the file, with the same message.
  try {
    (void)inspect_packed(path("cut_payload.qmoe"));
    ADD_FAILURE() << "inspect accepted a truncated file";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
}

TEST_F(PackedFile, FlippedPayloadByte) {
  Bytes f = read(good_);
  const PackedHeader h = decode_packed_header(f.data(), f.size(), f.size(), good_);
  f[size_t(h.blobs[1].offset + 17)] ^= 0x10;
  const std::string p = write("payload_flip.qmoe", f);
  expect_load_error(p, {"payload checksum mismatch", "the file is corrupted"});
  const PackedFileInfo info = inspect_packed(p);
  EXPECT_TRUE(info.header_ok);
  EXPECT_FALSE(info.payload_ok);
  EXPECT_NE(info.to_string().find("BAD"), std::string::npos) << info.to_string();
}

TEST_F(PackedFile, FlippedHeaderByte) {
  Bytes f = read(good_);
  f[kPackedPreludeBytes + 6] ^= 0x01;  // inside the writer string
  const std::string p = write("header_flip.qmoe", f);
  expect_load_error(p, {"header checksum mismatch", "header is corrupted"});
  const PackedFileInfo info = inspect_packed(p);
  EXPECT_FALSE(info.header_ok);
  EXPECT_NE(info.to_string().find("header checksum mismatch"), std::string::npos) << info.to_string();
  // A flip in the stored payload size is caught by the header checksum too.
  Bytes g = read(good_);
  g[24] ^= 0x01;
  expect_load_error(write("size_flip.qmoe", g), {"header checksum mismatch"});
}

TEST_F(PackedFile, RawFilesOfferedAsPacked) {
  // A .npy file (what raw tensors are saved as).
  std::string npy_header = "{'descr': '|u1', 'fortran_order': False, 'shape': (4, 16), }";
  npy_header.resize(118, ' ');
  npy_header += '\n';
  Bytes npy = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 118, 0};
  npy.insert(npy.end(), npy_header.begin(), npy_header.end());
  npy.resize(npy.size() + 64, 7);
  expect_load_error(write("w.npy", npy), {"not a qmoe packed file", "a NumPy .npy file"});
  // An ONNX model starts with ir_version (field 1, varint).
  expect_load_error(write("m.onnx", Bytes{0x08, 0x0a, 0x12, 0x07, 'p', 'y', 't', 'o', 'r', 'c', 'h', 0x3a, 0x00}),
                    {"not a qmoe packed file", "an ONNX model"});
  // A safetensors file: u64 header length, then JSON.
  const std::string json = "{\"w\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}";
  Bytes st(8);
  for (int i = 0; i < 8; ++i) st[i] = uint8_t(uint64_t(json.size()) >> (8 * i));
  st.insert(st.end(), json.begin(), json.end());
  st.push_back(1), st.push_back(2);
  expect_load_error(write("w.safetensors", st), {"not a qmoe packed file", "a safetensors file"});
  // Raw weight bytes with no header at all.
  std::mt19937_64 rng(5);
  Bytes raw(4096);
  for (auto& b : raw) b = uint8_t(rng() | 0x80);
  expect_load_error(write("w.bin", raw), {"not a qmoe packed file", "unrecognized binary data"});
  expect_load_error(write("empty", {}), {"not a qmoe packed file", "an empty file"});
  EXPECT_THROW(inspect_packed(path("w.npy")), Error);
  expect_load_error(path("does_not_exist.qmoe"), {"cannot open"});
}

// The reverse direction: a packed file offered where raw input is expected is named as such.
TEST_F(PackedFile, PackedFileOfferedAsRaw) {
  for (auto load : {+[](const std::string& p) { read_npy(p); }, +[](const std::string& p) { load_onnx(p); }}) {
    try {
      load(good_);
      ADD_FAILURE() << "a packed file was accepted as raw input";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("is a qmoe packed weight file"), std::string::npos) << e.what();
    }
  }
}

TEST_F(PackedFile, HugeDeclaredBlob) {
  // A header that is internally consistent (checksum recomputed) but declares a 256 TiB blob: refused
  // by the bound against the file size, before anything is allocated.
  const Bytes f = read(good_);
  PackedHeader h = decode_packed_header(f.data(), f.size(), f.size(), good_);
  h.blobs[0].shape = {1 << 20, 1 << 20, 1 << 8};
  h.blobs[0].nbytes = uint64_t(1) << 48;
  const Bytes head = encode_packed_header(h);
  ASSERT_EQ(head.size(), h.header_bytes);
  Bytes g = head;
  g.insert(g.end(), f.begin() + std::ptrdiff_t(head.size()), f.end());
  expect_load_error(write("huge.qmoe", g), {"blob 0 'fc1.weights' declares 281474976710656 bytes", "past the end of the file"});
  // A shape that disagrees with its byte length.
  h = decode_packed_header(f.data(), f.size(), f.size(), good_);
  h.blobs[1].shape[0] += 1;
  Bytes k = encode_packed_header(h);
  k.insert(k.end(), f.begin() + std::ptrdiff_t(k.size()), f.end());
  expect_load_error(write("shape.qmoe", k), {"'fc1.scales'", "does not match its byte length"});
  // A blob the backend needs is missing: the backend's own error, prefixed with the path.
  auto blobs = packed_->to_blobs();
  for (size_t i = 0; i < blobs.size(); ++i)
    if (blobs[i].name == "fc2.weights") blobs.erase(blobs.begin() + std::ptrdiff_t(i));
  save_packed(path("missing.qmoe"), FakePacked(packed_->tag(), spec_, blobs));
  expect_load_error(path("missing.qmoe"), {"missing.qmoe", "fc2.weights is missing"});
}

TEST_F(PackedFile, HostileHeadersNeverCrash) {
  // Random damage to header fields with a recomputed checksum (so every field reaches the decoder),
  // and every truncation length through the header: each load must end in qmoe::Error or success.
  const Bytes f = read(good_);
  const PackedHeader h0 = decode_packed_header(f.data(), f.size(), f.size(), good_);
  std::mt19937_64 rng(seed_);
  int errors = 0;
  for (int it = 0; it < 3000; ++it) {
    Bytes g = f;
    const int flips = 1 + int(rng() % 4);
    for (int j = 0; j < flips; ++j) {
      const size_t at = kPackedPreludeBytes + rng() % (h0.header_bytes - kPackedPreludeBytes);
      g[at] = (rng() % 3 == 0) ? uint8_t(rng()) : uint8_t(g[at] ^ (1u << (rng() % 8)));
    }
    // Recompute the header checksum so the damage is seen by the field decoder, not the hash.
    Xxh64 hh;
    Bytes tmp(g.begin(), g.begin() + std::ptrdiff_t(h0.header_bytes));
    std::memset(tmp.data() + 40, 0, 8);
    hh.update(tmp.data(), tmp.size());
    const uint64_t v = hh.digest();
    for (int i = 0; i < 8; ++i) g[40 + size_t(i)] = uint8_t(v >> (8 * i));
    // Every iteration through the in-memory decoder; one in 20 through the file paths too (file
    // creation dominates the cost).
    try {
      (void)decode_packed_header(g.data(), g.size(), g.size(), "fuzz");
    } catch (const Error&) {
      ++errors;
    }
    if (it % 20 != 0) continue;
    const std::string p = write("fuzz.qmoe", g);
    try {
      load_packed(p, *backend_);
    } catch (const Error&) {
    }
    try {
      (void)inspect_packed(p).to_string();
    } catch (const Error&) {
    }
  }
  EXPECT_GT(errors, 2000);
  for (size_t len = 0; len < h0.header_bytes + 80; len += 7) {
    const std::string p = write("cut.qmoe", Bytes(f.begin(), f.begin() + std::ptrdiff_t(len)));
    EXPECT_THROW(load_packed(p, *backend_), Error) << "length " << len;
  }
}

// ---- the issue-3 parity test ------------------------------------------------------------------
//
// One layer run four ways on the fast CPU backend: raw weights prepacked at load, the same packed
// weights through an offline packed file, prepack off (straight from raw bytes), and the weights
// imported from ORT's CUDA layout. All four outputs must be bitwise identical.

TEST(PackedParity, FourWaysBitwiseIdentical) {
  const fs::path dir = fs::temp_directory_path() / ("qmoe_parity_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  for (int bits : {4, 8})
    for (int64_t block : {int64_t(0), int64_t(32)}) {
      const uint64_t seed = 777 + uint64_t(bits * 10 + block);
      SCOPED_TRACE("seed " + std::to_string(seed) + " int" + std::to_string(bits) + " block " + std::to_string(block));
      MoeSpec s;
      s.num_experts = 4, s.hidden = 64, s.inter = 64, s.k = 2, s.bits = bits, s.block_size = block;
      s.activation = Activation::swiglu;
      s.swiglu_fusion = SwigluFusion::interleaved;
      s.normalize_routing_weights = true;
      s.fc1_bias = s.fc2_zero_points = true;
      const RawExperts raw = random_raw(s, seed);

      std::mt19937_64 rng(seed + 1);
      const int64_t rows = 6;
      const Tensor x = random_floats(DType::f32, {rows, s.hidden}, rng, -1.f, 1.f);
      const Tensor logits = random_floats(DType::f32, {rows, s.num_experts}, rng, -2.f, 2.f);
      const MoeInputs in{x.view(), logits.view(), std::nullopt};
      auto run = [&](Backend& be, const PackedExperts& p) {
        Tensor y(DType::f32, {rows, s.hidden});
        be.run(p, in, y);
        return y;
      };

      auto fast = make_cpu_backend({1, true, "auto"});
      const auto packed = fast->prepack(s, raw);
      const Tensor y_prepacked = run(*fast, *packed);

      const std::string file = (dir / "layer.qmoe").string();
      save_packed(file, *packed);
      const Tensor y_file = run(*fast, *load_packed(file, *fast, s));

      auto slow = make_cpu_backend({1, false, "auto"});
      const Tensor y_raw = run(*slow, *slow->prepack(s, raw));

      RawExperts imported = raw;
      const int64_t N1 = fc_rows(s, Fc::fc1), K1 = fc_cols(s, Fc::fc1);
      const int64_t N2 = fc_rows(s, Fc::fc2), K2 = fc_cols(s, Fc::fc2);
      imported.fc1.weights = ort_cuda_to_raw(raw_to_ort_cuda(raw.fc1.weights, N1, K1, bits), N1, K1, bits);
      imported.fc2.weights = ort_cuda_to_raw(raw_to_ort_cuda(raw.fc2.weights, N2, K2, bits), N2, K2, bits);
      const Tensor y_ort = run(*fast, *fast->prepack(s, std::move(imported)));

      const size_t n = y_prepacked.nbytes();
      EXPECT_EQ(std::memcmp(y_file.data(), y_prepacked.data(), n), 0) << "packed file differs from prepack at load";
      EXPECT_EQ(std::memcmp(y_raw.data(), y_prepacked.data(), n), 0) << "prepack off differs from prepack on";
      EXPECT_EQ(std::memcmp(y_ort.data(), y_prepacked.data(), n), 0) << "ORT-layout import differs";
    }
  fs::remove_all(dir);
}
