// Expert parallelism, the host-side facts (plain C++, no CUDA, no NCCL): which rank holds which
// experts, which tokens a rank dispatches in the all-to-all scheme, slicing raw experts to a rank's
// range without copying, and the per-batch-size choice between the two exchange schemes.
//
// The GPU side (include/qmoe/cuda_ep.h, src/cuda/cuda_ep.cpp) uses exactly these functions, so
// everything decided here is unit-tested without a GPU (tests/cpp/expert_parallel_test.cpp).
// docs/MULTIGPU.md describes the whole design.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qmoe/raw_experts.h"
#include "qmoe/spec.h"

// Usable from CUDA device code too (owner_of_expert runs inside the dispatch kernel): one definition.
#if defined(__CUDACC__)
#define QMOE_EP_HD __host__ __device__
#else
#define QMOE_EP_HD
#endif

namespace qmoe {

// Most ranks an expert-parallel layer supports: a token's destination ranks are one 32-bit mask.
inline constexpr int kEpMaxWorld = 32;

// Experts [first, first + count) of the global numbering, held by one rank.
struct ExpertRange {
  int64_t first = 0;
  int64_t count = 0;
  int64_t end() const { return first + count; }
  bool contains(int64_t e) const { return e >= first && e < first + count; }
  bool operator==(const ExpertRange&) const = default;
};

// Contiguous, balanced split of E experts over `world` ranks: the first E % world ranks hold
// ceil(E / world) experts, the others floor(E / world). Throws qmoe::Error when world is outside
// [1, kEpMaxWorld], rank outside [0, world), or E < world (a rank without experts is refused: it
// would hold no weights and still pay for every exchange; use fewer ranks).
ExpertRange expert_range_for_rank(int64_t num_experts, int rank, int world);

// The rank holding expert e under expert_range_for_rank's split (no checks: 0 <= e < E, E >= world).
QMOE_EP_HD inline int owner_of_expert(int64_t num_experts, int world, int64_t e) {
  const int64_t base = num_experts / world, rem = num_experts % world;
  const int64_t big = rem * (base + 1);  // experts held by the ranks with one extra
  return e < big ? int(e / (base + 1)) : int(rem + (e - big) / base);
}

// Tokens [first, first + count) a rank routes, dispatches and combines in the all-to-all scheme:
// slices of S = ceil(T / world) rows, the last ones shorter or empty. Every rank's slice is padded to
// S rows for the final all-gather, so the output is replicated on all ranks.
struct TokenSlice {
  int64_t first = 0;
  int64_t count = 0;
  int64_t stride = 0;  // S: rows per rank in the all-gather
};
TokenSlice token_slice_for_rank(int64_t rows, int rank, int world);

// The spec of a rank's weights: the same layer with num_experts = range.count, k clipped to that count
// (and the sparse-mixer flag dropped if that changes k from 2), so that it validates. A backend packs
// it like any layer; routing keeps using the global spec (the CUDA slice carries both). Throws unless
// the range is a non-empty part of [0, E).
MoeSpec local_spec(const MoeSpec& spec, const ExpertRange& range);

// Views of experts [range.first, range.end()) of every raw tensor (weights, scales, zero points,
// biases), without copying: each view shares ownership of its parent's bytes. When `raw` comes from
// read_raw_safetensors (memory-mapped), packing the slice reads only these experts' pages of the file.
// Validates raw against spec first; the result passes validate_raw(local_spec(spec, range), ...).
RawExperts slice_experts(const MoeSpec& spec, const RawExperts& raw, const ExpertRange& range);

// How partial results meet (docs/MULTIGPU.md):
//  allreduce: every rank computes its experts for all T tokens into an fp32 [T, H] partial and an
//             NCCL all-reduce sums them (ORT ShardedMoE). No host synchronization; CUDA-graph capturable.
//  alltoall:  every rank routes its own slice of T / world tokens, sends each token row once to every
//             rank holding one of its experts, the owners compute and send fp32 partial rows back, the
//             source sums them and an all-gather replicates the output. The exchange sizes are read
//             on the host (one stream synchronization per run), so it is not capturable.
//  automatic: the table from a measured tune() (ExpertParallelLayer), else allreduce.
enum class EpScheme : uint8_t { allreduce, alltoall, automatic };
std::string_view ep_scheme_name(EpScheme s);
// "allreduce", "alltoall", "auto"; throws qmoe::Error naming the accepted values otherwise.
EpScheme parse_ep_scheme(std::string_view name);

// Measured choice per batch size: for a run of `rows` tokens, the scheme measured fastest at the
// tuned row count nearest in log2 (ties: the smaller count). Empty table: `fallback`.
class EpSchemeTable {
 public:
  // Records (or replaces) the scheme measured fastest at `rows`; scheme must not be automatic.
  void set(int64_t rows, EpScheme scheme);
  EpScheme choose(int64_t rows, EpScheme fallback = EpScheme::allreduce) const;
  bool empty() const { return entries_.empty(); }
  // "64:allreduce 2048:alltoall"
  std::string to_string() const;

 private:
  struct Entry {
    int64_t rows;
    EpScheme scheme;
  };
  std::vector<Entry> entries_;  // sorted by rows
};

}  // namespace qmoe
