// A minimal string builder with ostream-like `<<`, used for every message and report the library
// formats. Why not std::ostringstream: iostreams depend on libstdc++'s process-wide locale facets,
// and a Python process that imported a NumPy 2.5 wheel first crashed inside ostringstream in our
// extension (seen on Ubuntu 24.04 / Python 3.12; `repr(qmoe.Spec())` segfaulted). Plain appends and
// snprintf share no such state.
#pragma once

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace qmoe {

class StrBuilder {
 public:
  StrBuilder& operator<<(std::string_view s) {
    s_.append(s);
    return *this;
  }
  StrBuilder& operator<<(const char* s) { return *this << std::string_view(s); }
  StrBuilder& operator<<(const std::string& s) { return *this << std::string_view(s); }
  StrBuilder& operator<<(char c) {
    s_.push_back(c);
    return *this;
  }
  // Integers and bools print like an ostream's defaults (bools as 0/1); floating point as "%g" with
  // `precision` significant digits (6, the ostream default, unless set).
  template <class T>
    requires std::is_arithmetic_v<T>
  StrBuilder& operator<<(T v) {
    if constexpr (std::is_floating_point_v<T>) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.*g", precision_, double(v));
      s_.append(buf);
    } else if constexpr (std::is_same_v<T, bool>) {
      s_.push_back(v ? '1' : '0');
    } else {
      s_.append(std::to_string(v));
    }
    return *this;
  }
  void precision(int p) { precision_ = p; }
  bool empty() const { return s_.empty(); }
  const std::string& str() const { return s_; }

 private:
  std::string s_;
  int precision_ = 6;
};

}  // namespace qmoe
