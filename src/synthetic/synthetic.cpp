// Seeded random layers and the unquantized fp32 forward pass (see include/qmoe/synthetic.h).
//
// The float forward reuses route_all() and apply_activation() so routing and activations have one
// definition in the library; what is new here is only the dense fp32 GEMV over unquantized weights.
#include "qmoe/synthetic.h"

#include <cmath>
#include <vector>

#include "qmoe/error.h"
#include "qmoe/quantize.h"
#include "qmoe/reference.h"
#include "qmoe/routing.h"

namespace qmoe {

namespace {

// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and every 64-bit state gives a well-mixed
// output, so seeds 0, 1, 2... are as good as any.
class Rng {
 public:
  Rng(uint64_t seed, uint64_t stream) : state_(seed * 0x9E3779B97F4A7C15ull ^ (stream + 1) * 0xD1B54A32D192ED03ull) {}

  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in (0, 1): 53 random bits, offset by half an ulp so log() below never sees 0.
  double uniform() { return (double(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
  // Standard normal by Box-Muller; the second value of each pair is kept for the next call.
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double r = std::sqrt(-2.0 * std::log(uniform()));
    const double phi = 6.283185307179586 * uniform();
    spare_ = r * std::sin(phi);
    has_spare_ = true;
    return r * std::cos(phi);
  }

 private:
  uint64_t state_;
  double spare_ = 0;
  bool has_spare_ = false;
};

// Separate streams per tensor so adding an optional tensor (a bias, fc3) leaves the others unchanged.
enum Stream : uint64_t { kFc1 = 1, kFc2, kFc3, kBias1, kBias2, kBias3, kInput, kLogits, kRouterWeights };

Tensor random_normal(DType dtype, Shape shape, double stddev, Rng rng) {
  Tensor t(dtype, std::move(shape));
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) store_from_float(dtype, t.data(), i, float(stddev * rng.normal()));
  return t;
}

// fp32 bias whose values are exactly representable in T (rounded once through T).
Tensor random_bias(const MoeSpec& s, int64_t N, uint64_t seed, uint64_t stream) {
  Tensor b = random_normal(DType::f32, {s.num_experts, N}, 0.1, Rng(seed, stream));
  float* p = b.data_as<float>();
  uint32_t tmp = 0;  // room for any T
  for (int64_t i = 0; i < b.numel(); ++i) {
    store_from_float(s.act_dtype, &tmp, 0, p[i]);
    p[i] = load_as_float(s.act_dtype, &tmp, 0);
  }
  return b;
}

Tensor to_dtype(const Tensor& f32, DType dtype) {
  Tensor t(dtype, f32.shape());
  const float* p = f32.data_as<float>();
  for (int64_t i = 0; i < f32.numel(); ++i) store_from_float(dtype, t.data(), i, p[i]);
  return t;
}

RawMatrix quantize_one(const MoeSpec& s, const Tensor& w, const std::optional<Tensor>& bias, bool zero_points) {
  QuantizeOptions q;
  q.bits = s.bits;
  q.block_size = s.block_size;
  q.symmetric = !zero_points;
  q.scale_dtype = s.scale_dtype;
  RawMatrix m = quantize_experts(w.view(), q);
  if (bias) m.bias = to_dtype(*bias, s.act_dtype);
  return m;
}

// y[n] = sum_c W[n][c] x[c] + b[n], fp32 accumulation like the reference's.
void dense_gemv(const float* W, int64_t N, int64_t K, const float* x, const float* b, float* y) {
  for (int64_t n = 0; n < N; ++n) {
    const float* row = W + n * K;
    float acc = 0.f;
    for (int64_t c = 0; c < K; ++c) acc += row[c] * x[c];
    y[n] = acc + (b ? b[n] : 0.f);
  }
}

}  // namespace

size_t FloatExperts::weight_bytes() const { return fc1.nbytes() + fc2.nbytes() + (fc3 ? fc3->nbytes() : 0); }

FloatExperts make_float_experts(const MoeSpec& s, uint64_t seed) {
  s.validate();
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter;
  FloatExperts w;
  w.fc1 = random_normal(DType::f32, {E, s.fc1_rows(), H}, 1.0 / std::sqrt(double(H)), Rng(seed, kFc1));
  w.fc2 = random_normal(DType::f32, {E, H, I}, 1.0 / std::sqrt(double(I)), Rng(seed, kFc2));
  if (s.has_fc3()) w.fc3 = random_normal(DType::f32, {E, I, H}, 1.0 / std::sqrt(double(H)), Rng(seed, kFc3));
  if (s.fc1_bias) w.fc1_bias = random_bias(s, s.fc1_rows(), seed, kBias1);
  if (s.fc2_bias) w.fc2_bias = random_bias(s, H, seed, kBias2);
  if (s.fc3_bias && s.has_fc3()) w.fc3_bias = random_bias(s, I, seed, kBias3);
  return w;
}

RawExperts quantize_float_experts(const MoeSpec& s, const FloatExperts& w) {
  s.validate();
  if (s.has_fc3() != w.fc3.has_value())
    throw Error(std::string("quantize_float_experts: fc3 is ") + (w.fc3 ? "present" : "missing") +
                " but the spec (" + s.to_string() + ") " + (s.has_fc3() ? "needs" : "has no") + " fc3");
  RawExperts raw;
  raw.fc1 = quantize_one(s, w.fc1, s.fc1_bias ? w.fc1_bias : std::nullopt, s.fc1_zero_points);
  raw.fc2 = quantize_one(s, w.fc2, s.fc2_bias ? w.fc2_bias : std::nullopt, s.fc2_zero_points);
  if (s.has_fc3()) raw.fc3 = quantize_one(s, *w.fc3, s.fc3_bias ? w.fc3_bias : std::nullopt, s.fc3_zero_points);
  validate_raw(s, raw);
  return raw;
}

Tensor float_forward(const MoeSpec& s, const FloatExperts& w, const MoeInputs& in) {
  s.validate();
  validate_inputs(s, in);
  const int64_t rows = input_rows(in), H = s.hidden, I = s.inter, k = s.k, N1 = s.fc1_rows();
  const Shape want1{s.num_experts, N1, H}, want2{s.num_experts, H, I};
  if (w.fc1.shape() != want1 || w.fc2.shape() != want2 || w.fc1.dtype() != DType::f32 ||
      w.fc2.dtype() != DType::f32 || s.has_fc3() != w.fc3.has_value())
    throw Error("float_forward: weights do not match the spec " + s.to_string());
  const std::vector<Route> routes = route_all(s, in);

  auto bias = [&](bool flag, const std::optional<Tensor>& b, int64_t e, int64_t N) -> const float* {
    return flag && b ? b->data_as<float>() + e * N : nullptr;
  };
  std::vector<float> ys(size_t(rows * k * H), 0.f);
  std::vector<float> x(static_cast<size_t>(H)), h(static_cast<size_t>(N1)), h3(static_cast<size_t>(I)), a(static_cast<size_t>(I));
  for (int64_t slot = 0; slot < rows * k; ++slot) {
    const int64_t t = slot / k, e = routes[size_t(slot)].expert;
    for (int64_t c = 0; c < H; ++c) x[size_t(c)] = load_as_float(in.input.dtype, in.input.data, t * H + c);
    dense_gemv(w.fc1.data_as<float>() + e * N1 * H, N1, H, x.data(), bias(s.fc1_bias, w.fc1_bias, e, N1), h.data());
    if (s.has_fc3())
      dense_gemv(w.fc3->data_as<float>() + e * I * H, I, H, x.data(), bias(s.fc3_bias, w.fc3_bias, e, I), h3.data());
    apply_activation(s, h.data(), s.has_fc3() ? h3.data() : nullptr, a.data());
    dense_gemv(w.fc2.data_as<float>() + e * H * I, H, I, a.data(), bias(s.fc2_bias, w.fc2_bias, e, H),
               &ys[size_t(slot * H)]);
  }

  Tensor out(DType::f32, in.input.shape);
  float* o = out.data_as<float>();
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const float wj = routes[size_t(t * k + j)].weight;
      const float* y = &ys[size_t((t * k + j) * H)];
      for (int64_t c = 0; c < H; ++c) o[t * H + c] += wj * y[c];
    }
  return out;
}

MoeInputs SyntheticLayer::inputs() const {
  MoeInputs in{input.view(), router_probs.view(), std::nullopt};
  if (router_weights) in.router_weights = router_weights->view();
  return in;
}

SyntheticLayer make_synthetic_layer(const MoeSpec& s, const SyntheticOptions& opt) {
  s.validate();
  if (opt.tokens < 0) throw Error("synthetic tokens: expected >= 0, got " + std::to_string(opt.tokens));
  if (opt.batch < 0 || (opt.batch > 0 && opt.tokens % opt.batch != 0))
    throw Error("synthetic batch: expected 0 or a divisor of tokens = " + std::to_string(opt.tokens) + ", got " +
                std::to_string(opt.batch));
  SyntheticLayer L;
  L.spec = s;
  L.weights = make_float_experts(s, opt.seed);
  L.raw = quantize_float_experts(s, L.weights);
  const Shape in_shape = opt.batch > 0 ? Shape{opt.batch, opt.tokens / opt.batch, s.hidden} : Shape{opt.tokens, s.hidden};
  L.input = random_normal(s.act_dtype, in_shape, 1.0, Rng(opt.seed, kInput));
  L.router_probs = random_normal(s.act_dtype, {opt.tokens, s.num_experts}, 1.0, Rng(opt.seed, kLogits));
  if (opt.router_weights) {
    Rng rng(opt.seed, kRouterWeights);
    Tensor rw(s.act_dtype, {opt.tokens, s.num_experts});
    for (int64_t i = 0; i < rw.numel(); ++i) store_from_float(s.act_dtype, rw.data(), i, float(0.05 + 0.95 * rng.uniform()));
    L.router_weights = std::move(rw);
  }
  return L;
}

double relative_error(const TensorView& a, const TensorView& b) {
  if (a.numel() != b.numel())
    throw Error("relative_error: element counts differ: " + shape_str(a.shape) + " vs " + shape_str(b.shape));
  double num = 0, den = 0, na = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = load_as_float(a.dtype, a.data, i), y = load_as_float(b.dtype, b.data, i);
    num += (x - y) * (x - y);
    den += y * y;
    na += x * x;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(na);
}

}  // namespace qmoe
