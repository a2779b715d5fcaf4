#include "qmoe/backend.h"

#include <optional>

#include "qmoe/error.h"

namespace qmoe {

std::string LayoutTag::to_string() const {
  return name + " v" + std::to_string(version) + " (target " + target + ")";
}

void require_layout(const PackedExperts& packed, const LayoutTag& expected, std::string_view who) {
  if (packed.tag() != expected)
    throw Error(std::string(who) + ": weights are in layout " + packed.tag().to_string() + ", expected " +
                expected.to_string());
}

std::vector<NamedTensor> raw_to_blobs(const RawExperts& raw) {
  std::vector<NamedTensor> out;
  auto add = [&](const std::string& p, const RawMatrix& m) {
    out.push_back({p + ".weights", m.weights});
    out.push_back({p + ".scales", m.scales});
    if (m.zero_points) out.push_back({p + ".zero_points", *m.zero_points});
    if (m.bias) out.push_back({p + ".bias", *m.bias});
  };
  add("fc1", raw.fc1);
  add("fc2", raw.fc2);
  if (raw.fc3) add("fc3", *raw.fc3);
  return out;
}

RawExperts raw_from_blobs(const MoeSpec& spec, std::vector<NamedTensor> blobs, std::string_view layout) {
  std::vector<bool> used(blobs.size(), false);
  auto find = [&](const std::string& name) -> std::optional<Tensor> {
    for (size_t i = 0; i < blobs.size(); ++i)
      if (blobs[i].name == name) {
        used[i] = true;
        return blobs[i].tensor;
      }
    return std::nullopt;
  };
  // Each blob's dtype and shape (hence size) is checked under its blob name; validate_raw below then
  // checks presence against the spec's zero-point and bias flags.
  auto check = [&](const std::string& name, const Tensor& t, DType dt, Shape shape) {
    Shape alt = shape;
    alt.push_back(1);  // row-wise scales may be [E, N, 1]
    const bool alt_ok = name.ends_with(".scales") && !spec.block_wise() && t.shape() == alt;
    if (t.dtype() != dt || (t.shape() != shape && !alt_ok))
      throw Error("packed file: blob " + name + ": expected " + std::string(dtype_name(dt)) + " " + shape_str(shape) +
                  ", got " + std::string(dtype_name(t.dtype())) + " " + shape_str(t.shape()));
  };
  auto matrix = [&](const std::string& p, Fc fc) {
    RawMatrix m;
    auto w = find(p + ".weights"), sc = find(p + ".scales");
    if (!w || !sc) throw Error("packed file: blob " + p + (w ? ".scales" : ".weights") + " is missing");
    check(p + ".weights", *w, DType::u8, raw_weight_shape(spec, fc));
    check(p + ".scales", *sc, spec.scale_dtype, raw_scale_shape(spec, fc));
    m.weights = *w;
    m.scales = *sc;
    m.zero_points = find(p + ".zero_points");
    m.bias = find(p + ".bias");
    if (m.zero_points) check(p + ".zero_points", *m.zero_points, DType::u8, raw_zero_point_shape(spec, fc));
    if (m.bias) check(p + ".bias", *m.bias, spec.act_dtype, raw_bias_shape(spec, fc));
    return m;
  };
  RawExperts raw;
  raw.fc1 = matrix("fc1", Fc::fc1);
  raw.fc2 = matrix("fc2", Fc::fc2);
  if (spec.has_fc3()) raw.fc3 = matrix("fc3", Fc::fc3);
  for (size_t i = 0; i < blobs.size(); ++i)
    if (!used[i]) throw Error("packed file: unexpected blob " + blobs[i].name + " for layout " + std::string(layout));
  validate_raw(spec, raw);
  return raw;
}

}  // namespace qmoe
