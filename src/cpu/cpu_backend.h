// The CPU backend's row chunking (cpu_backend.cpp), for tests and tools that need to see it.
//
// A run processes its T token rows in chunks of R rows; the run scratch (fp32 inputs, FC1
// activations, FC2 outputs, routes and the grouping order) is sized for one chunk and reused, so it
// is bounded by R * scratch_bytes_per_row(spec) whatever T is. Each token's output depends on that
// token's row only, and the kernels' arithmetic per token does not depend on which other tokens share
// a kernel call (cpu_kernels.h), so outputs are bitwise the same for every R (cpu_chunking_test.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "qmoe/backend.h"
#include "qmoe/spec.h"

namespace qmoe::cpu {

// What max_chunk_rows = 0 aims for: R = max(1, floor(kAutoChunkScratchBytes / bytes per row)).
inline constexpr int64_t kAutoChunkScratchBytes = int64_t(256) << 20;

// Scratch bytes per token row: 4 * (round64(H + 8) + k * (round64(I + 8) + H)) + 16 * k
// (fp32 input row, k FC1 activation rows, k FC2 output rows; a Route and an int64 order entry per route);
// compute "bf16" adds 2 * (round64(H + 8) + k * round64(I + 8)) for the bf16 copies of the first two;
// compute "int8" adds k * ((X + A) + 4 * (X / 16 + A / 16) + 16) for their int8 copies, one per route
// (codes, group sums, row scales) and each route's position (X = round64(H + 8), A = round64(I + 8));
// "int8x3" k * (D * ((X + A) + 4 * (X / 16 + A / 16)) + 16), D = 4 for 4-bit weights in blocks of 16 or 32
// (digit pairs), else 3.
int64_t scratch_bytes_per_row(const MoeSpec& spec, const std::string& compute = "exact");

// Rows per chunk for this spec: opt.max_chunk_rows, or the automatic choice when it is 0.
int64_t chunk_rows(const MoeSpec& spec, const CpuBackendOptions& opt);

// Bytes of run scratch `backend` holds now: the capacity of its buffers, which are kept across runs
// and only grow. Throws qmoe::Error unless `backend` came from make_cpu_backend.
size_t held_scratch_bytes(const Backend& backend);

}  // namespace qmoe::cpu
