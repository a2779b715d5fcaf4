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

  std::vector<NamedTensor> to_blobs() const override {
    std::vector<NamedTensor> out;
    auto add = [&](const std::string& p, const RawMatrix& m) {
      out.push_back({p + ".weights", m.weights});
      out.push_back({p + ".scales", m.scales});
      if (m.zero_points) out.push_back({p + ".zero_points", *m.zero_points});
      if (m.bias) out.push_back({p + ".bias", *m.bias});
    };
    add("fc1", raw_.fc1);
    add("fc2", raw_.fc2);
    if (raw_.fc3) add("fc3", *raw_.fc3);
    return out;
  }

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
    RawExperts raw;
    auto find = [&](const std::string& name) -> std::optional<Tensor> {
      for (auto& b : blobs)
        if (b.name == name) return b.tensor;
      return std::nullopt;
    };
    auto matrix = [&](const std::string& p) {
      RawMatrix m;
      auto w = find(p + ".weights"), s = find(p + ".scales");
      if (!w || !s) throw Error("packed file: blob " + p + (w ? ".scales" : ".weights") + " is missing");
      m.weights = *w;
      m.scales = *s;
      m.zero_points = find(p + ".zero_points");
      m.bias = find(p + ".bias");
      return m;
    };
    raw.fc1 = matrix("fc1");
    raw.fc2 = matrix("fc2");
    if (spec.has_fc3()) raw.fc3 = matrix("fc3");
    return prepack(spec, std::move(raw));  // validates every shape against the spec
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
