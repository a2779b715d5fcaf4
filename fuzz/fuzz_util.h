// Shared helpers for the libFuzzer harnesses in fuzz/.
//
// Parsers that only take a path get the fuzz input through a file in a per-process scratch folder
// under /dev/shm (tmpfs: no disk I/O, and one folder per fuzzer process so parallel fuzzers never
// share files). The folder is created once and removed at exit.
//
// What counts as a finding: any crash or sanitizer report, and any exception other than qmoe::Error
// escaping a public entry point (the API promises qmoe::Error with a message; a std::out_of_range or
// a JSON library exception reaching the caller is a bug). FUZZ_GUARD() implements that policy. Set
// QMOE_FUZZ_ALLOW_STD=1 to tolerate std::exception (to keep fuzzing past a known finding of that kind).
// QMOE_FUZZ_VERBOSE=1 prints every qmoe::Error, to see how far a seed gets.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
#include <string_view>

#include "qmoe/error.h"

namespace qmoe_fuzz {

// The per-process scratch folder ("/dev/shm/qmoe-fuzz-<name>-<pid>"), created on first use.
const std::string& scratch_dir(const char* fuzzer_name);
// Writes `size` bytes to scratch_dir()/file (truncating); returns the full path. Aborts on I/O
// failure (a harness problem, not a finding).
std::string write_file(const std::string& dir, const std::string& file, const void* data, size_t size);
void remove_file(const std::string& path);

bool allow_std_exceptions();
// QMOE_FUZZ_SKIP_KNOWN=1: harnesses skip inputs that would only re-hit an open finding listed in
// fuzz/FINDINGS.md (so a long run can look for new bugs past it). Off by default: CI replays them.
bool skip_known();
// Open finding F3: specs whose E, H, I or block_size exceed 2^31 overflow shape arithmetic.
inline bool spec_dims_known_overflow(int64_t e, int64_t h, int64_t i, int64_t b) {
  const int64_t lim = int64_t(1) << 31;
  return e > lim || h > lim || i > lim || b > lim;
}
// QMOE_FUZZ_VERBOSE=1: print each qmoe::Error (to check what seeds reach).
bool verbose();

// Consumes bytes from the front of the fuzz input; returns zeros once it runs out.
class Bytes {
 public:
  Bytes(const uint8_t* p, size_t n) : p_(p), n_(n) {}
  uint8_t u8() { return n_ ? (--n_, *p_++) : 0; }
  uint16_t u16() { return uint16_t(u8() | (u8() << 8)); }
  uint32_t u32() { return uint32_t(u16()) | (uint32_t(u16()) << 16); }
  float f32() {
    const uint32_t u = u32();
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
  size_t left() const { return n_; }
  const uint8_t* data() const { return p_; }
  void skip(size_t k) { k = k < n_ ? k : n_; p_ += k; n_ -= k; }

 private:
  const uint8_t* p_;
  size_t n_;
};

}  // namespace qmoe_fuzz

// Runs `body`; qmoe::Error is an accepted outcome, anything else aborts (libFuzzer reports it).
#define FUZZ_GUARD(body)                                                                \
  do {                                                                                  \
    try {                                                                               \
      body;                                                                             \
    } catch (const qmoe::Error& e) {                                                    \
      if (qmoe_fuzz::verbose()) __builtin_fprintf(stderr, "qmoe::Error: %s\n", e.what()); \
    } catch (const std::exception& e) {                                                 \
      if (!qmoe_fuzz::allow_std_exceptions()) {                                         \
        __builtin_fprintf(stderr, "FINDING: non-qmoe exception escaped: %s\n", e.what()); \
        std::abort();                                                                   \
      }                                                                                 \
    }                                                                                   \
  } while (0)
