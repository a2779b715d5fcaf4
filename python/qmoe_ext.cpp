// The Python binding of qmoe (module qmoe._qmoe), the only file that knows about Python.
//
// Thin by design: every rule (shapes, dtypes, quantization, routing, the layer) lives in the C++
// library and is reached through its public headers; this file only turns arrays into TensorViews
// (and Tensors back into NumPy arrays), releases the GIL around long C++ calls, and maps qmoe::Error
// to the Python exception qmoe.Error (a ValueError). python/qmoe/__init__.py adds the Python-side
// conveniences (keyword arguments, torch streams and output allocation, ml_dtypes bfloat16).
//
// Two kinds of array cross here. Weights and quantize()/dequantize() arguments are host arrays that
// are copied anyway, so they may be converted to C-contiguous form on the way in. Layer.run()'s
// arrays are taken as they are, from any DLPack producer or NumPy, zero-copy: they must be
// C-contiguous and on one device (host, or the CUDA device of a cuda layer), and the output array is
// allocated by the caller and written in place, so a torch tensor comes back as a torch tensor on the
// same device. CUDA arrays run on the stream the caller passes (cuda_run_device); without
// QMOE_HAVE_CUDA they are refused with an error.
//
// bfloat16 has no NumPy dtype, so it crosses this boundary as uint16 bit patterns: a uint16 array is
// accepted wherever the spec says float16 or bfloat16 (the spec, not the array, says which), and
// bfloat16 results come back as uint16 arrays that the Python side views as ml_dtypes.bfloat16.
// DLPack producers with a real bfloat16 (torch) pass it as such.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "qmoe/checkpoint.h"
#include "qmoe/error.h"
#include "qmoe/layer.h"
#include "qmoe/onnx_model.h"
#include "qmoe/packed_file.h"
#include "qmoe/quantize.h"

#ifdef QMOE_HAVE_CUDA
#include <cuda_runtime.h>

#include "qmoe/cuda_backend.h"
#endif

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

template <class A> ArrayType array_type(const A& a) {
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

template <class A> Shape array_shape(const A& a) {
  Shape s(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) s[i] = int64_t(a.shape(i));
  return s;
}

// Views `a` as dtype `want`; a uint16 array stands for float16/bfloat16 bits. Anything else is an
// error naming the argument: qmoe never converts dtypes silently.
template <class A> TensorView view_as(const A& a, DType want, const std::string& name) {
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

// ---------------------------------------------------------------- run(): arrays from any DLPack producer
// run() takes its arrays as they come (NumPy, torch or any other producer, through DLPack or the
// buffer protocol, or a DLPack capsule), unconverted: nothing is copied behind the caller's back, so every mismatch (device, dtype,
// layout) is an error naming the argument instead of a silent conversion.
using InArray = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;

constexpr int kCpu = nb::device::cpu::value;
constexpr int kCuda = nb::device::cuda::value;
// make_backend() places a "cuda" layer on device 0 (CudaBackendOptions{0, ...}); the header offers no
// accessor for a layer's device, so the binding states it here.
constexpr int kLayerCudaDevice = 0;

std::string device_str(int type, int id) {
  if (type == kCpu) return "cpu";
  if (type == kCuda) return "cuda:" + std::to_string(id);
  if (type == nb::device::cuda_host::value) return "cuda_host (pinned)";
  if (type == nb::device::cuda_managed::value) return "cuda_managed:" + std::to_string(id);
  return "DLPack device type " + std::to_string(type) + ":" + std::to_string(id);
}

template <class A> std::string device_of(const A& a) { return device_str(a.device_type(), a.device_id()); }

// C-contiguous (row-major, dense) in the sense torch uses: dimensions of extent 1 may have any stride.
template <class A> void require_c_contiguous(const A& a, const std::string& name) {
  int64_t want = 1;
  bool ok = true;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) == 0) return;  // no elements, nothing to address
    if (a.shape(i) != 1 && a.stride(i) != want) ok = false;
    want *= int64_t(a.shape(i));
  }
  if (ok) return;
  std::string strides = "[";
  for (size_t i = 0; i < a.ndim(); ++i) strides += (i ? ", " : "") + std::to_string(a.stride(i));
  throw Error(name + ": expected a C-contiguous array, got shape " + shape_str(array_shape(a)) + " with strides " +
              strides + "] (elements); pass np.ascontiguousarray(a) or a.contiguous()");
}

// One run's arrays, checked against each other and the layer: one device for all, C-contiguous,
// the layer's dtype T. Shapes are validate_inputs()'s (called by the caller).
struct RunArrays {
  MoeInputs in;
  TensorView out;
  int device_type = kCpu;
  int device_id = 0;
};

template <class A> TensorView run_view(const A& a, DType t, const std::string& name, int device_type, int device_id,
                                       const std::string& x_device) {
  if (a.device_type() != device_type || a.device_id() != device_id)
    throw Error(name + ": on " + device_of(a) + ", but input is on " + x_device + " (all arrays of one run share a device)");
  require_c_contiguous(a, name);
  return view_as(a, t, name);
}

RunArrays run_arrays(const MoeSpec& spec, const std::string& backend, const InArray& x, const InArray& logits,
                     const std::optional<InArray>& rw, const OutArray& out) {
  RunArrays r;
  r.device_type = x.device_type();
  r.device_id = x.device_id();
  const std::string xd = device_of(x);
  const bool cuda_layer = backend == "cuda";
  if (r.device_type == kCuda) {
#ifndef QMOE_HAVE_CUDA
    throw Error("input: a CUDA array (" + xd + ") was given, but this qmoe was built without CUDA (QMOE_CUDA=OFF): "
                "its layers run on the host; move the arrays there (.cpu())");
#endif
    if (!cuda_layer)
      throw Error("input: a CUDA array (" + xd + ") was given to a layer on the '" + backend +
                  "' backend; move it to the host (.cpu()) or build the layer with backend='cuda'");
    if (r.device_id != kLayerCudaDevice)
      throw Error("input: on " + xd + ", but the layer's weights are on cuda:" + std::to_string(kLayerCudaDevice));
  } else if (r.device_type != kCpu) {
    throw Error("input: expected a host (cpu) or CUDA array, got one on " + xd);
  }
  const DType t = spec.act_dtype;
  r.in.input = run_view(x, t, "input", r.device_type, r.device_id, xd);
  r.in.router_probs = run_view(logits, t, "router_logits", r.device_type, r.device_id, xd);
  if (rw) r.in.router_weights = run_view(*rw, t, "router_weights", r.device_type, r.device_id, xd);
  validate_inputs(spec, r.in);
  r.out = run_view(out, t, "out", r.device_type, r.device_id, xd);
  if (r.out.shape != r.in.input.shape)
    throw Error("out: expected shape " + shape_str(r.in.input.shape) + " (the input's), got " + shape_str(r.out.shape));
  return r;
}

#ifdef QMOE_HAVE_CUDA
void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw Error(std::string("cuda: ") + what + ": " + cudaGetErrorString(e));
  }
}

// Makes `device` current for the scope (kernels launch on the calling thread's current device).
struct CudaDeviceScope {
  int prev = -1;
  explicit CudaDeviceScope(int device) {
    cuda_check(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~CudaDeviceScope() {
    int now = -1;
    if (prev >= 0 && cudaGetDevice(&now) == cudaSuccess && now != prev) cudaSetDevice(prev);
  }
};
#endif

// The Python-facing layer: a MoeLayer and where it came from.
struct PyLayer {
  std::unique_ptr<MoeLayer> layer;
  std::string source;  // "arrays", or the ONNX / packed / checkpoint path
  std::map<std::string, std::string> metadata;  // from_checkpoint: family, source names, notes
  // run() releases the GIL, so two Python threads may call it at once; backends keep per-layer
  // scratch state and are not promised to be re-entrant, so calls on one layer are serialized.
  // (Taken after the GIL is released, so a waiting thread never blocks Python.)
  std::mutex run_mutex;
#ifdef QMOE_HAVE_CUDA
  // Device runs (cuda_run_device) go on the caller's stream but share the backend's one workspace.
  // `last_run` is recorded after each: the next run's stream waits on it (GPU-side, no host sync),
  // and it is synchronized before the workspace is replaced or used by a host-array run.
  cudaEvent_t last_run = nullptr;
  bool last_run_recorded = false;
  int64_t reserved_rows = 0;

  ~PyLayer() {
    if (last_run) cudaEventDestroy(last_run);  // errors ignored: the context may already be gone at exit
  }

  void wait_device_runs() {
    if (last_run_recorded) cuda_check(cudaEventSynchronize(last_run), "waiting for the layer's previous run");
  }

  size_t reserve_locked(int64_t rows) {
    CudaDeviceScope scope(kLayerCudaDevice);
    wait_device_runs();  // the workspace about to be replaced may still be in use on some stream
    const size_t bytes = cuda_reserve_workspace(layer->backend(), layer->packed(), std::max<int64_t>(rows, 1));
    reserved_rows = std::max(reserved_rows, rows);
    return bytes;
  }

  void run_device(const MoeInputs& in, void* out, uintptr_t stream_handle) {
    const int64_t rows = input_rows(in);
    if (rows == 0) return;
    auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    CudaDeviceScope scope(kLayerCudaDevice);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    cuda_check(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
    const bool capturing = capture != cudaStreamCaptureStatusNone;
    if (rows > reserved_rows) {
      if (capturing)
        throw Error("run: " + std::to_string(rows) + " rows need a larger workspace, which cannot be allocated while "
                    "the stream is being captured; call layer.reserve(" + std::to_string(rows) +
                    ") (or run once) before capturing");
      reserve_locked(rows);
    }
    // Outside capture, order this run after the previous one (it may be on another stream). Under
    // capture, events from outside the graph cannot be waited on; the caller orders replays.
    if (!capturing && last_run_recorded) cuda_check(cudaStreamWaitEvent(stream, last_run, 0), "cudaStreamWaitEvent");
    CudaRunArgs args;
    args.input = in.input.data;
    args.router_probs = in.router_probs.data;
    args.router_weights = in.router_weights ? in.router_weights->data : nullptr;
    args.output = out;
    args.rows = rows;
    args.stream = stream;
    cuda_run_device(layer->backend(), layer->packed(), args);
    if (!capturing) {
      if (!last_run) cuda_check(cudaEventCreateWithFlags(&last_run, cudaEventDisableTiming), "cudaEventCreate");
      cuda_check(cudaEventRecord(last_run, stream), "cudaEventRecord");
      last_run_recorded = true;
    }
  }
#endif

  bool on_cuda() const { return layer->backend().name() == "cuda"; }

  // Writes the layer's output for (x, router_logits, router_weights) into `out` (same device, shape
  // and dtype as x). Host arrays run through MoeLayer::run (a cuda layer copies them in and out and
  // returns when done); CUDA arrays run on `stream` (a cudaStream_t as an integer) without any
  // allocation or host synchronization once the workspace is large enough.
  void run(const InArray& x, const InArray& router_logits, std::optional<InArray> router_weights, const OutArray& out,
           uintptr_t stream) {
    const std::string backend = layer->backend().name();
    RunArrays r = run_arrays(layer->spec(), backend, x, router_logits, router_weights, out);
    nb::gil_scoped_release unlocked;
    std::lock_guard<std::mutex> lock(run_mutex);
    if (r.device_type == kCpu) {
#ifdef QMOE_HAVE_CUDA
      if (on_cuda()) wait_device_runs();
#endif
      Tensor o = Tensor::wrap(r.out.dtype, r.out.shape, const_cast<void*>(r.out.data), nullptr);
      layer->run(r.in, o);
      return;
    }
#ifdef QMOE_HAVE_CUDA
    // The FC kernels copy input rows straight into shared memory with 16-byte cp.async when the
    // input is already fp16/bf16 (cuda_backend.cpp input_direct); cuda_backend.h does not state it,
    // so it is checked here for every dtype rather than faulting on an odd-offset view.
    if (reinterpret_cast<uintptr_t>(r.in.input.data) % 16 != 0)
      throw Error("input: device address is not 16-byte aligned (a view at an odd element offset?); pass a "
                  "freshly allocated or .clone()d tensor");
    run_device(r.in, const_cast<void*>(r.out.data), stream);
#else
    (void)stream;
#endif
  }

  // Grows a cuda layer's device workspace to `rows` tokens (for CUDA graph capture); 0 elsewhere.
  size_t reserve(int64_t rows) {
    if (rows < 0) throw Error("reserve: expected rows >= 0, got " + std::to_string(rows));
    if (!on_cuda()) return 0;
#ifdef QMOE_HAVE_CUDA
    nb::gil_scoped_release unlocked;
    std::lock_guard<std::mutex> lock(run_mutex);
    return reserve_locked(rows);
#else
    return 0;
#endif
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

PyLayer* make_layer(const MoeSpec& spec, const nb::dict& arrays, const LayerOptions& opt) {
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
    out->layer = std::make_unique<MoeLayer>(spec, std::move(raw), opt);
  }
  out->source = "arrays";
  return out.release();
}

PyLayer* layer_from_onnx(const std::string& path, const std::string& layout, const LayerOptions& lopt) {
  OnnxLoadOptions opt;
  if (layout == "detect") opt.layout = WeightsLayout::detect;
  else if (layout == "raw") opt.layout = WeightsLayout::raw;
  else if (layout == "ort_cuda") opt.layout = WeightsLayout::ort_cuda;
  else throw Error("layout: expected 'detect', 'raw' or 'ort_cuda', got '" + layout + "'");
  auto out = std::make_unique<PyLayer>();
  {
    nb::gil_scoped_release unlocked;
    OnnxLayer ol = load_onnx(path, opt);
    out->layer = std::make_unique<MoeLayer>(ol.spec, std::move(ol.raw), lopt);
  }
  out->source = path;
  return out.release();
}

// A packed file from `qmoe pack` (or save_packed), loaded without repacking. "auto" is make_backend's
// choice, as in `qmoe run`; a file packed for another backend is refused by load_packed, naming both
// layouts.
PyLayer* layer_from_packed(const std::string& path, const LayerOptions& opt) {
  auto out = std::make_unique<PyLayer>();
  {
    nb::gil_scoped_release unlocked;
    std::unique_ptr<Backend> b = make_backend(opt.backend, opt);
    std::unique_ptr<PackedExperts> packed = load_packed(path, *b);
    out->layer = std::make_unique<MoeLayer>(std::move(b), std::move(packed));
  }
  out->source = path;
  return out.release();
}

// One decoder layer of a Hugging Face checkpoint, quantized expert by expert (as `qmoe quantize`)
// and packed for the backend; nothing is written to disk.
PyLayer* layer_from_checkpoint(const std::string& path, int64_t layer_index, int bits, int64_t block_size,
                               bool symmetric, const std::string& dtype, const std::string& scale_dtype,
                               int swiglu_fusion, std::optional<int64_t> k, std::optional<bool> normalize,
                               const LayerOptions& lopt) {
  if (swiglu_fusion < 0 || swiglu_fusion > 2)
    throw Error("swiglu_fusion: expected 0, 1 or 2, got " + std::to_string(swiglu_fusion));
  CheckpointQuantizeOptions opt;
  opt.quant.bits = bits;
  opt.quant.block_size = block_size;
  opt.quant.symmetric = symmetric;
  opt.act_dtype = parse_dtype(dtype);
  opt.quant.scale_dtype = scale_dtype.empty() ? opt.act_dtype : parse_dtype(scale_dtype);
  opt.fusion = SwigluFusion(swiglu_fusion);
  opt.k = k;
  opt.normalize_routing_weights = normalize;
  auto out = std::make_unique<PyLayer>();
  {
    nb::gil_scoped_release unlocked;
    const CheckpointLayer L = open_checkpoint_layer(path, layer_index);
    checkpoint_spec(L, opt);  // unknown k / normalization and bad options fail before any quantization
    RawLayer raw = quantize_checkpoint_layer(L, opt);
    out->metadata = std::move(raw.metadata);
    out->layer = std::make_unique<MoeLayer>(raw.spec, std::move(raw.raw), lopt);
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

  // How a layer is built: backend, prepack, CPU threads, chunk rows and arithmetic, CUDA kernels (qmoe/layer.h).
  nb::class_<LayerOptions>(m, "_LayerOptions")
      .def(nb::init<>())
      .def_rw("backend", &LayerOptions::backend)
      .def_rw("prepack", &LayerOptions::prepack)
      .def_rw("threads", &LayerOptions::threads)
      .def_rw("chunk_rows", &LayerOptions::chunk_rows)
      .def_rw("cuda_gemm", &LayerOptions::cuda_gemm)
      .def_rw("cpu_compute", &LayerOptions::cpu_compute);

  nb::class_<PyLayer>(m, "_Layer")
      .def_static("from_arrays", &make_layer, "spec"_a, "arrays"_a, "options"_a, nb::rv_policy::take_ownership)
      .def_static("from_onnx", &layer_from_onnx, "path"_a, "layout"_a, "options"_a, nb::rv_policy::take_ownership)
      .def_static("from_packed", &layer_from_packed, "path"_a, "options"_a, nb::rv_policy::take_ownership)
      .def_static("from_checkpoint", &layer_from_checkpoint, "path"_a, "layer"_a, "bits"_a, "block_size"_a,
                  "symmetric"_a, "dtype"_a, "scale_dtype"_a, "swiglu_fusion"_a, "k"_a.none(),
                  "normalize_routing_weights"_a.none(), "options"_a, nb::rv_policy::take_ownership)
      .def("run", &PyLayer::run, "x"_a, "router_logits"_a, "router_weights"_a.none(), "out"_a, "stream"_a = 0)
      .def("reserve", &PyLayer::reserve, "rows"_a)
      .def(
          "save_packed",
          [](const PyLayer& l, const std::string& path) {
            nb::gil_scoped_release unlocked;
            save_packed(path, l.layer->packed(), "qmoe python");
          },
          "path"_a)
      .def_prop_ro("spec", [](const PyLayer& l) { return l.layer->spec(); })
      .def_prop_ro("backend", [](PyLayer& l) { return l.layer->backend().name(); })
      .def_prop_ro("layout", [](const PyLayer& l) { return l.layer->packed().tag().to_string(); })
      .def_prop_ro("resident_bytes", [](const PyLayer& l) { return l.layer->packed().resident_bytes(); })
      .def_ro("source", &PyLayer::source)
      .def_ro("metadata", &PyLayer::metadata);

  m.def("quantize", &quantize, "w"_a, "w_dtype"_a, "bits"_a, "block_size"_a, "symmetric"_a, "scale_dtype"_a);
  m.def("dequantize", &dequantize, "weights"_a, "scales"_a, "scale_dtype"_a, "zero_points"_a.none(), "bits"_a,
        "block_size"_a);
  m.def("available_backends", &available_backends);
#ifdef QMOE_HAVE_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
