// MoeLayer: what users hold. A spec, weights packed for one backend, and run().
#pragma once

#include <memory>
#include <string>

#include "qmoe/backend.h"

namespace qmoe {

struct LayerOptions {
  std::string backend = "auto";  // "auto" (best present), "cpu", "cuda", "reference"
  bool prepack = true;           // false: run straight from raw bytes (slower, still correct)
  int threads = 0;               // CPU threads; 0 = all cores
  int64_t chunk_rows = 0;        // CPU: tokens per chunk of a run (0 = as many as fit 256 MiB of scratch)
  std::string cuda_gemm = "auto";  // CUDA: FC kernels, "auto", "sm80" or "sm90" (see CudaGemm)
  // CPU: kernel arithmetic, "exact" (default), "bf16", "int8" or "int8x3" (CpuBackendOptions::compute).
  // Checked whatever the backend; only the cpu backend uses it.
  std::string cpu_compute = "exact";
};

// Backend by name; throws qmoe::Error listing the names available in this build.
std::unique_ptr<Backend> make_backend(const std::string& name, const LayerOptions& opt = {});
// Names of the backends compiled in and usable on this machine, best first.
std::vector<std::string> available_backends();

class MoeLayer {
 public:
  // Validates and prepacks; raw is consumed (buffers qmoe owns are freed once packed).
  MoeLayer(const MoeSpec& spec, RawExperts raw, const LayerOptions& opt = {});
  // Adopts weights already packed for `backend` (e.g. from load_packed); checks the layout matches.
  MoeLayer(std::unique_ptr<Backend> backend, std::unique_ptr<PackedExperts> packed);

  // Runs the layer; the output has the input's shape and dtype.
  Tensor run(const MoeInputs& inputs);
  void run(const MoeInputs& inputs, Tensor& output);

  const MoeSpec& spec() const { return packed_->spec(); }
  const PackedExperts& packed() const { return *packed_; }
  Backend& backend() { return *backend_; }

 private:
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<PackedExperts> packed_;
};

}  // namespace qmoe
