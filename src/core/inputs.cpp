#include "qmoe/inputs.h"

#include "qmoe/error.h"

namespace qmoe {

int64_t input_rows(const MoeInputs& in) {
  return in.input.rank() == 3 ? in.input.shape[0] * in.input.shape[1] : in.input.shape[0];
}

namespace {
void check_dtype(const TensorView& v, const char* name, DType want) {
  if (v.dtype != want)
    throw Error(std::string(name) + ": expected dtype " + std::string(dtype_name(want)) + " (T), got " +
                std::string(dtype_name(v.dtype)));
}
}  // namespace

void validate_inputs(const MoeSpec& s, const MoeInputs& in) {
  const TensorView& x = in.input;
  if (x.rank() != 2 && x.rank() != 3)
    throw Error("input: expected rank 2 [rows, H] or 3 [B, S, H], got shape " + shape_str(x.shape));
  if (x.shape.back() != s.hidden)
    throw Error("input: expected last dimension H = " + std::to_string(s.hidden) + ", got shape " + shape_str(x.shape));
  x.numel();  // rejects negative dims
  check_dtype(x, "input", s.act_dtype);
  const int64_t rows = input_rows(in);
  if (rows > 0 && !x.data) throw Error("input: null data pointer");
  const Shape want{rows, s.num_experts};
  if (in.router_probs.shape != want)
    throw Error("router_probs: expected shape " + shape_str(want) + ", got " + shape_str(in.router_probs.shape));
  check_dtype(in.router_probs, "router_probs", s.act_dtype);
  if (rows > 0 && !in.router_probs.data) throw Error("router_probs: null data pointer");
  if (in.router_weights) {
    if (s.use_sparse_mixer)
      throw Error("router_weights: not supported together with use_sparse_mixer = 1");
    if (in.router_weights->shape != want)
      throw Error("router_weights: expected shape " + shape_str(want) + ", got " + shape_str(in.router_weights->shape));
    check_dtype(*in.router_weights, "router_weights", s.act_dtype);
    if (rows > 0 && !in.router_weights->data) throw Error("router_weights: null data pointer");
  }
}

}  // namespace qmoe
