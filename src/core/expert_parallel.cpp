// Expert parallelism, host side: expert ranges, token slices, zero-copy expert slices, scheme table.
// See include/qmoe/expert_parallel.h; the GPU side is src/cuda/cuda_ep.cpp.
#include "qmoe/expert_parallel.h"

#include <algorithm>
#include <memory>

#include "core/str_builder.h"
#include "qmoe/error.h"

namespace qmoe {

namespace {

void check_world(int rank, int world) {
  if (world < 1 || world > kEpMaxWorld)
    throw Error("expert parallel: world size " + std::to_string(world) + " is outside [1, " +
                std::to_string(kEpMaxWorld) + "]");
  if (rank < 0 || rank >= world)
    throw Error("expert parallel: rank " + std::to_string(rank) + " is outside [0, " + std::to_string(world) + ")");
}

// Experts [first, first + count) of an expert-major tensor [E, ...], sharing the parent's bytes.
Tensor slice_dim0(const Tensor& t, int64_t E, const ExpertRange& r) {
  const size_t per = t.nbytes() / size_t(E);
  Shape shape = t.shape();
  shape[0] = r.count;
  auto* base = static_cast<uint8_t*>(const_cast<void*>(t.data()));
  return Tensor::wrap(t.dtype(), shape, base + size_t(r.first) * per, std::make_shared<Tensor>(t));
}

RawMatrix slice_matrix(const RawMatrix& m, int64_t E, const ExpertRange& r) {
  RawMatrix out;
  out.weights = slice_dim0(m.weights, E, r);
  out.scales = slice_dim0(m.scales, E, r);
  if (m.zero_points) out.zero_points = slice_dim0(*m.zero_points, E, r);
  if (m.bias) out.bias = slice_dim0(*m.bias, E, r);
  return out;
}

}  // namespace

ExpertRange expert_range_for_rank(int64_t num_experts, int rank, int world) {
  check_world(rank, world);
  if (num_experts < world)
    throw Error("expert parallel: " + std::to_string(num_experts) + " experts cannot be split over " +
                std::to_string(world) + " ranks (each rank must hold at least one expert)");
  const int64_t base = num_experts / world, rem = num_experts % world;
  ExpertRange r;
  r.first = rank * base + std::min<int64_t>(rank, rem);
  r.count = base + (rank < rem ? 1 : 0);
  return r;
}

TokenSlice token_slice_for_rank(int64_t rows, int rank, int world) {
  check_world(rank, world);
  if (rows < 0) throw Error("expert parallel: negative row count " + std::to_string(rows));
  TokenSlice s;
  s.stride = (rows + world - 1) / world;
  s.first = std::min<int64_t>(rows, rank * s.stride);
  s.count = std::min<int64_t>(rows, s.first + s.stride) - s.first;
  return s;
}

MoeSpec local_spec(const MoeSpec& spec, const ExpertRange& range) {
  if (range.first < 0 || range.count < 1 || range.end() > spec.num_experts)
    throw Error("expert parallel: expert range [" + std::to_string(range.first) + ", " + std::to_string(range.end()) +
                ") is not a non-empty part of [0, " + std::to_string(spec.num_experts) + ")");
  // The local spec describes the weights a rank holds; routing keeps using the global spec (the CUDA
  // slice carries it). k may exceed the local count (Mixtral, E = 8, k = 2 on 8 ranks), which
  // validate() refuses, so k is clipped here, and the sparse mixer flag (which needs k = 2) dropped
  // when that clips it.
  MoeSpec s = spec;
  s.num_experts = range.count;
  s.k = std::min(spec.k, range.count);
  if (s.use_sparse_mixer && s.k != 2) s.use_sparse_mixer = false;
  return s;
}

RawExperts slice_experts(const MoeSpec& spec, const RawExperts& raw, const ExpertRange& range) {
  spec.validate();
  validate_raw(spec, raw);
  const MoeSpec ls = local_spec(spec, range);
  RawExperts out;
  out.fc1 = slice_matrix(raw.fc1, spec.num_experts, range);
  out.fc2 = slice_matrix(raw.fc2, spec.num_experts, range);
  if (raw.fc3) out.fc3 = slice_matrix(*raw.fc3, spec.num_experts, range);
  validate_raw(ls, out);
  return out;
}

std::string_view ep_scheme_name(EpScheme s) {
  switch (s) {
    case EpScheme::allreduce: return "allreduce";
    case EpScheme::alltoall: return "alltoall";
    case EpScheme::automatic: return "auto";
  }
  return "?";
}

EpScheme parse_ep_scheme(std::string_view name) {
  if (name == "allreduce") return EpScheme::allreduce;
  if (name == "alltoall") return EpScheme::alltoall;
  if (name == "auto") return EpScheme::automatic;
  throw Error("expert parallel: unknown scheme '" + std::string(name) + "' (expected allreduce, alltoall or auto)");
}

void EpSchemeTable::set(int64_t rows, EpScheme scheme) {
  if (rows < 1) throw Error("EpSchemeTable: rows must be >= 1, got " + std::to_string(rows));
  if (scheme == EpScheme::automatic) throw Error("EpSchemeTable: a measured entry must name a scheme, not auto");
  auto it = std::lower_bound(entries_.begin(), entries_.end(), rows,
                             [](const Entry& e, int64_t r) { return e.rows < r; });
  if (it != entries_.end() && it->rows == rows) it->scheme = scheme;
  else entries_.insert(it, Entry{rows, scheme});
}

EpScheme EpSchemeTable::choose(int64_t rows, EpScheme fallback) const {
  if (entries_.empty()) return fallback;
  // Nearest in log2: compare rows / a against b / rows as a * b against rows^2 (exact in doubles for
  // the sizes in question; ties keep the smaller entry because it is visited first).
  const double r = double(std::max<int64_t>(rows, 1));
  const Entry* best = &entries_.front();
  double best_d = 0;
  for (const Entry& e : entries_) {
    const double d = e.rows > r ? double(e.rows) / r : r / double(e.rows);
    if (&e == &entries_.front() || d < best_d) best = &e, best_d = d;
  }
  return best->scheme;
}

std::string EpSchemeTable::to_string() const {
  StrBuilder os;
  for (size_t i = 0; i < entries_.size(); ++i)
    os << (i ? " " : "") << entries_[i].rows << ":" << ep_scheme_name(entries_[i].scheme);
  return os.str();
}

}  // namespace qmoe
