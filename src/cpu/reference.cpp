// The scalar reference QMoE. Deliberately plain: dequantize each used expert to fp32, run the FFN
// for the tokens routed to it with sequential fp32 dot products, keep each (token, route) result,
// then combine routes in selection order and round to T once. Speed is not a goal here.
#include "qmoe/reference.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "qmoe/error.h"
#include "qmoe/routing.h"

namespace qmoe {

namespace {

float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

}  // namespace

float activation_scalar(Activation a, float v) {
  switch (a) {
    case Activation::relu: return std::max(0.0f, v);
    case Activation::silu: return v * sigmoid(v);
    case Activation::gelu: return 0.5f * v * (1.0f + std::tanh(0.7978845608f * (v + 0.044715f * v * v * v)));
    case Activation::identity: return v;
    case Activation::swiglu: break;
  }
  throw Error("activation_scalar: swiglu needs two inputs (use swiglu_scalar)");
}

float swiglu_scalar(const MoeSpec& s, float g, float u) {
  g = std::min(g, s.swiglu_limit);
  u = std::clamp(u, -s.swiglu_limit, s.swiglu_limit);
  return g * sigmoid(s.activation_alpha * g) * (u + s.activation_beta);
}

namespace {

// Zero point of (row n, block b) of expert e; the default midpoint when the matrix has none.
int zero_point(const MoeSpec& s, const RawMatrix& m, int64_t e, int64_t N, int64_t nb, int64_t n, int64_t b) {
  if (!m.zero_points) return s.default_zero_point();
  const int zpack = s.pack();
  const uint8_t* zp = m.zero_points->data_as<uint8_t>();
  int64_t byte, shift;
  if (s.block_wise()) {
    const int64_t per_row = (nb + zpack - 1) / zpack;
    byte = e * N * per_row + n * per_row + b / zpack;
    shift = (b % zpack) * s.bits;
  } else {
    byte = e * ((N + zpack - 1) / zpack) + n / zpack;
    shift = (n % zpack) * s.bits;
  }
  return (zp[byte] >> shift) & ((1 << s.bits) - 1);
}

}  // namespace

void apply_activation(const MoeSpec& s, const float* h, const float* h3, float* a) {
  const int64_t I = s.inter;
  if (!s.is_swiglu()) {
    for (int64_t i = 0; i < I; ++i) a[i] = activation_scalar(s.activation, h[i]);
    return;
  }
  for (int64_t i = 0; i < I; ++i) {
    float g, u;
    switch (s.swiglu_fusion) {
      case SwigluFusion::separate: g = h[i], u = h3[i]; break;
      case SwigluFusion::interleaved: g = h[2 * i], u = h[2 * i + 1]; break;
      case SwigluFusion::concatenated: g = h[i], u = h[I + i]; break;
      default: throw Error("swiglu_fusion: unknown value");
    }
    a[i] = swiglu_scalar(s, g, u);
  }
}

void dequantize_expert(const MoeSpec& s, Fc fc, const RawMatrix& m, int64_t e, float* out) {
  const int64_t N = fc_rows(s, fc), K = fc_cols(s, fc), nb = s.blocks(K);
  const uint8_t* w = m.weights.data_as<uint8_t>() + e * N * (K / s.pack());
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < K; ++c) {
      const int64_t b = s.block_wise() ? c / s.block_size : 0;
      const float scale = load_as_float(s.scale_dtype, m.scales.data(), (e * N + n) * nb + b);
      const int code = raw_code(w, K, s.bits, n, c);
      out[n * K + c] = scale * float(code - zero_point(s, m, e, N, nb, n, b));
    }
  }
}

namespace {

// y[n] = sum_c W[n][c] * x[c] (+ bias[n]), sequential fp32 accumulation.
void gemv(const float* W, int64_t N, int64_t K, const float* x, const RawMatrix& m, const MoeSpec& s,
          int64_t e, float* y) {
  for (int64_t n = 0; n < N; ++n) {
    float acc = 0.f;
    for (int64_t c = 0; c < K; ++c) acc += W[n * K + c] * x[c];
    if (m.bias) acc += load_as_float(s.act_dtype, m.bias->data(), e * N + n);
    y[n] = acc;
  }
}

}  // namespace

Tensor reference_forward(const MoeSpec& s, const RawExperts& raw, const MoeInputs& in) {
  s.validate();
  validate_raw(s, raw);
  validate_inputs(s, in);
  const int64_t rows = input_rows(in), H = s.hidden, I = s.inter, k = s.k, N1 = s.fc1_rows();
  const std::vector<Route> routes = route_all(s, in);

  std::vector<float> ys(size_t(rows * k * H), 0.f);  // FFN output of each (token, route)
  std::vector<float> w1(size_t(N1 * H)), w3, w2(size_t(H * I));
  if (s.has_fc3()) w3.resize(size_t(I * H));
  std::vector<float> x(static_cast<size_t>(H)), h(static_cast<size_t>(N1)), h3(static_cast<size_t>(I)), a(static_cast<size_t>(I));

  for (int64_t e = 0; e < s.num_experts; ++e) {
    bool used = false;
    for (const Route& r : routes) used |= (r.expert == e);
    if (!used) continue;
    dequantize_expert(s, Fc::fc1, raw.fc1, e, w1.data());
    dequantize_expert(s, Fc::fc2, raw.fc2, e, w2.data());
    if (s.has_fc3()) dequantize_expert(s, Fc::fc3, *raw.fc3, e, w3.data());
    for (int64_t slot = 0; slot < rows * k; ++slot) {
      if (routes[size_t(slot)].expert != e) continue;
      const int64_t t = slot / k;
      for (int64_t c = 0; c < H; ++c) x[size_t(c)] = load_as_float(in.input.dtype, in.input.data, t * H + c);
      gemv(w1.data(), N1, H, x.data(), raw.fc1, s, e, h.data());
      if (s.has_fc3()) gemv(w3.data(), I, H, x.data(), *raw.fc3, s, e, h3.data());
      apply_activation(s, h.data(), s.has_fc3() ? h3.data() : nullptr, a.data());
      gemv(w2.data(), H, I, a.data(), raw.fc2, s, e, &ys[size_t(slot * H)]);
    }
  }

  Tensor out(in.input.dtype, in.input.shape);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t c = 0; c < H; ++c) {
      float acc = 0.f;
      for (int64_t j = 0; j < k; ++j) acc += routes[size_t(t * k + j)].weight * ys[size_t((t * k + j) * H + c)];
      store_from_float(out.dtype(), out.data(), t * H + c, acc);
    }
  }
  return out;
}

}  // namespace qmoe
