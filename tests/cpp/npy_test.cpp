// .npy reader/writer: round trips for every supported dtype and rank, NumPy's exact header bytes,
// and one test per malformed-file case checking that the error says what is wrong.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "qmoe/error.h"
#include "qmoe/npy.h"

using namespace qmoe;
namespace fs = std::filesystem;

namespace {

// A fresh directory per test, removed afterwards.
class NpyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("qmoe_npy_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // Count of files in the test directory (detects leftover temporaries).
  size_t file_count() const {
    size_t n = 0;
    for (auto& e : fs::directory_iterator(dir_)) (void)e, ++n;
    return n;
  }

  fs::path dir_;
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// Builds a .npy file image: magic, version, little-endian header length, header text padded with
// spaces to a 64-byte boundary and ended by '\n' (unless `raw_header` is set, then used verbatim).
std::string npy_image(const std::string& dict, const std::string& data, int major = 1, int minor = 0,
                      bool raw_header = false) {
  std::string out("\x93NUMPY", 6);
  out += char(major);
  out += char(minor);
  const size_t len_bytes = major == 1 ? 2 : 4;
  std::string header = dict;
  if (!raw_header) {
    size_t total = 8 + len_bytes + header.size() + 1;
    header.append((64 - total % 64) % 64, ' ');
    header += '\n';
  }
  for (size_t i = 0; i < len_bytes; ++i) out += char((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

std::string f32_bytes(std::initializer_list<float> v) {
  std::string s(v.size() * 4, '\0');
  size_t i = 0;
  for (float x : v) std::memcpy(&s[4 * i++], &x, 4);
  return s;
}

// Expects parse_npy on `bytes` to throw an Error containing `needle`.
void expect_error(const std::string& bytes, const std::string& needle, NpyReadOptions opt = {}) {
  try {
    parse_npy(bytes.data(), bytes.size(), opt, "case.npy");
    FAIL() << "expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
    EXPECT_NE(std::string(e.what()).find("case.npy"), std::string::npos) << "message lacks the file name: " << e.what();
  }
}

const std::string kF4_23 = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";

}  // namespace

TEST_F(NpyTest, RoundTripEveryDtypeAndRank) {
  const std::vector<Shape> shapes = {{}, {1}, {7}, {2, 3}, {2, 3, 5}, {0}, {3, 0, 2}, {1, 1, 1, 1}};
  for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::u8}) {
    for (const Shape& shape : shapes) {
      Tensor t(dt, shape);
      auto* bytes = static_cast<uint8_t*>(t.data());
      for (size_t i = 0; i < t.nbytes(); ++i) bytes[i] = uint8_t(i * 37 + 11);
      const std::string p = path("rt.npy");
      write_npy(p, t.view());
      NpyReadOptions opt;
      opt.uint16_as_bf16 = dt == DType::bf16;
      Tensor r = read_npy(p, opt);
      SCOPED_TRACE(std::string(dtype_name(dt)) + " " + shape_str(shape));
      EXPECT_EQ(r.dtype(), dt);
      EXPECT_EQ(r.shape(), shape);
      ASSERT_EQ(r.nbytes(), t.nbytes());
      EXPECT_EQ(std::memcmp(r.data(), t.data(), t.nbytes()), 0);
      // The in-memory parser agrees with the file reader.
      const std::string img = read_bytes(p);
      Tensor r2 = parse_npy(img.data(), img.size(), opt);
      EXPECT_EQ(r2.shape(), shape);
      EXPECT_EQ(std::memcmp(r2.data(), t.data(), t.nbytes()), 0);
    }
  }
  EXPECT_EQ(file_count(), 1u);  // only rt.npy: no temporaries left behind
}

TEST_F(NpyTest, WritesNumpysExactHeader) {
  Tensor t(DType::f32, {2, 3});
  write_npy(path("a.npy"), t.view());
  const std::string img = read_bytes(path("a.npy"));
  ASSERT_EQ(img.size(), 128u + 24u);  // 64-byte aligned header, then 6 floats
  EXPECT_EQ(img.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  EXPECT_EQ(uint8_t(img[8]) | (uint8_t(img[9]) << 8), 128 - 10);
  EXPECT_EQ(img.substr(10, kF4_23.size()), kF4_23);
  EXPECT_EQ(img[127], '\n');

  Tensor v(DType::u8, {5});
  write_npy(path("b.npy"), v.view());
  EXPECT_NE(read_bytes(path("b.npy")).find("{'descr': '|u1', 'fortran_order': False, 'shape': (5,), }"),
            std::string::npos);
  Tensor b(DType::bf16, {});
  write_npy(path("c.npy"), b.view());
  EXPECT_NE(read_bytes(path("c.npy")).find("{'descr': '<u2', 'fortran_order': False, 'shape': (), }"),
            std::string::npos);
}

TEST_F(NpyTest, ReadsValuesAndHeaderVariants) {
  const std::string data = f32_bytes({1, 2, 3, 4, 5, 6});
  // Versions 2.0 and 3.0 (4-byte header length), double quotes, other key order, no trailing comma,
  // Python 2's long suffix, extra spaces.
  for (auto [dict, major] : std::vector<std::pair<std::string, int>>{
           {kF4_23, 1},
           {kF4_23, 2},
           {kF4_23, 3},
           {"{\"shape\": (2, 3), \"fortran_order\": False, \"descr\": \"<f4\"}", 1},
           {"{'descr':'<f4','fortran_order':False,'shape':(2L,3L,)}", 1},
           {"  {  'descr' : '<f4' , 'fortran_order' : False , 'shape' : ( 2 , 3 ) , }  ", 1}}) {
    SCOPED_TRACE(dict);
    const std::string img = npy_image(dict, data, major);
    Tensor t = parse_npy(img.data(), img.size());
    ASSERT_EQ(t.shape(), (Shape{2, 3}));
    EXPECT_EQ(t.data_as<float>()[0], 1.0f);
    EXPECT_EQ(t.data_as<float>()[5], 6.0f);
  }
  // float16 and uint8 read as themselves; '<u1' is the same type as '|u1'.
  std::string h = npy_image("{'descr': '<f2', 'fortran_order': False, 'shape': (1,), }", std::string("\x00\x3c", 2));
  Tensor th = parse_npy(h.data(), h.size());
  EXPECT_EQ(th.dtype(), DType::f16);
  EXPECT_EQ(half_to_float(th.data_as<uint16_t>()[0]), 1.0f);
  std::string u = npy_image("{'descr': '<u1', 'fortran_order': False, 'shape': (2,), }", "\x07\xff");
  Tensor tu = parse_npy(u.data(), u.size());
  EXPECT_EQ(tu.dtype(), DType::u8);
  EXPECT_EQ(tu.data_as<uint8_t>()[1], 255);
}

TEST_F(NpyTest, Uint16NeedsTheBf16Flag) {
  const std::string img = npy_image("{'descr': '<u2', 'fortran_order': False, 'shape': (1,), }", std::string("\x80\x3f", 2));
  expect_error(img, "pass the bf16 flag");
  NpyReadOptions opt;
  opt.uint16_as_bf16 = true;
  Tensor t = parse_npy(img.data(), img.size(), opt);
  EXPECT_EQ(t.dtype(), DType::bf16);
  EXPECT_EQ(bf16_to_float(t.data_as<uint16_t>()[0]), 1.0f);
}

TEST_F(NpyTest, MalformedPreamble) {
  const std::string good = npy_image(kF4_23, f32_bytes({1, 2, 3, 4, 5, 6}));
  expect_error("", "not a .npy file");
  expect_error(std::string("\x93NUMP", 5), "not a .npy file");
  expect_error("PK\x03\x04 this is a zip file, not npy", "missing the \\x93NUMPY magic");
  std::string v = good;
  v[6] = 4;
  expect_error(v, "unsupported .npy format version 4.0");
  v = good;
  v[7] = 1;
  expect_error(v, "unsupported .npy format version 1.1");
  expect_error(good.substr(0, 9), "truncated .npy file: 9 bytes, the preamble alone needs 10");
  // Header length pointing past the end of the file, and above the sanity cap.
  v = good;
  v[8] = char(0xf0);
  v[9] = char(0x7f);
  expect_error(v, "header claims 32752 bytes but only");
  std::string v2 = npy_image(kF4_23, "", 2);
  v2[8] = v2[9] = v2[10] = char(0xff);
  v2[11] = 0x7f;
  expect_error(v2, "exceeds the limit");
}

TEST_F(NpyTest, MalformedHeaderDict) {
  const std::string d = f32_bytes({1, 2, 3, 4, 5, 6});
  struct Case {
    std::string dict, needle;
  };
  const std::vector<Case> cases = {
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", ""},  // control: valid
      {"'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)", "expected '{' to open the header dict"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)", "expected '}' to close the header dict"},
      {"{'descr': '<f4', 'fortran_order': False}", "missing key 'shape'"},
      {"{'shape': (2, 3), 'fortran_order': False}", "missing key 'descr'"},
      {"{'descr': '<f4', 'shape': (2, 3)}", "missing key 'fortran_order'"},
      {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}", "duplicate key 'descr'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'extra': 1}", "unexpected key 'extra'"},
      {"{'descr': '<f4', 'fortran_order': false, 'shape': (2, 3)}", "expected True or False"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': [2, 3]}", "expected '(' to open the shape tuple"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (6)}", "a one-element shape must be written '(n,)'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (-6,)}", "expected a non-negative integer dimension"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2.0, 3)}", "expected ')' to close the shape tuple"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,, 3)}", "expected a non-negative integer dimension"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,)}", "dimension too large"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} junk", "unexpected text after the header dict"},
      {"{'descr': '<f4, 'fortran_order': False, 'shape': (2, 3)}", "expected '}' to close the header dict, got 'f'"},
      {"{'descr' '<f4', 'fortran_order': False, 'shape': (2, 3)}", "expected ':' after key 'descr'"},
      {"{'descr': '<f4", "unterminated string"},
      {"{'descr': '<f\\x34', 'fortran_order': False, 'shape': (2, 3)}", "escape sequences are not supported"},
      {"{descr: '<f4', 'fortran_order': False, 'shape': (2, 3)}", "expected a quoted string"},
      {"{'descr': '<f4' 'fortran_order': False, 'shape': (2, 3)}", "expected '}' to close the header dict"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.dict);
    const std::string img = npy_image(c.dict, d);
    if (c.needle.empty())
      EXPECT_NO_THROW(parse_npy(img.data(), img.size()));
    else
      expect_error(img, c.needle);
  }
  // A header not ended by a newline (cut or hand-made).
  expect_error(npy_image(kF4_23, d, 1, 0, /*raw_header=*/true), "must end with a newline");
  // Non-ASCII bytes in a string.
  expect_error(npy_image("{'descr': '<f\xc3\xa4', 'fortran_order': False, 'shape': (2, 3)}", d), "non-ASCII");
}

TEST_F(NpyTest, UnsupportedDtypesAndOrder) {
  const std::string d = f32_bytes({1, 2, 3, 4, 5, 6});
  expect_error(npy_image("{'descr': '<f8', 'fortran_order': False, 'shape': (3,)}", d), "unsupported dtype '<f8'");
  expect_error(npy_image("{'descr': '<i4', 'fortran_order': False, 'shape': (6,)}", d), "unsupported dtype '<i4'");
  expect_error(npy_image("{'descr': '>f4', 'fortran_order': False, 'shape': (6,)}", d), "big-endian");
  expect_error(npy_image("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (6,)}", d),
               "expected a quoted string");
  expect_error(npy_image("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3)}", d), "Fortran order");
}

TEST_F(NpyTest, DataSizeMustMatchTheShape) {
  const std::string d = f32_bytes({1, 2, 3, 4, 5, 6});
  expect_error(npy_image(kF4_23, d.substr(0, 20)), "truncated .npy data: shape [2, 3] of float32 needs 6 x 4 bytes");
  expect_error(npy_image(kF4_23, d + "xx"), "2 unexpected bytes after the data");
  // Shapes whose byte count overflows, or is astronomically larger than the file, fail before any
  // allocation is attempted.
  expect_error(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4)}", d),
               "has too many elements");
  expect_error(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 1000)}", d),
               "truncated .npy data");
  expect_error(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387903,)}", d),
               "truncated .npy data");
}

TEST_F(NpyTest, ReadFileErrorsNameTheFile) {
  try {
    read_npy(path("missing.npy"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.npy: cannot open"), std::string::npos) << e.what();
  }
  try {
    read_npy(dir_.string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
  }
  // Truncated on disk: the file reader finds it from the header, before reading the data.
  write_bytes(path("cut.npy"), npy_image(kF4_23, f32_bytes({1, 2, 3})));
  try {
    read_npy(path("cut.npy"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cut.npy: truncated .npy data"), std::string::npos) << e.what();
  }
  // A long header (more than the first read) still parses through the file reader.
  std::string dict = kF4_23;
  dict.insert(dict.size() - 1, std::string(300, ' '));
  write_bytes(path("long.npy"), npy_image(dict, f32_bytes({1, 2, 3, 4, 5, 6}), 2));
  EXPECT_EQ(read_npy(path("long.npy")).data_as<float>()[4], 5.0f);
  // A tiny file.
  write_bytes(path("tiny.npy"), "\x93N");
  EXPECT_THROW(read_npy(path("tiny.npy")), Error);
}

TEST_F(NpyTest, AtomicWriteLeavesNoPartialFile) {
  Tensor t(DType::f32, {4});
  t.data_as<float>()[0] = 42.0f;
  // Replacing an existing file.
  write_bytes(path("out.npy"), "old contents");
  write_npy(path("out.npy"), t.view());
  EXPECT_EQ(read_npy(path("out.npy")).data_as<float>()[0], 42.0f);
  // Target is a directory: rename fails, the temporary is removed, the directory is untouched.
  fs::create_directories(dir_ / "adir");
  EXPECT_THROW(write_npy(path("adir"), t.view()), Error);
  EXPECT_TRUE(fs::is_directory(dir_ / "adir"));
  EXPECT_EQ(file_count(), 2u);  // out.npy and adir only
  // Missing parent folder: the error names the path; nothing is created.
  try {
    write_npy(path("no/such/dir/x.npy"), t.view());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("x.npy"), std::string::npos) << e.what();
  }
  EXPECT_EQ(file_count(), 2u);
  // A view without data is refused before anything is written.
  TensorView bad{DType::f32, {3}, nullptr};
  EXPECT_THROW(write_npy(path("bad.npy"), bad), Error);
  EXPECT_FALSE(fs::exists(dir_ / "bad.npy"));
  EXPECT_EQ(file_count(), 2u);
}

TEST_F(NpyTest, WriteIntoUnwritableFolderFails) {
  Tensor t(DType::f32, {4});
  // /proc accepts no new files, even for root: creating the temporary fails with a named error.
  EXPECT_THROW(write_npy("/proc/qmoe_cannot_write_here.npy", t.view()), Error);
}
