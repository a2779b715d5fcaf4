#include "qmoe/spec.h"

#include <cmath>

#include "qmoe/error.h"
#include "core/str_builder.h"

namespace qmoe {

std::string_view activation_name(Activation a) {
  switch (a) {
    case Activation::relu: return "relu";
    case Activation::gelu: return "gelu";
    case Activation::silu: return "silu";
    case Activation::swiglu: return "swiglu";
    case Activation::identity: return "identity";
  }
  return "?";
}

Activation parse_activation(std::string_view name) {
  for (Activation a : {Activation::relu, Activation::gelu, Activation::silu, Activation::swiglu,
                       Activation::identity})
    if (activation_name(a) == name) return a;
  throw Error("activation_type: expected one of relu, gelu, silu, swiglu, identity, got '" +
              std::string(name) + "'");
}

namespace {
template <class T>
[[noreturn]] void bad(const char* field, const std::string& expected, T actual) {
  StrBuilder os;
  os << field << ": expected " << expected << ", got " << actual;
  throw Error(os.str());
}
// The dtype's name, or its number when it is not a DType at all (a corrupted or unset field).
std::string dtype_label(DType t) {
  const std::string_view n = dtype_name(t);
  return n == "?" ? "dtype #" + std::to_string(int(t)) : std::string(n);
}

}  // namespace

void MoeSpec::validate() const {
  // Upper bounds keep every derived size (2I rows, E*N*K codes, byte counts) far from int64
  // overflow, so a hostile header cannot make shape arithmetic undefined. They are far above any
  // real model (DeepSeek-V3: E=256, H=7168, I=2048).
  constexpr int64_t kMaxExperts = int64_t(1) << 16, kMaxDim = int64_t(1) << 24;
  if (num_experts < 1 || num_experts > kMaxExperts)
    bad("num_experts (E)", "in [1, " + std::to_string(kMaxExperts) + "]", num_experts);
  if (hidden < 1 || hidden > kMaxDim) bad("hidden_size (H)", "in [1, " + std::to_string(kMaxDim) + "]", hidden);
  if (inter < 1 || inter > kMaxDim) bad("inter_size (I)", "in [1, " + std::to_string(kMaxDim) + "]", inter);
  constexpr double kMaxCodes = 0x1p50;  // per matrix, all experts: 1 PiB of codes at most
  if (double(num_experts) * double(2 * inter) * double(hidden) > kMaxCodes)
    bad("E * fc1 rows * H", "at most 2^50 weights per matrix", double(num_experts) * double(2 * inter) * double(hidden));
  if (k < 1 || k > num_experts) bad("k", "in [1, E=" + std::to_string(num_experts) + "]", k);
  if (bits != 2 && bits != 4 && bits != 8) bad("expert_weight_bits", "2, 4 or 8", bits);
  if (block_size < 0 || block_size > kMaxDim)
    bad("block_size", "in [0, " + std::to_string(kMaxDim) + "] (0 = row-wise)", block_size);
  if (block_size > 0 && (block_size < 16 || (block_size & (block_size - 1)) != 0))
    bad("block_size", "a power of two >= 16 (or 0 for row-wise)", block_size);
  if (hidden % pack() != 0)
    bad("hidden_size (H)", "a multiple of " + std::to_string(pack()) + " (codes per byte at " +
                               std::to_string(bits) + " bits)", hidden);
  if (inter % pack() != 0)
    bad("inter_size (I)", "a multiple of " + std::to_string(pack()) + " (codes per byte at " +
                              std::to_string(bits) + " bits)", inter);
  if (activation_name(activation) == "?")
    bad("activation_type", "relu, gelu, silu, swiglu or identity", int(activation));
  const int fusion = int(swiglu_fusion);
  if (fusion < 0 || fusion > 2) bad("swiglu_fusion", "0, 1 or 2", fusion);
  if (!is_swiglu() && swiglu_fusion != SwigluFusion::separate)
    bad("swiglu_fusion", "0 with activation '" + std::string(activation_name(activation)) +
                             "' (fused halves exist only for swiglu)", fusion);
  if (std::isnan(swiglu_limit) || swiglu_limit <= 0) bad("swiglu_limit", "> 0", swiglu_limit);
  if (!std::isfinite(activation_alpha)) bad("activation_alpha", "a finite value", activation_alpha);
  if (!std::isfinite(activation_beta)) bad("activation_beta", "a finite value", activation_beta);
  if (use_sparse_mixer && k != 2) bad("k", "2 when use_sparse_mixer = 1", k);
  if (!is_float(act_dtype)) bad("T (activation dtype)", "float32, float16 or bfloat16", dtype_label(act_dtype));
  if (!is_float(scale_dtype)) bad("T2 (scale dtype)", "float32, float16 or bfloat16", dtype_label(scale_dtype));
  if (!has_fc3() && (fc3_bias || fc3_zero_points))
    throw Error("fc3: given, but fc3 exists only for swiglu with swiglu_fusion = 0");
}

std::string MoeSpec::to_string() const {
  StrBuilder os;
  os << "E=" << num_experts << " k=" << k << " H=" << hidden << " I=" << inter << " int" << bits;
  if (block_wise())
    os << " block=" << block_size;
  else
    os << " row-wise";
  os << " " << activation_name(activation);
  if (is_swiglu()) {
    os << "(fusion=" << int(swiglu_fusion);
    if (std::isfinite(swiglu_limit)) os << " limit=" << swiglu_limit;
    if (activation_alpha != 1.0f) os << " alpha=" << activation_alpha;
    if (activation_beta != 0.0f) os << " beta=" << activation_beta;
    os << ")";
  }
  if (fc1_zero_points || fc2_zero_points || fc3_zero_points) os << " zero-points";
  if (fc1_bias || fc2_bias || fc3_bias) os << " bias";
  if (normalize_routing_weights) os << " normalize";
  if (use_sparse_mixer) os << " sparse-mixer";
  os << " T=" << dtype_name(act_dtype) << " T2=" << dtype_name(scale_dtype);
  return os.str();
}

}  // namespace qmoe
