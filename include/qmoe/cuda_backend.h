// The CUDA backend (src/cuda/): prepacks raw experts on the GPU into the "cuda-sm80" layout
// (docs/FORMAT-cuda.md) and runs the whole layer there: routing, grouping by expert, FC1 + bias +
// activation, FC2, and the weighted combine, all on the device and capturable in a CUDA graph.
// Prepack needs one expert's raw matrix of transient device memory; from the first prepack on, the
// backend also holds up to 32 MB of pinned host memory and a few idle copy threads for its uploads.
//
// This header is plain C++ (no CUDA types) so that src/core/layer.cpp and the CLI can include it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "qmoe/backend.h"

namespace qmoe {

// Number of CUDA devices usable by this process: 0 when there is no driver, no device, or the
// runtime fails in any way. Never throws.
int cuda_device_count();

// Which FC kernels a run uses. Both read the same packed weights.
//   automatic: the Hopper wgmma kernels (sm_90a builds on sm_90 GPUs) when experts see enough tokens
//              on average, or for some layers when a run routes enough slots (the crossovers measured
//              by bench/, docs/PERF-cuda.md), else the SM80-family kernels;
//   sm80:      always the SM80-family (mma.sync) kernels;
//   sm90:      the wgmma kernels whenever the GPU, the build and the layer allow them (block size 16
//              is not served by them), whatever the batch.
enum class CudaGemm { automatic, sm80, sm90 };

struct CudaBackendOptions {
  int device = 0;       // CUDA device ordinal
  bool prepack = true;  // accepted for API symmetry; the CUDA backend always runs from its packed layout
  CudaGemm gemm = CudaGemm::automatic;
};

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& opt = {});

// Device-pointer entry point (the capturable core of Backend::run). All pointers are device memory;
// `input` is [rows, H] and `router_probs` / `router_weights` [rows, E] in the spec's activation dtype,
// `output` [rows, H] in the same dtype. `stream` is a cudaStream_t (void* keeps CUDA out of this
// header). Performs no allocation and no host synchronization once workspace for `rows` has been
// reserved with cuda_reserve_workspace(); throws qmoe::Error otherwise. Launch errors are reported
// through cudaGetLastError after the fact, as usual for asynchronous work.
struct CudaRunArgs {
  const void* input = nullptr;
  const void* router_probs = nullptr;
  const void* router_weights = nullptr;  // optional
  void* output = nullptr;
  int64_t rows = 0;
  void* stream = nullptr;
};
void cuda_run_device(Backend& cuda_backend, const PackedExperts& packed, const CudaRunArgs& args);
// Grows the backend's device workspace so that runs of up to `rows` tokens need no allocation;
// returns its size in bytes. Call before capturing cuda_run_device() in a CUDA graph.
size_t cuda_reserve_workspace(Backend& cuda_backend, const PackedExperts& packed, int64_t rows);

}  // namespace qmoe
