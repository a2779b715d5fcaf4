// The reference backend: "prepack" keeps the raw layout as is, and run() is reference_forward.
#include <cstring>

#include "qmoe/backend.h"
#include "qmoe/error.h"
#include "qmoe/reference.h"

namespace qmoe {

namespace {

const LayoutTag kRawTag{"raw", 1, "any"};

class RawPacked final : public PackedExperts {
 public:
  RawPacked(const MoeSpec& spec, RawExperts raw) : PackedExperts(kRawTag, spec), raw_(std::move(raw)) {}
  size_t resident_bytes() const override { return raw_.nbytes(); }
  const RawExperts& raw() const { return raw_; }

  std::vector<NamedTensor> to_blobs() const override { return raw_to_blobs(raw_); }

 private:
  RawExperts raw_;
};

class ReferenceBackend final : public Backend {
 public:
  std::string name() const override { return "reference"; }

  std::unique_ptr<PackedExperts> prepack(const MoeSpec& spec, RawExperts raw) override {
    spec.validate();
    validate_raw(spec, raw);
    return std::make_unique<RawPacked>(spec, std::move(raw));
  }

  LayoutTag layout_for(const MoeSpec&) const override { return kRawTag; }

  std::unique_ptr<PackedExperts> from_blobs(const MoeSpec& spec, std::vector<NamedTensor> blobs) override {
    spec.validate();
    return std::make_unique<RawPacked>(spec, raw_from_blobs(spec, std::move(blobs), kRawTag.name));
  }

  void run(const PackedExperts& packed, const MoeInputs& inputs, Tensor& output) override {
    require_layout(packed, kRawTag, "reference backend");
    const auto& p = static_cast<const RawPacked&>(packed);
    Tensor y = reference_forward(p.spec(), p.raw(), inputs);
    if (output.dtype() != y.dtype() || output.shape() != y.shape())
      throw Error("output: expected " + std::string(dtype_name(y.dtype())) + " " + shape_str(y.shape()) + ", got " +
                  std::string(dtype_name(output.dtype())) + " " + shape_str(output.shape()));
    if (y.nbytes()) std::memcpy(output.data(), y.data(), y.nbytes());
  }
};

}  // namespace

std::unique_ptr<Backend> make_reference_backend() { return std::make_unique<ReferenceBackend>(); }

}  // namespace qmoe
