// qmoe's raw QMoE safetensors file: the ONNX input names for the tensors, the ONNX attribute names
// for the spec in `__metadata__`. One file holds everything export-onnx and the layer loader need,
// and any safetensors tool can inspect it.
#include <charconv>
#include <cmath>
#include <cstdio>
#include <set>

#include "qmoe/checkpoint.h"
#include "qmoe/error.h"

namespace qmoe {

namespace {

constexpr const char* kFormat = "qmoe.raw";
constexpr const char* kVersion = "1";

// Metadata keys that describe the spec; everything else is carried through as source facts.
const std::set<std::string>& spec_keys() {
  static const std::set<std::string> k = {
      "format", "format_version", "num_experts", "hidden_size", "inter_size", "k", "expert_weight_bits",
      "block_size", "symmetric", "activation_type", "swiglu_fusion", "swiglu_limit", "activation_alpha",
      "activation_beta", "normalize_routing_weights", "use_sparse_mixer", "act_dtype", "scale_dtype"};
  return k;
}

// Shortest text that reads back as the same float ("inf" for the unclamped SwiGLU limit).
std::string float_text(float v) {
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", double(v));
  return buf;
}

struct Meta {
  const std::map<std::string, std::string>& m;
  const std::string& path;

  const std::string& str(const std::string& key) const {
    const auto it = m.find(key);
    if (it == m.end()) throw Error(path + ": __metadata__ has no '" + key + "' (not a qmoe raw file?)");
    return it->second;
  }
  // Sizes are bounded to [0, 2^31] here: MoeSpec::validate() has no upper bound, and shape rules
  // such as fc1_rows() = 2 * I would overflow int64 for a forged 2^62 before any tensor is compared.
  int64_t integer(const std::string& key) const {
    const std::string& s = str(key);
    int64_t v = 0;
    const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    if (r.ec != std::errc() || r.ptr != s.data() + s.size())
      throw Error(path + ": __metadata__['" + key + "'] = '" + s + "' is not an integer");
    if (v < 0 || v > (int64_t(1) << 31))
      throw Error(path + ": __metadata__['" + key + "'] = " + s + " is outside [0, 2^31]");
    return v;
  }
  bool flag(const std::string& key) const {
    const std::string& s = str(key);
    if (s != "0" && s != "1") throw Error(path + ": __metadata__['" + key + "'] = '" + s + "': expected 0 or 1");
    return s == "1";
  }
  float real(const std::string& key) const {
    const std::string& s = str(key);
    if (s == "inf") return std::numeric_limits<float>::infinity();
    if (s == "-inf") return -std::numeric_limits<float>::infinity();
    float v = 0;
    const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    if (r.ec != std::errc() || r.ptr != s.data() + s.size())
      throw Error(path + ": __metadata__['" + key + "'] = '" + s + "' is not a number");
    return v;
  }
};

const char* fc_prefix(Fc fc) { return fc == Fc::fc1 ? "fc1" : fc == Fc::fc2 ? "fc2" : "fc3"; }

}  // namespace

void write_raw_safetensors(const std::string& path, const RawLayer& layer) {
  const MoeSpec& s = layer.spec;
  s.validate();
  validate_raw(s, layer.raw);
  std::map<std::string, std::string> meta;
  for (const auto& [k, v] : layer.metadata)
    if (!spec_keys().count(k)) meta[k] = v;  // the spec's own keys always come from the spec
  meta["format"] = kFormat;
  meta["format_version"] = kVersion;
  meta["num_experts"] = std::to_string(s.num_experts);
  meta["hidden_size"] = std::to_string(s.hidden);
  meta["inter_size"] = std::to_string(s.inter);
  meta["k"] = std::to_string(s.k);
  meta["expert_weight_bits"] = std::to_string(s.bits);
  meta["block_size"] = std::to_string(s.block_size);
  meta["symmetric"] = s.fc1_zero_points ? "0" : "1";
  meta["activation_type"] = std::string(activation_name(s.activation));
  meta["swiglu_fusion"] = std::to_string(int(s.swiglu_fusion));
  meta["swiglu_limit"] = float_text(s.swiglu_limit);
  meta["activation_alpha"] = float_text(s.activation_alpha);
  meta["activation_beta"] = float_text(s.activation_beta);
  meta["normalize_routing_weights"] = s.normalize_routing_weights ? "1" : "0";
  meta["use_sparse_mixer"] = s.use_sparse_mixer ? "1" : "0";
  meta["act_dtype"] = std::string(dtype_name(s.act_dtype));
  meta["scale_dtype"] = std::string(dtype_name(s.scale_dtype));

  std::vector<NamedView> tensors;
  auto add = [&](Fc fc, const RawMatrix& m) {
    const std::string p = fc_prefix(fc);
    tensors.push_back({p + "_experts_weights", m.weights.view()});
    tensors.push_back({p + "_scales", m.scales.view()});
    if (m.zero_points) tensors.push_back({p + "_zero_points", m.zero_points->view()});
    if (m.bias) tensors.push_back({p + "_experts_bias", m.bias->view()});
  };
  add(Fc::fc1, layer.raw.fc1);
  add(Fc::fc2, layer.raw.fc2);
  if (layer.raw.fc3) add(Fc::fc3, *layer.raw.fc3);
  if (layer.router_weight) {
    if (layer.router_weight->shape() != Shape{s.num_experts, s.hidden})
      throw Error(path + ": router_weight: expected shape " + shape_str({s.num_experts, s.hidden}) + ", got " +
                  shape_str(layer.router_weight->shape()));
    tensors.push_back({"router_weight", layer.router_weight->view()});
  }
  if (layer.router_bias) {
    if (layer.router_bias->shape() != Shape{s.num_experts})
      throw Error(path + ": router_bias: expected shape [" + std::to_string(s.num_experts) + "], got " +
                  shape_str(layer.router_bias->shape()));
    tensors.push_back({"router_bias", layer.router_bias->view()});
  }
  write_safetensors(path, tensors, meta);
}

RawLayer read_raw_safetensors(const std::string& path) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  const Meta m{f.metadata(), path};
  if (m.str("format") != kFormat)
    throw Error(path + ": __metadata__ format is '" + m.str("format") + "', expected '" + kFormat + "'");
  if (m.str("format_version") != kVersion)
    throw Error(path + ": qmoe raw format version " + m.str("format_version") + " is not supported (this qmoe reads " +
                kVersion + ")");
  RawLayer out;
  MoeSpec& s = out.spec;
  s.num_experts = m.integer("num_experts");
  s.hidden = m.integer("hidden_size");
  s.inter = m.integer("inter_size");
  s.k = m.integer("k");
  const int64_t bits = m.integer("expert_weight_bits");
  if (bits != 2 && bits != 4 && bits != 8) throw Error(path + ": expert_weight_bits: expected 2, 4 or 8, got " + std::to_string(bits));
  s.bits = int(bits);
  s.block_size = m.integer("block_size");
  s.activation = parse_activation(m.str("activation_type"));
  const int64_t fusion = m.integer("swiglu_fusion");
  if (fusion < 0 || fusion > 2) throw Error(path + ": swiglu_fusion: expected 0, 1 or 2, got " + std::to_string(fusion));
  s.swiglu_fusion = SwigluFusion(fusion);
  s.swiglu_limit = m.real("swiglu_limit");
  s.activation_alpha = m.real("activation_alpha");
  s.activation_beta = m.real("activation_beta");
  s.normalize_routing_weights = m.flag("normalize_routing_weights");
  s.use_sparse_mixer = m.flag("use_sparse_mixer");
  s.act_dtype = parse_dtype(m.str("act_dtype"));
  s.scale_dtype = parse_dtype(m.str("scale_dtype"));
  const bool symmetric = m.flag("symmetric");

  std::set<std::string> known;
  auto get = [&](const std::string& name) -> std::optional<Tensor> {
    known.insert(name);
    if (!f.contains(name)) return std::nullopt;
    return f.tensor(name);
  };
  auto read = [&](Fc fc) -> std::optional<RawMatrix> {
    const std::string p = fc_prefix(fc);
    auto w = get(p + "_experts_weights");
    auto sc = get(p + "_scales");
    auto zp = get(p + "_zero_points");
    auto b = get(p + "_experts_bias");
    if (!w && !sc && !zp && !b) return std::nullopt;
    if (!w) throw Error(path + ": " + p + "_experts_weights is missing");
    if (!sc) throw Error(path + ": " + p + "_scales is missing");
    RawMatrix r;
    r.weights = std::move(*w);
    r.scales = std::move(*sc);
    r.zero_points = std::move(zp);
    r.bias = std::move(b);
    return r;
  };
  auto fc1 = read(Fc::fc1);
  auto fc2 = read(Fc::fc2);
  if (!fc1) throw Error(path + ": fc1_experts_weights is missing");
  if (!fc2) throw Error(path + ": fc2_experts_weights is missing");
  out.raw.fc1 = std::move(*fc1);
  out.raw.fc2 = std::move(*fc2);
  out.raw.fc3 = read(Fc::fc3);
  s.fc1_bias = out.raw.fc1.bias.has_value();
  s.fc2_bias = out.raw.fc2.bias.has_value();
  s.fc3_bias = out.raw.fc3 && out.raw.fc3->bias;
  s.fc1_zero_points = out.raw.fc1.zero_points.has_value();
  s.fc2_zero_points = out.raw.fc2.zero_points.has_value();
  s.fc3_zero_points = out.raw.fc3 && out.raw.fc3->zero_points;
  if (symmetric && (s.fc1_zero_points || s.fc2_zero_points || s.fc3_zero_points))
    throw Error(path + ": metadata says symmetric = 1, but the file has zero points");
  if (!symmetric && (!s.fc1_zero_points || !s.fc2_zero_points || (out.raw.fc3 && !s.fc3_zero_points)))
    throw Error(path + ": metadata says symmetric = 0, but a matrix has no zero points");
  try {
    s.validate();
    validate_raw(s, out.raw);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
  if (auto r = get("router_weight")) {
    if (r->shape() != Shape{s.num_experts, s.hidden} || !is_float(r->dtype()))
      throw Error(path + ": router_weight: expected float [" + std::to_string(s.num_experts) + ", " +
                  std::to_string(s.hidden) + "], got " + std::string(dtype_name(r->dtype())) + " " + shape_str(r->shape()));
    out.router_weight = std::move(r);
  }
  if (auto r = get("router_bias")) {
    if (r->shape() != Shape{s.num_experts} || !is_float(r->dtype()))
      throw Error(path + ": router_bias: expected float [" + std::to_string(s.num_experts) + "], got " +
                  shape_str(r->shape()));
    out.router_bias = std::move(r);
  }
  for (const std::string& n : f.names())
    if (!known.count(n)) throw Error(path + ": unexpected tensor '" + n + "' in a qmoe raw file");
  for (const auto& [k, v] : f.metadata())
    if (!spec_keys().count(k)) out.metadata[k] = v;
  return out;
}

}  // namespace qmoe
