// libFuzzer harness for spec validation (MoeSpec::validate, validate_raw, validate_inputs) and the
// reference oracle behind them.
//
// Input: attribute-like text, one "name=value" per line, using the ONNX attribute names plus the raw
// file's shape keys (num_experts, hidden_size, inter_size, act_dtype, scale_dtype, fc1_bias, ...),
// then optionally "\n--\n" and binary bytes that fill the weights, scales, zero points, biases and
// inputs (so scales and inputs can hold NaN, Inf, subnormals). Unknown names are ignored; numbers are
// parsed with strtoll/strtof exactly as written. Enum fields are taken only from their valid names
// (invalid enum values are the deterministic tests' job, tests/cpp/bad_input_test.cpp).
//
// Flow: build the spec -> validate(); when valid and small, build raw tensors of the shapes the spec
// implies, with one shape optionally perturbed by the "perturb" key (1-based: fc1 weights, scales,
// zero points, bias, then fc2, fc3; last dim + 1) -> validate_raw(), which must refuse a perturbed
// tensor that exists; when it passes, run reference_forward on "tokens" rows (0..8, so T = 0 is
// covered) and, with "cpu=1", the CPU backend too (crash-only: outputs are compared by the agreement
// tests, not here).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "fuzz_common_run.h"
#include "fuzz_util.h"
#include "qmoe/layer.h"

namespace {

int64_t to_i64(std::string_view v) {
  const std::string s(v);
  return std::strtoll(s.c_str(), nullptr, 0);
}
float to_f32(std::string_view v) {
  const std::string s(v);
  return std::strtof(s.c_str(), nullptr);
}

struct Parsed {
  qmoe::MoeSpec spec;
  int64_t tokens = 2;
  int64_t perturb = 0;  // 0: none; else which tensor (1..12) gets a wrong dim
  bool three_d = false;
  bool router_weights = false;
  bool cpu = false;
};

Parsed parse(std::string_view text) {
  Parsed p;
  qmoe::MoeSpec& s = p.spec;
  s.num_experts = 2;
  s.hidden = 16;
  s.inter = 16;
  while (!text.empty()) {
    const size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    const size_t eq = line.find('=');
    if (eq == std::string_view::npos) continue;
    const std::string_view k = line.substr(0, eq), v = line.substr(eq + 1);
    try {
      if (k == "k") s.k = to_i64(v);
      else if (k == "num_experts") s.num_experts = to_i64(v);
      else if (k == "hidden_size") s.hidden = to_i64(v);
      else if (k == "inter_size") s.inter = to_i64(v);
      else if (k == "expert_weight_bits") s.bits = int(to_i64(v));
      else if (k == "block_size") s.block_size = to_i64(v);
      else if (k == "activation_type") s.activation = qmoe::parse_activation(v);
      else if (k == "swiglu_fusion") {
        const int64_t f = to_i64(v);
        if (f >= 0 && f <= 2) s.swiglu_fusion = qmoe::SwigluFusion(f);
      } else if (k == "swiglu_limit") s.swiglu_limit = to_f32(v);
      else if (k == "activation_alpha") s.activation_alpha = to_f32(v);
      else if (k == "activation_beta") s.activation_beta = to_f32(v);
      else if (k == "normalize_routing_weights") s.normalize_routing_weights = to_i64(v) != 0;
      else if (k == "use_sparse_mixer") s.use_sparse_mixer = to_i64(v) != 0;
      else if (k == "act_dtype") s.act_dtype = qmoe::parse_dtype(v);
      else if (k == "scale_dtype") s.scale_dtype = qmoe::parse_dtype(v);
      else if (k == "fc1_bias") s.fc1_bias = to_i64(v) != 0;
      else if (k == "fc2_bias") s.fc2_bias = to_i64(v) != 0;
      else if (k == "fc3_bias") s.fc3_bias = to_i64(v) != 0;
      else if (k == "fc1_zero_points") s.fc1_zero_points = to_i64(v) != 0;
      else if (k == "fc2_zero_points") s.fc2_zero_points = to_i64(v) != 0;
      else if (k == "fc3_zero_points") s.fc3_zero_points = to_i64(v) != 0;
      else if (k == "tokens") p.tokens = to_i64(v);
      else if (k == "perturb") p.perturb = to_i64(v);
      else if (k == "three_d") p.three_d = to_i64(v) != 0;
      else if (k == "router_weights") p.router_weights = to_i64(v) != 0;
      else if (k == "cpu") p.cpu = to_i64(v) != 0;
    } catch (const qmoe::Error&) {
      // an unknown activation or dtype name: keep the default, like an absent attribute
    }
  }
  return p;
}

qmoe::Tensor filled(qmoe::DType t, qmoe::Shape shape, qmoe_fuzz::Bytes& b) {
  qmoe::Tensor x(t, std::move(shape));
  auto* p = static_cast<uint8_t*>(x.data());
  for (size_t i = 0; i < x.nbytes(); ++i) p[i] = b.left() ? b.u8() : uint8_t(i * 37 + 11);
  // Scales and floats from leftover filler bytes are arbitrary bit patterns too; that is the point.
  return x;
}

qmoe::Shape perturbed_shape(qmoe::Shape s, bool on) {
  if (on && !s.empty()) s.back() += 1;
  return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  const size_t cut = all.find("\n--\n");
  Parsed p = parse(all.substr(0, cut));
  qmoe_fuzz::Bytes bytes(data, 0);
  if (cut != std::string_view::npos) bytes = qmoe_fuzz::Bytes(data + cut + 4, size - cut - 4);
  qmoe::MoeSpec& s = p.spec;

  try {
    s.validate();
  } catch (const qmoe::Error&) {
    return 0;
  }
  (void)s.to_string();
  // Valid specs must have the invariants the backends rely on.
  if (s.k < 1 || s.k > s.num_experts || s.hidden % s.pack() || s.inter % s.pack() || s.num_experts < 1) {
    __builtin_fprintf(stderr, "FINDING: validate() accepted %s\n", s.to_string().c_str());
    std::abort();
  }
  // Keep executions fast: the reference costs E * (fc1_rows + 2I) * H per token at most.
  if (s.num_experts > 64 || s.hidden > 4096 || s.inter > 4096) return 0;
  const int64_t work = s.num_experts * (s.fc1_rows() + 2 * s.inter) * s.hidden;
  if (work > (int64_t(1) << 18)) return 0;

  using qmoe::Fc;
  qmoe::RawExperts raw;
  int which = 0;
  bool perturbed = false;  // a tensor that exists got a wrong shape on purpose
  auto shape_for = [&](qmoe::Shape shp) {
    const bool on = p.perturb == which;
    perturbed = perturbed || (on && !shp.empty());
    return perturbed_shape(std::move(shp), on);
  };
  auto mat = [&](Fc fc, bool bias, bool zp) {
    qmoe::RawMatrix m;
    ++which;
    m.weights = filled(qmoe::DType::u8, shape_for(qmoe::raw_weight_shape(s, fc)), bytes);
    ++which;
    m.scales = filled(s.scale_dtype, shape_for(qmoe::raw_scale_shape(s, fc)), bytes);
    ++which;
    if (zp) m.zero_points = filled(qmoe::DType::u8, shape_for(qmoe::raw_zero_point_shape(s, fc)), bytes);
    ++which;
    if (bias) m.bias = filled(s.act_dtype, shape_for(qmoe::raw_bias_shape(s, fc)), bytes);
    return m;
  };
  raw.fc1 = mat(Fc::fc1, s.fc1_bias, s.fc1_zero_points);
  raw.fc2 = mat(Fc::fc2, s.fc2_bias, s.fc2_zero_points);
  if (s.has_fc3()) raw.fc3 = mat(Fc::fc3, s.fc3_bias, s.fc3_zero_points);
  try {
    qmoe::validate_raw(s, raw);
  } catch (const qmoe::Error&) {
    return 0;
  }
  if (perturbed) {
    // One tensor's last dim is one too large: validate_raw must have refused it.
    __builtin_fprintf(stderr, "FINDING: validate_raw accepted tensor %lld with a wrong shape for %s\n",
                      (long long)p.perturb, s.to_string().c_str());
    std::abort();
  }

  const int64_t T = p.tokens < 0 ? 0 : p.tokens % 9;
  qmoe::Tensor x = p.three_d && T % 2 == 0 && T > 0 ? filled(s.act_dtype, {2, T / 2, s.hidden}, bytes)
                                                     : filled(s.act_dtype, {T, s.hidden}, bytes);
  qmoe::Tensor logits = filled(s.act_dtype, {T, s.num_experts}, bytes);
  std::optional<qmoe::Tensor> rw;
  if (p.router_weights) rw = filled(s.act_dtype, {T, s.num_experts}, bytes);
  qmoe::MoeInputs in;
  in.input = x.view();
  in.router_probs = logits.view();
  if (rw) in.router_weights = rw->view();

  std::optional<qmoe::Tensor> y;
  FUZZ_GUARD(y = qmoe::reference_forward(s, raw, in));
  if (y) {
    if (y->shape() != x.shape() || y->dtype() != x.dtype()) {
      __builtin_fprintf(stderr, "FINDING: reference output %s differs from input shape\n", qmoe::shape_str(y->shape()).c_str());
      std::abort();
    }
    (void)qmoe_fuzz::touch_bytes(*y);
  }
  if (p.cpu) {
    FUZZ_GUARD({
      auto be = qmoe::make_backend("cpu", qmoe::LayerOptions{.backend = "cpu", .prepack = true, .threads = 1});
      auto packed = be->prepack(s, raw);
      qmoe::Tensor out(s.act_dtype, x.shape());
      be->run(*packed, in, out);
      (void)qmoe_fuzz::touch_bytes(out);
    });
  }
  return 0;
}
