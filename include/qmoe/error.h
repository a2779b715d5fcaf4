// The one exception type qmoe throws. Every message names what was wrong (the tensor, attribute or
// file), the expected value and the actual one, so a user can fix the input without reading code.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace qmoe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// "[2, 3, 4]"
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace qmoe
