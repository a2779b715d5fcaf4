// Expert-parallel QMoE over NCCL (issue 8, docs/MULTIGPU.md): G ranks, one GPU each, each holding a
// contiguous range of the layer's experts packed on its GPU.
//
// The caller owns the NCCL communicator and the CUDA stream (as real engines do): the layer reads its
// rank, world size and device from the communicator and enqueues all work, NCCL calls included, on
// the given stream. One process per GPU is the normal mode; tools/ep_launch runs G of them for tests
// and benchmarks, and ep_comm_init_from_file() makes a communicator when the caller has none.
//
// Contract of run_device(): collective (every rank calls it with the same row count and the same
// scheme table/options); input, router_probs (and router_weights) are replicated, i.e. the same
// [rows, H] / [rows, E] device tensors on every rank; the output [rows, H] is replicated too. The
// result equals the single-GPU CudaBackend output within the tolerance stated in docs/MULTIGPU.md.
//
// Plain C++ header: ncclComm_t and cudaStream_t travel as void*, so this header needs neither nccl.h
// nor the CUDA runtime. Available when qmoe is built with QMOE_CUDA and NCCL (QMOE_HAVE_NCCL).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qmoe/expert_parallel.h"
#include "qmoe/raw_experts.h"
#include "qmoe/spec.h"

namespace qmoe {

struct EpOptions {
  // allreduce / alltoall force a scheme; automatic uses tune()'s measurements (allreduce untuned).
  EpScheme scheme = EpScheme::automatic;
};

struct EpRunArgs {
  const void* input = nullptr;           // [rows, H], spec.act_dtype, device memory
  const void* router_probs = nullptr;    // [rows, E]
  const void* router_weights = nullptr;  // optional [rows, E]
  void* output = nullptr;                // [rows, H], fully written on every rank
  int64_t rows = 0;
};

class ExpertParallelLayer {
 public:
  // Packs this rank's experts (expert_range_for_rank) on the communicator's device. `raw` holds all E
  // experts; only this rank's are read (slice_experts: no copy), so with a memory-mapped raw file
  // (read_raw_safetensors) the other experts' bytes are never touched. Not collective. Throws
  // qmoe::Error for an invalid spec or raw tensors, E < world, world > kEpMaxWorld, or a communicator
  // that NCCL does not accept.
  ExpertParallelLayer(const MoeSpec& spec, const RawExperts& raw, void* nccl_comm, void* cuda_stream,
                      const EpOptions& opt = {});
  ~ExpertParallelLayer();
  ExpertParallelLayer(const ExpertParallelLayer&) = delete;
  ExpertParallelLayer& operator=(const ExpertParallelLayer&) = delete;

  // Opens a raw QMoE safetensors file (memory-mapped) and packs this rank's experts from it.
  static std::unique_ptr<ExpertParallelLayer> from_raw_safetensors(const std::string& path, void* nccl_comm,
                                                                   void* cuda_stream, const EpOptions& opt = {});

  // Grows device buffers so that runs of up to `rows` tokens allocate nothing (both schemes). Not
  // collective. Call before capturing an allreduce run in a CUDA graph.
  void reserve(int64_t rows);

  // Runs the layer on the stream (collective; see the file comment). The allreduce scheme never
  // synchronizes the host and is capturable in a CUDA graph; the alltoall scheme reads the exchange
  // sizes on the host once per run (a stream synchronization), so it is not.
  void run_device(const EpRunArgs& args);
  void run_device(const EpRunArgs& args, EpScheme scheme);  // a forced scheme (not automatic)

  // The scheme run_device() takes for `rows` tokens.
  EpScheme scheme_for(int64_t rows) const;
  // Collective: times both schemes at each row count on random inputs (`iters` runs after 3 warm-up
  // runs, the mean), takes the slower rank's time of each, and records the faster scheme per row count
  // (identical on every rank). Later automatic runs use the nearest tuned row count (EpSchemeTable).
  struct TuneResult {
    int64_t rows;
    double allreduce_us, alltoall_us;
  };
  std::vector<TuneResult> tune(const std::vector<int64_t>& rows, int iters = 20);
  const EpSchemeTable& scheme_table() const;

  int rank() const;
  int world() const;
  int device() const;
  const MoeSpec& spec() const;     // the whole layer
  ExpertRange experts() const;     // this rank's experts
  size_t weight_bytes() const;     // packed bytes resident on this rank's GPU (weights, scales, biases)
  size_t workspace_bytes() const;  // device buffers of the exchange (not the backend's own workspace)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A communicator of qmoe's own making, for programs without one (tests, benchmarks): rank 0 calls
// ncclGetUniqueId and writes it to `id_file` (atomically: a temporary file, then rename); the others
// wait up to `timeout_s` for the file. Selects `device` first. Returns the ncclComm_t as void*.
void* ep_comm_init_from_file(const std::string& id_file, int rank, int world, int device, double timeout_s = 120);
void ep_comm_destroy(void* nccl_comm);

// What tools/ep_launch gives each process: QMOE_EP_RANK, QMOE_EP_WORLD, QMOE_EP_ID_FILE. nullopt when
// the variables are absent (not started by the launcher); throws qmoe::Error when they are malformed.
struct EpLaunchEnv {
  int rank = 0, world = 1;
  std::string id_file;
};
std::optional<EpLaunchEnv> ep_launch_env();

}  // namespace qmoe
