// The Python binding of qmoe (module qmoe._qmoe), the only file that knows about Python.
//
// Thin by design: every rule (shapes, dtypes, quantization, routing, the layer) lives in the C++
// library and is reached through its public headers; this file only converts NumPy arrays to
// TensorViews and Tensors back to NumPy arrays, releases the GIL around long C++ calls, and maps
// qmoe::Error to the Python exception qmoe.Error (a ValueError). python/qmoe/__init__.py adds the
// Python-side conveniences (keyword arguments, torch and ml_dtypes bfloat16 arrays).
//
// bfloat16 has no NumPy dtype, so it crosses this boundary as uint16 bit patterns: a uint16 array is
// accepted wherever the spec says float16 or bfloat16 (the spec, not the array, says which), and
// bfloat16 results come back as uint16 arrays that the Python side views as ml_dtypes.bfloat16.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "qmoe/error.h"
#include "qmoe/layer.h"
#include "qmoe/onnx_model.h"
#include "qmoe/quantize.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace qmoe {
namespace {

// Read-only, C-contiguous host arrays; nanobind copies a non-contiguous array into this form.
using Array = nb::ndarray<nb::c_contig, nb::device::cpu, nb::ro>;

// The array's own element type; `raw16` marks uint16/int16 arrays (bit patterns of f16/bf16).
struct ArrayType {
  std::optional<DType> dtype;
  bool raw16 = false;
  std::string name;
};

ArrayType array_type(const Array& a) {
  const nb::dlpack::dtype t = a.dtype();
  const auto code = nb::dlpack::dtype_code(t.code);
  ArrayType r;
  if (t.lanes == 1) {
    if (code == nb::dlpack::dtype_code::Float && t.bits == 32) r.dtype = DType::f32;
    if (code == nb::dlpack::dtype_code::Float && t.bits == 16) r.dtype = DType::f16;
    if (code == nb::dlpack::dtype_code::Bfloat && t.bits == 16) r.dtype = DType::bf16;
    if (code == nb::dlpack::dtype_code::UInt && t.bits == 8) r.dtype = DType::u8;
    if ((code == nb::dlpack::dtype_code::UInt || code == nb::dlpack::dtype_code::Int) && t.bits == 16) r.raw16 = true;
  }
  if (r.dtype) {
    r.name = std::string(dtype_name(*r.dtype));
  } else {
    const char* kinds[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
    r.name = (t.code < 7 ? kinds[t.code] : "code" + std::to_string(t.code)) + std::to_string(t.bits);
  }
  return r;
}

Shape array_shape(const Array& a) {
  Shape s(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) s[i] = int64_t(a.shape(i));
  return s;
}

// Views `a` as dtype `want`; a uint16 array stands for float16/bfloat16 bits. Anything else is an
// error naming the argument: qmoe never converts dtypes silently.
TensorView view_as(const Array& a, DType want, const std::string& name) {
  const ArrayType t = array_type(a);
  const bool ok = (t.dtype && *t.dtype == want) || (t.raw16 && (want == DType::f16 || want == DType::bf16));
  if (!ok)
    throw Error(name + ": expected dtype " + std::string(dtype_name(want)) +
                (want == DType::f16 || want == DType::bf16 ? " (or uint16 bit patterns)" : "") + ", got " + t.name);
  return TensorView{want, array_shape(a), a.data()};
}

// A float array whose own dtype says what it is; `declared` ("float16"/"bfloat16") is needed only
// for uint16 bit patterns.
TensorView view_float(const Array& a, const std::string& declared, const std::string& name) {
  const ArrayType t = array_type(a);
  if (!declared.empty()) return view_as(a, parse_dtype(declared), name);
  if (!t.dtype || !is_float(*t.dtype))
    throw Error(name + ": expected dtype float32, float16 or bfloat16, got " + t.name +
                (t.raw16 ? " (pass dtype='float16' or 'bfloat16' to say what the bits are)" : ""));
  return TensorView{*t.dtype, array_shape(a), a.data()};
}

// Hands a Tensor to NumPy without copying: the array owns a heap copy of the Tensor handle.
nb::object to_numpy(Tensor t) {
  nb::dlpack::dtype dt;
  switch (t.dtype()) {
    case DType::f32: dt = nb::dtype<float>(); break;
    case DType::f16: dt = nb::dlpack::dtype{uint8_t(nb::dlpack::dtype_code::Float), 16, 1}; break;
    case DType::bf16: dt = nb::dtype<uint16_t>(); break;  // bit patterns; see the file comment
    case DType::u8: dt = nb::dtype<uint8_t>(); break;
  }
  auto* holder = new Tensor(std::move(t));
  nb::capsule owner(holder, [](void* p) noexcept { delete static_cast<Tensor*>(p); });
  std::vector<size_t> shape(holder->shape().begin(), holder->shape().end());
  return nb::cast(nb::ndarray<nb::numpy>(holder->data(), shape.size(), shape.data(), owner, nullptr, dt));
}

Tensor copy_tensor(const Array& a, DType want, const std::string& name) { return Tensor::copy_of(view_as(a, want, name)); }

nb::tuple quantize(const Array& w, const std::string& w_dtype, int bits, int64_t block_size, bool symmetric,
                   const std::string& scale_dtype) {
  const TensorView v = view_float(w, w_dtype, "w");
  QuantizeOptions opt{bits, block_size, symmetric, scale_dtype.empty() ? v.dtype : parse_dtype(scale_dtype)};
  nb::object zp = nb::none();
  if (v.rank() == 3) {
    RawMatrix m;
    {
      nb::gil_scoped_release unlocked;
      m = quantize_experts(v, opt);
    }
    if (m.zero_points) zp = to_numpy(std::move(*m.zero_points));
    return nb::make_tuple(to_numpy(std::move(m.weights)), to_numpy(std::move(m.scales)), zp);
  }
  if (v.rank() != 2)
    throw Error("w: expected a 2-D [N, K] or 3-D [E, N, K] array, got shape " + shape_str(v.shape));
  QuantizedMatrix q;
  {
    nb::gil_scoped_release unlocked;
    q = quantize_matrix(v, opt);
  }
  if (q.zero_points) zp = to_numpy(std::move(*q.zero_points));
  return nb::make_tuple(to_numpy(std::move(q.weights)), to_numpy(std::move(q.scales)), zp);
}

nb::object dequantize(const Array& weights, const Array& scales, const std::string& scale_dtype,
                      std::optional<Array> zero_points, int bits, int64_t block_size) {
  const ArrayType st = array_type(scales);
  const DType sd = !scale_dtype.empty() ? parse_dtype(scale_dtype) : st.dtype ? *st.dtype : DType::f32;
  Tensor w = copy_tensor(weights, DType::u8, "weights");
  Tensor s = copy_tensor(scales, sd, "scales");
  std::optional<Tensor> z;
  if (zero_points) z = copy_tensor(*zero_points, DType::u8, "zero_points");
  Tensor out;
  {
    nb::gil_scoped_release unlocked;
    if (w.rank() == 2) {
      out = dequantize_matrix(QuantizedMatrix{std::move(w), std::move(s), std::move(z)}, bits, block_size);
    } else {
      const int64_t K = w.rank() == 3 ? w.dim(2) * (bits > 0 && 8 % bits == 0 ? 8 / bits : 1) : 0;
      RawMatrix m;
      m.weights = std::move(w);
      m.scales = std::move(s);
      m.zero_points = std::move(z);
      out = dequantize_experts(m, bits, block_size, K);
    }
  }
  return to_numpy(std::move(out));
}

// The Python-facing layer: a MoeLayer and where it came from.
struct PyLayer {
  std::unique_ptr<MoeLayer> layer;
  std::string source;  // "arrays" or the ONNX path
  // run() releases the GIL, so two Python threads may call it at once; backends keep per-layer
  // scratch state and are not promised to be re-entrant, so calls on one layer are serialized.
  // (Taken after the GIL is released, so a waiting thread never blocks Python.)
  std::mutex run_mutex;

  nb::object run(const Array& x, const Array& router_logits, std::optional<Array> router_weights) {
    const DType t = layer->spec().act_dtype;
    MoeInputs in;
    in.input = view_as(x, t, "input");
    in.router_probs = view_as(router_logits, t, "router_logits");
    if (router_weights) in.router_weights = view_as(*router_weights, t, "router_weights");
    Tensor out;
    {
      nb::gil_scoped_release unlocked;
      std::lock_guard<std::mutex> lock(run_mutex);
      out = layer->run(in);
    }
    return to_numpy(std::move(out));
  }
};

// Builds one RawMatrix from the dict the Python side passes ("fc1_weights", "fc1_scales", ...).
RawMatrix matrix_from(const MoeSpec& spec, const nb::dict& arrays, const std::string& fc) {
  auto get = [&](const std::string& key) -> std::optional<Array> {
    const std::string k = fc + "_" + key;
    if (!arrays.contains(k.c_str()) || arrays[k.c_str()].is_none()) return std::nullopt;
    return nb::cast<Array>(arrays[k.c_str()]);
  };
  RawMatrix m;
  if (auto a = get("weights")) m.weights = copy_tensor(*a, DType::u8, fc + "_weights");
  if (auto a = get("scales")) m.scales = copy_tensor(*a, spec.scale_dtype, fc + "_scales");
  if (auto a = get("zero_points")) m.zero_points = copy_tensor(*a, DType::u8, fc + "_zero_points");
  if (auto a = get("bias")) m.bias = copy_tensor(*a, spec.act_dtype, fc + "_bias");
  return m;
}

PyLayer* make_layer(const MoeSpec& spec, const nb::dict& arrays, const std::string& backend, bool prepack,
                    int threads) {
  for (auto [key, value] : arrays) {
    const std::string k = nb::cast<std::string>(key);
    static const char* known[] = {"weights", "scales", "zero_points", "bias"};
    bool ok = false;
    for (const char* fc : {"fc1_", "fc2_", "fc3_"})
      for (const char* part : known) ok = ok || k == std::string(fc) + part;
    if (!ok) throw Error("Layer: unknown array '" + k + "' (expected fc{1,2,3}_{weights,scales,zero_points,bias})");
  }
  RawExperts raw;
  raw.fc1 = matrix_from(spec, arrays, "fc1");
  raw.fc2 = matrix_from(spec, arrays, "fc2");
  RawMatrix fc3 = matrix_from(spec, arrays, "fc3");
  if (!fc3.weights.empty() || !fc3.scales.empty() || fc3.bias || fc3.zero_points) raw.fc3 = std::move(fc3);
  spec.validate();
  validate_raw(spec, raw);
  auto out = std::make_unique<PyLayer>();
  {
    nb::gil_scoped_release unlocked;
    out->layer = std::make_unique<MoeLayer>(spec, std::move(raw), LayerOptions{backend, prepack, threads});
  }
  out->source = "arrays";
  return out.release();
}

PyLayer* layer_from_onnx(const std::string& path, const std::string& backend, const std::string& layout,
                         bool prepack, int threads) {
  OnnxLoadOptions opt;
  if (layout == "detect") opt.layout = WeightsLayout::detect;
  else if (layout == "raw") opt.layout = WeightsLayout::raw;
  else if (layout == "ort_cuda") opt.layout = WeightsLayout::ort_cuda;
  else throw Error("layout: expected 'detect', 'raw' or 'ort_cuda', got '" + layout + "'");
  auto out = std::make_unique<PyLayer>();
  {
    nb::gil_scoped_release unlocked;
    OnnxLayer ol = load_onnx(path, opt);
    out->layer = std::make_unique<MoeLayer>(ol.spec, std::move(ol.raw), LayerOptions{backend, prepack, threads});
  }
  out->source = path;
  return out.release();
}

std::string str_of(DType t) { return std::string(dtype_name(t)); }

}  // namespace
}  // namespace qmoe

NB_MODULE(_qmoe, m) {
  using namespace qmoe;
  m.doc() = "qmoe: quantized Mixture-of-Experts layers (ONNX Runtime's com.microsoft::QMoE); see qmoe/__init__.py";

  nb::exception<Error>(m, "Error", PyExc_ValueError);

  nb::class_<MoeSpec>(m, "Spec", "A QMoE problem (contract §2-3); fields mirror the ONNX attributes.")
      .def(nb::init<>())
      .def_rw("num_experts", &MoeSpec::num_experts)
      .def_rw("hidden", &MoeSpec::hidden)
      .def_rw("inter", &MoeSpec::inter)
      .def_rw("k", &MoeSpec::k)
      .def_rw("bits", &MoeSpec::bits)
      .def_rw("block_size", &MoeSpec::block_size)
      .def_prop_rw(
          "activation", [](const MoeSpec& s) { return std::string(activation_name(s.activation)); },
          [](MoeSpec& s, const std::string& v) { s.activation = parse_activation(v); })
      .def_prop_rw(
          "swiglu_fusion", [](const MoeSpec& s) { return int(s.swiglu_fusion); },
          [](MoeSpec& s, int v) {
            if (v < 0 || v > 2) throw Error("swiglu_fusion: expected 0, 1 or 2, got " + std::to_string(v));
            s.swiglu_fusion = SwigluFusion(v);
          })
      .def_rw("swiglu_limit", &MoeSpec::swiglu_limit)
      .def_rw("activation_alpha", &MoeSpec::activation_alpha)
      .def_rw("activation_beta", &MoeSpec::activation_beta)
      .def_rw("normalize_routing_weights", &MoeSpec::normalize_routing_weights)
      .def_rw("use_sparse_mixer", &MoeSpec::use_sparse_mixer)
      .def_prop_rw(
          "dtype", [](const MoeSpec& s) { return str_of(s.act_dtype); },
          [](MoeSpec& s, const std::string& v) { s.act_dtype = parse_dtype(v); })
      .def_prop_rw(
          "scale_dtype", [](const MoeSpec& s) { return str_of(s.scale_dtype); },
          [](MoeSpec& s, const std::string& v) { s.scale_dtype = parse_dtype(v); })
      .def_rw("fc1_bias", &MoeSpec::fc1_bias)
      .def_rw("fc2_bias", &MoeSpec::fc2_bias)
      .def_rw("fc3_bias", &MoeSpec::fc3_bias)
      .def_rw("fc1_zero_points", &MoeSpec::fc1_zero_points)
      .def_rw("fc2_zero_points", &MoeSpec::fc2_zero_points)
      .def_rw("fc3_zero_points", &MoeSpec::fc3_zero_points)
      .def("validate", &MoeSpec::validate)
      .def("__repr__", [](const MoeSpec& s) { return "Spec(" + s.to_string() + ")"; });

  nb::class_<PyLayer>(m, "_Layer")
      .def_static("from_arrays", &make_layer, "spec"_a, "arrays"_a, "backend"_a = "auto", "prepack"_a = true,
                  "threads"_a = 0, nb::rv_policy::take_ownership)
      .def_static("from_onnx", &layer_from_onnx, "path"_a, "backend"_a = "auto", "layout"_a = "detect",
                  "prepack"_a = true, "threads"_a = 0, nb::rv_policy::take_ownership)
      .def("run", &PyLayer::run, "x"_a, "router_logits"_a, "router_weights"_a = nb::none())
      .def_prop_ro("spec", [](const PyLayer& l) { return l.layer->spec(); })
      .def_prop_ro("backend", [](PyLayer& l) { return l.layer->backend().name(); })
      .def_prop_ro("layout", [](const PyLayer& l) { return l.layer->packed().tag().to_string(); })
      .def_prop_ro("resident_bytes", [](const PyLayer& l) { return l.layer->packed().resident_bytes(); })
      .def_ro("source", &PyLayer::source);

  m.def("quantize", &quantize, "w"_a, "w_dtype"_a, "bits"_a, "block_size"_a, "symmetric"_a, "scale_dtype"_a);
  m.def("dequantize", &dequantize, "weights"_a, "scales"_a, "scale_dtype"_a, "zero_points"_a.none(), "bits"_a,
        "block_size"_a);
  m.def("available_backends", &available_backends);
}
