#include "qmoe/backend.h"

#include "qmoe/error.h"

namespace qmoe {

std::string LayoutTag::to_string() const {
  return name + " v" + std::to_string(version) + " (target " + target + ")";
}

void require_layout(const PackedExperts& packed, const LayoutTag& expected, std::string_view who) {
  if (packed.tag() != expected)
    throw Error(std::string(who) + ": weights are in layout " + packed.tag().to_string() + ", expected " +
                expected.to_string());
}

}  // namespace qmoe
