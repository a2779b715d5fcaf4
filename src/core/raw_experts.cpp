#include "qmoe/raw_experts.h"

#include "qmoe/error.h"

namespace qmoe {

size_t RawMatrix::nbytes() const {
  size_t n = weights.nbytes() + scales.nbytes();
  if (zero_points) n += zero_points->nbytes();
  if (bias) n += bias->nbytes();
  return n;
}

size_t RawExperts::nbytes() const { return fc1.nbytes() + fc2.nbytes() + (fc3 ? fc3->nbytes() : 0); }

int64_t fc_rows(const MoeSpec& s, Fc fc) {
  switch (fc) {
    case Fc::fc1: return s.fc1_rows();
    case Fc::fc2: return s.hidden;
    case Fc::fc3: return s.inter;
  }
  return 0;
}

int64_t fc_cols(const MoeSpec& s, Fc fc) { return fc == Fc::fc2 ? s.inter : s.hidden; }

Shape raw_weight_shape(const MoeSpec& s, Fc fc) {
  return {s.num_experts, fc_rows(s, fc), fc_cols(s, fc) / s.pack()};
}

Shape raw_scale_shape(const MoeSpec& s, Fc fc) {
  if (!s.block_wise()) return {s.num_experts, fc_rows(s, fc)};
  return {s.num_experts, fc_rows(s, fc), s.blocks(fc_cols(s, fc))};
}

Shape raw_zero_point_shape(const MoeSpec& s, Fc fc) {
  const int64_t N = fc_rows(s, fc);
  const int64_t zpack = s.pack();
  if (!s.block_wise()) return {s.num_experts, (N + zpack - 1) / zpack};
  return {s.num_experts, N, (s.blocks(fc_cols(s, fc)) + zpack - 1) / zpack};
}

Shape raw_bias_shape(const MoeSpec& s, Fc fc) { return {s.num_experts, fc_rows(s, fc)}; }

namespace {

const char* fc_name(Fc fc) { return fc == Fc::fc1 ? "fc1" : fc == Fc::fc2 ? "fc2" : "fc3"; }

void check(const Tensor& t, const std::string& name, DType dtype, const Shape& shape) {
  if (t.empty()) throw Error(name + ": missing (expected " + std::string(dtype_name(dtype)) + " " + shape_str(shape) + ")");
  if (t.dtype() != dtype)
    throw Error(name + ": expected dtype " + std::string(dtype_name(dtype)) + ", got " + std::string(dtype_name(t.dtype())));
  if (t.shape() != shape)
    throw Error(name + ": expected shape " + shape_str(shape) + ", got " + shape_str(t.shape()));
}

void check_matrix(const MoeSpec& s, Fc fc, const RawMatrix& m, bool has_bias, bool has_zp) {
  const std::string p = fc_name(fc);
  check(m.weights, p + "_experts_weights", DType::u8, raw_weight_shape(s, fc));
  Shape scale_shape = raw_scale_shape(s, fc);
  if (!s.block_wise() && m.scales.rank() == 3 && !m.scales.empty() && m.scales.dim(2) == 1)
    scale_shape.push_back(1);  // [E, N, 1] is an accepted spelling of row-wise scales
  check(m.scales, p + "_scales", s.scale_dtype, scale_shape);
  if (has_zp) {
    if (!m.zero_points) throw Error(p + "_zero_points: missing, but the spec says " + p + " has zero points");
    check(*m.zero_points, p + "_zero_points", DType::u8, raw_zero_point_shape(s, fc));
  } else if (m.zero_points) {
    throw Error(p + "_zero_points: given, but the spec says " + p + " has none");
  }
  if (has_bias) {
    if (!m.bias) throw Error(p + "_experts_bias: missing, but the spec says " + p + " has a bias");
    check(*m.bias, p + "_experts_bias", s.act_dtype, raw_bias_shape(s, fc));
  } else if (m.bias) {
    throw Error(p + "_experts_bias: given, but the spec says " + p + " has none");
  }
}

}  // namespace

void validate_raw(const MoeSpec& s, const RawExperts& raw) {
  check_matrix(s, Fc::fc1, raw.fc1, s.fc1_bias, s.fc1_zero_points);
  check_matrix(s, Fc::fc2, raw.fc2, s.fc2_bias, s.fc2_zero_points);
  if (s.has_fc3()) {
    if (!raw.fc3) throw Error("fc3_experts_weights: missing; swiglu with swiglu_fusion = 0 needs fc3 (the linear half)");
    check_matrix(s, Fc::fc3, *raw.fc3, s.fc3_bias, s.fc3_zero_points);
  } else if (raw.fc3) {
    throw Error("fc3_experts_weights: given, but fc3 is used only by swiglu with swiglu_fusion = 0");
  }
}

}  // namespace qmoe
