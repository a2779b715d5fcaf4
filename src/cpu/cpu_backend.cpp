// Placeholder until the SIMD CPU backend lands: the CPU backend runs the scalar reference.
#include "qmoe/backend.h"

namespace qmoe {

std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions&) { return make_reference_backend(); }

}  // namespace qmoe
