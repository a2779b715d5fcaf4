// Backend selection and MoeLayer: the only place that knows which backends a build has.
#include "qmoe/layer.h"

#include "qmoe/error.h"
#ifdef QMOE_HAVE_CUDA
#include "qmoe/cuda_backend.h"
#endif

namespace qmoe {

std::vector<std::string> available_backends() {
  std::vector<std::string> names;
#ifdef QMOE_HAVE_CUDA
  if (cuda_device_count() > 0) names.push_back("cuda");
#endif
  names.push_back("cpu");
  names.push_back("reference");
  return names;
}

std::unique_ptr<Backend> make_backend(const std::string& name, const LayerOptions& opt) {
  if (opt.cuda_gemm != "auto" && opt.cuda_gemm != "sm80" && opt.cuda_gemm != "sm90")
    throw Error("cuda_gemm: expected auto, sm80 or sm90, got '" + opt.cuda_gemm + "'");
  if (opt.cpu_compute != "exact" && opt.cpu_compute != "bf16" && opt.cpu_compute != "int8" && opt.cpu_compute != "int8x3")
    throw Error("cpu_compute: expected exact, bf16, int8 or int8x3, got '" + opt.cpu_compute + "'");
  const std::string chosen = name == "auto" ? available_backends().front() : name;
  if (chosen == "reference") return make_reference_backend();
  if (chosen == "cpu") return make_cpu_backend(CpuBackendOptions{opt.threads, opt.prepack, "auto", opt.chunk_rows, opt.cpu_compute});
#ifdef QMOE_HAVE_CUDA
  if (chosen == "cuda") {
    if (cuda_device_count() == 0) throw Error("backend 'cuda': no CUDA device is visible on this machine");
    CudaBackendOptions co{0, opt.prepack};
    co.gemm = opt.cuda_gemm == "sm80" ? CudaGemm::sm80 : opt.cuda_gemm == "sm90" ? CudaGemm::sm90 : CudaGemm::automatic;
    return make_cuda_backend(co);
  }
#endif
  std::string list;
  for (const auto& n : available_backends()) list += (list.empty() ? "" : ", ") + n;
  throw Error("backend: expected auto or one of " + list + ", got '" + name + "'");
}

MoeLayer::MoeLayer(const MoeSpec& spec, RawExperts raw, const LayerOptions& opt)
    : backend_(make_backend(opt.backend, opt)) {
  packed_ = backend_->prepack(spec, std::move(raw));
}

MoeLayer::MoeLayer(std::unique_ptr<Backend> backend, std::unique_ptr<PackedExperts> packed)
    : backend_(std::move(backend)), packed_(std::move(packed)) {
  if (!backend_ || !packed_) throw Error("MoeLayer: backend and packed weights must both be given");
  require_layout(*packed_, backend_->layout_for(packed_->spec()), "MoeLayer (" + backend_->name() + " backend)");
}

Tensor MoeLayer::run(const MoeInputs& inputs) {
  validate_inputs(spec(), inputs);
  Tensor out(inputs.input.dtype, inputs.input.shape);
  backend_->run(*packed_, inputs, out);
  return out;
}

void MoeLayer::run(const MoeInputs& inputs, Tensor& output) { backend_->run(*packed_, inputs, output); }

}  // namespace qmoe
