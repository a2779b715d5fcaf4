// NumPy .npy reader and writer (include/qmoe/npy.h): how the CLI and tests exchange inputs and
// outputs with Python without a NumPy dependency in C++.
//
// File layout (NumPy's NEP 1 / numpy.lib.format):
//   "\x93NUMPY" major minor | header length (u16 LE for 1.0, u32 LE for 2.0/3.0) | header | data
// The header is a Python dict literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
// padded with spaces and ended by '\n'. We parse it with a small recursive-descent parser that accepts
// exactly the literal forms NumPy writes (strings, True/False, tuples of integers) and rejects the
// rest, because a lenient regex would happily load a file whose header was cut or corrupted.
// Every size (header length, shape product, data bytes) is checked against the file size before any
// allocation, so a hostile header cannot make us allocate or read beyond the file.
#include "qmoe/npy.h"

#include "qmoe/packed_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string_view>

#include "qmoe/error.h"

namespace qmoe {

static_assert(std::endian::native == std::endian::little,
              "npy I/O copies little-endian data verbatim; a big-endian host would need byte swaps");

namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;
// NumPy itself refuses headers above 10000 bytes unless told otherwise (max_header_size); a real
// header for our dtypes and ranks is < 200 bytes. The cap bounds work on hostile length fields.
constexpr size_t kMaxHeaderLen = 1 << 16;
// Ranks beyond this are certainly not QMoE tensors; the cap keeps hostile shapes cheap to reject.
constexpr size_t kMaxRank = 32;

std::string errno_text() { return std::strerror(errno); }

struct NpyHeader {
  DType dtype = DType::f32;
  Shape shape;
  size_t data_offset = 0;  // bytes from the start of the file to the first element
  size_t data_bytes = 0;
};

// A cursor over the header text. Error messages quote the byte offset within the header dict so a
// user can find the bad spot with `head -c`.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& name) : s_(text), name_(name) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw Error(name_ + ": malformed .npy header at offset " + std::to_string(pos_) + ": " + what +
                " (header: " + printable() + ")");
  }

  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }
  bool peek(char c) {
    skip_ws();
    return pos_ < s_.size() && s_[pos_] == c;
  }
  void expect(char c, const std::string& context) {
    skip_ws();
    if (pos_ >= s_.size()) fail(std::string("expected '") + c + "' " + context + ", got end of header");
    if (s_[pos_] != c) fail(std::string("expected '") + c + "' " + context + ", got '" + s_[pos_] + "'");
    ++pos_;
  }
  bool at_end() {
    skip_ws();
    return pos_ == s_.size();
  }

  // A Python string literal in single or double quotes, without escapes (NumPy never writes any
  // for the keys and descrs it produces; an escape would mean a dtype we do not support anyway).
  std::string string_lit() {
    skip_ws();
    if (pos_ >= s_.size() || (s_[pos_] != '\'' && s_[pos_] != '"')) fail("expected a quoted string");
    const char q = s_[pos_++];
    const size_t start = pos_;
    while (pos_ < s_.size() && s_[pos_] != q) {
      if (s_[pos_] == '\\') fail("escape sequences are not supported in header strings");
      if (s_[pos_] == '\n') fail("unterminated string");
      if (static_cast<unsigned char>(s_[pos_]) < 0x20 || static_cast<unsigned char>(s_[pos_]) > 0x7e)
        fail("non-printable or non-ASCII character in a header string");
      ++pos_;
    }
    if (pos_ >= s_.size()) fail("unterminated string");
    std::string out(s_.substr(start, pos_ - start));
    ++pos_;
    return out;
  }

  bool bool_lit() {
    skip_ws();
    if (s_.substr(pos_, 4) == "True") {
      pos_ += 4;
      return true;
    }
    if (s_.substr(pos_, 5) == "False") {
      pos_ += 5;
      return false;
    }
    fail("expected True or False");
  }

  // A non-negative decimal integer. Python 2's NumPy wrote long dims with an 'L' suffix ("3L"),
  // which NumPy still reads, so we accept that one suffix too.
  int64_t int_lit() {
    skip_ws();
    const size_t start = pos_;
    int64_t v = 0;
    while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
      const int d = s_[pos_] - '0';
      if (v > (std::numeric_limits<int64_t>::max() - d) / 10) fail("dimension too large");
      v = v * 10 + d;
      ++pos_;
    }
    if (pos_ == start) fail("expected a non-negative integer dimension");
    if (pos_ < s_.size() && s_[pos_] == 'L') ++pos_;
    return v;
  }

  // "()", "(n,)", "(n, m)", "(n, m,)": a Python tuple of integers. "(n)" is not a tuple in Python
  // (it is just n), so it is refused.
  Shape tuple_lit() {
    expect('(', "to open the shape tuple");
    Shape shape;
    if (peek(')')) {
      ++pos_;
      return shape;
    }
    bool trailing_comma = false;
    for (;;) {
      if (shape.size() >= kMaxRank) fail("shape has more than " + std::to_string(kMaxRank) + " dimensions");
      shape.push_back(int_lit());
      trailing_comma = false;
      if (peek(',')) {
        ++pos_;
        trailing_comma = true;
        if (peek(')')) break;
        continue;
      }
      break;
    }
    expect(')', "to close the shape tuple");
    if (shape.size() == 1 && !trailing_comma) fail("a one-element shape must be written '(n,)'");
    return shape;
  }

 private:
  std::string printable() const {
    std::string out;
    for (char c : s_.substr(0, 200)) out += (c >= 0x20 && c <= 0x7e) ? c : '?';
    if (s_.size() > 200) out += "...";
    return out;
  }

  std::string_view s_;
  const std::string& name_;
  size_t pos_ = 0;
};

DType dtype_from_descr(const std::string& descr, const NpyReadOptions& opt, const std::string& name) {
  if (descr == "<f4") return DType::f32;
  if (descr == "<f2") return DType::f16;
  if (descr == "|u1" || descr == "<u1") return DType::u8;
  if (descr == "<u2") {
    if (opt.uint16_as_bf16) return DType::bf16;
    throw Error(name + ": dtype '<u2' (uint16): qmoe reads uint16 arrays only as bfloat16 bit patterns; "
                       "pass the bf16 flag (NpyReadOptions::uint16_as_bf16, the CLI's bf16 option) if this "
                       "array holds bfloat16 values");
  }
  if (!descr.empty() && descr[0] == '>')
    throw Error(name + ": dtype '" + descr + "' is big-endian; qmoe reads little-endian arrays only "
                       "(convert with arr.astype(arr.dtype.newbyteorder('<')))");
  throw Error(name + ": unsupported dtype '" + descr + "'; expected '<f4' (float32), '<f2' (float16), "
                     "'|u1' (uint8) or '<u2' (bfloat16 bits, with the bf16 flag)");
}

// Parses the preamble and header from the first `avail` bytes of a file of `file_size` bytes.
// `avail` must cover at least the preamble; returns nullopt (with `need` set) when more bytes are
// needed to see the whole header, so read_npy can fetch exactly that much.
std::optional<NpyHeader> parse_header(const uint8_t* p, size_t avail, size_t file_size, const NpyReadOptions& opt,
                                      const std::string& name, size_t* need) {
  if (has_packed_magic(p, avail))
    throw Error(name + ": this is a qmoe packed weight file, not a .npy file (inspect it with `qmoe inspect`)");
  if (file_size < kMagicLen + 2 || std::memcmp(p, kMagic, kMagicLen) != 0)
    throw Error(name + ": not a .npy file (missing the \\x93NUMPY magic)");
  const int major = p[6], minor = p[7];
  size_t len_bytes = 0;
  if (major == 1 && minor == 0)
    len_bytes = 2;
  else if ((major == 2 || major == 3) && minor == 0)
    len_bytes = 4;
  else
    throw Error(name + ": unsupported .npy format version " + std::to_string(major) + "." + std::to_string(minor) +
                "; expected 1.0, 2.0 or 3.0");
  const size_t pre = kMagicLen + 2 + len_bytes;
  if (file_size < pre)
    throw Error(name + ": truncated .npy file: " + std::to_string(file_size) + " bytes, the preamble alone needs " +
                std::to_string(pre));
  if (avail < pre) {
    *need = pre;
    return std::nullopt;
  }
  size_t header_len = 0;
  for (size_t i = 0; i < len_bytes; ++i) header_len |= size_t(p[8 + i]) << (8 * i);
  if (header_len > kMaxHeaderLen)
    throw Error(name + ": .npy header length " + std::to_string(header_len) + " exceeds the limit of " +
                std::to_string(kMaxHeaderLen) + " bytes");
  if (header_len > file_size - pre)
    throw Error(name + ": truncated .npy file: header claims " + std::to_string(header_len) + " bytes but only " +
                std::to_string(file_size - pre) + " follow the preamble");
  if (avail < pre + header_len) {
    *need = pre + header_len;
    return std::nullopt;
  }

  std::string_view text(reinterpret_cast<const char*>(p + pre), header_len);
  // NumPy always terminates the header with '\n'; a header without it was cut or hand-made badly.
  if (text.empty() || text.back() != '\n')
    throw Error(name + ": malformed .npy header: it must end with a newline");
  HeaderParser hp(text, name);
  std::optional<std::string> descr;
  std::optional<bool> fortran;
  std::optional<Shape> shape;
  hp.expect('{', "to open the header dict");
  while (!hp.peek('}')) {
    const std::string key = hp.string_lit();
    hp.expect(':', "after key '" + key + "'");
    if (key == "descr") {
      if (descr) hp.fail("duplicate key 'descr'");
      descr = hp.string_lit();
    } else if (key == "fortran_order") {
      if (fortran) hp.fail("duplicate key 'fortran_order'");
      fortran = hp.bool_lit();
    } else if (key == "shape") {
      if (shape) hp.fail("duplicate key 'shape'");
      shape = hp.tuple_lit();
    } else {
      hp.fail("unexpected key '" + key + "' (expected only 'descr', 'fortran_order' and 'shape')");
    }
    if (!hp.peek(',')) break;
    hp.expect(',', "between entries");
  }
  hp.expect('}', "to close the header dict");
  if (!hp.at_end()) hp.fail("unexpected text after the header dict");
  if (!descr) throw Error(name + ": malformed .npy header: missing key 'descr'");
  if (!fortran) throw Error(name + ": malformed .npy header: missing key 'fortran_order'");
  if (!shape) throw Error(name + ": malformed .npy header: missing key 'shape'");

  NpyHeader h;
  h.dtype = dtype_from_descr(*descr, opt, name);
  if (*fortran) {
    // Rank <= 1 arrays are identical in both orders, but NumPy writes False for them; a True here
    // means a transposed matrix we would misread, so refuse it regardless of rank.
    throw Error(name + ": array is in Fortran order; qmoe reads C-order arrays only "
                       "(save np.ascontiguousarray(a))");
  }
  h.shape = std::move(*shape);
  const size_t esize = dtype_size(h.dtype);
  int64_t numel = 1;
  for (int64_t d : h.shape) {
    if (d != 0 && numel > std::numeric_limits<int64_t>::max() / d)
      throw Error(name + ": shape " + shape_str(h.shape) + " has too many elements");
    numel *= d;
  }
  h.data_offset = pre + header_len;
  const size_t have = file_size - h.data_offset;
  if (uint64_t(numel) > have / esize)
    throw Error(name + ": truncated .npy data: shape " + shape_str(h.shape) + " of " +
                std::string(dtype_name(h.dtype)) + " needs " + std::to_string(uint64_t(numel)) + " x " +
                std::to_string(esize) + " bytes, the file holds " + std::to_string(have) + " after the header");
  h.data_bytes = size_t(numel) * esize;
  if (have != h.data_bytes)
    throw Error(name + ": .npy file has " + std::to_string(have - h.data_bytes) +
                " unexpected bytes after the data of shape " + shape_str(h.shape));
  return h;
}

// A file descriptor that closes itself.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// pread until `n` bytes are in or the file ends; returns bytes read.
size_t read_fully(int fd, void* dst, size_t n, size_t off, const std::string& name) {
  size_t done = 0;
  while (done < n) {
    const size_t chunk = std::min<size_t>(n - done, size_t(1) << 30);
    const ssize_t r = ::pread(fd, static_cast<char*>(dst) + done, chunk, off_t(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw Error(name + ": read failed: " + errno_text());
    }
    if (r == 0) break;
    done += size_t(r);
  }
  return done;
}

}  // namespace

Tensor parse_npy(const void* data, size_t size, const NpyReadOptions& opt, const std::string& name) {
  if (!data && size) throw Error(name + ": null buffer");
  const auto* p = static_cast<const uint8_t*>(data);
  size_t need = 0;
  std::optional<NpyHeader> h = parse_header(p, size, size, opt, name, &need);
  // parse_header only asks for more when avail < file size, which cannot happen here.
  if (!h) throw Error(name + ": truncated .npy buffer");
  Tensor t(h->dtype, h->shape);
  if (h->data_bytes) std::memcpy(t.data(), p + h->data_offset, h->data_bytes);
  return t;
}

Tensor read_npy(const std::string& path, const NpyReadOptions& opt) {
  Fd f(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (f.fd < 0) throw Error(path + ": cannot open: " + errno_text());
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) throw Error(path + ": cannot stat: " + errno_text());
  if (!S_ISREG(st.st_mode)) throw Error(path + ": not a regular file");
  const size_t file_size = size_t(st.st_size);

  // Read the preamble, then exactly the header it announces, then the data straight into the tensor.
  std::string head(std::min<size_t>(file_size, 16), '\0');
  size_t got = read_fully(f.fd, head.data(), head.size(), 0, path);
  std::optional<NpyHeader> h;
  for (int round = 0; round < 3 && !h; ++round) {
    size_t need = 0;
    h = parse_header(reinterpret_cast<const uint8_t*>(head.data()), got, file_size, opt, path, &need);
    if (!h) {
      head.resize(need);
      got = read_fully(f.fd, head.data(), need, 0, path);
      // The file shrank between fstat and read: report it as truncation rather than loop.
      if (got < need) throw Error(path + ": file changed while reading (truncated header)");
    }
  }
  if (!h) throw Error(path + ": could not read the .npy header");
  Tensor t(h->dtype, h->shape);
  if (h->data_bytes && read_fully(f.fd, t.data(), h->data_bytes, h->data_offset, path) != h->data_bytes)
    throw Error(path + ": file changed while reading (truncated data)");
  return t;
}

void write_npy(const std::string& path, const TensorView& t) {
  const char* descr = nullptr;
  switch (t.dtype) {
    case DType::f32: descr = "<f4"; break;
    case DType::f16: descr = "<f2"; break;
    case DType::bf16: descr = "<u2"; break;  // NumPy has no bfloat16: store the bit patterns
    case DType::u8: descr = "|u1"; break;
  }
  if (!descr) throw Error(path + ": cannot write dtype " + std::string(dtype_name(t.dtype)) + " to .npy");
  const size_t nbytes = t.nbytes();  // validates the shape
  if (nbytes && !t.data) throw Error(path + ": cannot write a tensor of shape " + shape_str(t.shape) + " with no data");

  std::string dict = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < t.shape.size(); ++i) dict += (i ? ", " : "") + std::to_string(t.shape[i]);
  if (t.shape.size() == 1) dict += ",";
  dict += "), }";
  // Version 1.0 has a 16-bit header length; NumPy pads the preamble + header to a multiple of 64 so
  // the data is aligned for memory mapping.
  const bool v1 = dict.size() + 1 + 63 <= 0xffff;
  const size_t pre = kMagicLen + 2 + (v1 ? 2 : 4);
  size_t total = pre + dict.size() + 1;
  total = (total + 63) / 64 * 64;
  const size_t header_len = total - pre;
  std::string out(kMagic, kMagicLen);
  out += char(v1 ? 1 : 2);
  out += char(0);
  for (size_t i = 0; i < (v1 ? 2u : 4u); ++i) out += char((header_len >> (8 * i)) & 0xff);
  out += dict;
  out.append(header_len - dict.size() - 1, ' ');
  out += '\n';

  // Atomic replace: write a uniquely named sibling (same directory, hence same filesystem), fsync,
  // rename over the target. A failure at any step removes the temporary, so readers see either the
  // old file or the complete new one. O_EXCL + a random suffix avoids clobbering a concurrent writer.
  static std::atomic<uint64_t> counter{0};
  std::random_device rd;
  std::string tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 16 && fd < 0; ++attempt) {
    tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++) + "." + std::to_string(rd());
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);  // umask applies
    if (fd < 0 && errno != EEXIST) throw Error(path + ": cannot create temporary file " + tmp + ": " + errno_text());
  }
  if (fd < 0) throw Error(path + ": cannot create a unique temporary file next to it");
  Fd guard(fd);
  auto fail = [&](const std::string& what) {
    const std::string msg = path + ": " + what + ": " + errno_text();
    ::unlink(tmp.c_str());
    throw Error(msg);
  };
  auto write_all = [&](const void* src, size_t n) {
    size_t done = 0;
    while (done < n) {
      const ssize_t w = ::write(fd, static_cast<const char*>(src) + done, std::min<size_t>(n - done, size_t(1) << 30));
      if (w < 0) {
        if (errno == EINTR) continue;
        fail("write failed");
      }
      done += size_t(w);
    }
  };
  write_all(out.data(), out.size());
  if (nbytes) write_all(t.data, nbytes);
  if (::fsync(fd) != 0) fail("fsync failed");
  guard.fd = -1;
  if (::close(fd) != 0) fail("close failed");
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("cannot rename " + tmp + " to the target");
}

}  // namespace qmoe
