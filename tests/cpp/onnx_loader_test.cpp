// ONNX loader: builds small QMoE models with the generated protobuf classes (inline raw_data, typed
// fields, external data; row-wise and block-wise; optional inputs; ORT CUDA layout) and checks the
// loaded spec and raw tensors byte for byte, then one test per malformed-file case checking the error.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>

#include "qmoe/error.h"
#include "qmoe/onnx_model.h"
#include "qmoe/ort_cuda_layout.h"
#include "qmoe/raw_experts.h"
#include "qmoe_onnx/onnx.pb.h"

using namespace qmoe;
namespace fs = std::filesystem;
namespace pb = ::qmoe_onnx;

namespace {

// How an initializer's bytes are stored in the model.
enum class Storage { raw_data, typed, external, external_unaligned };

int onnx_type(DType t) {
  switch (t) {
    case DType::f32: return pb::TensorProto::FLOAT;
    case DType::f16: return pb::TensorProto::FLOAT16;
    case DType::bf16: return pb::TensorProto::BFLOAT16;
    case DType::u8: return pb::TensorProto::UINT8;
  }
  return 0;
}

// Deterministic contents for every tensor of a spec (bytes for weights/zero points, small floats for
// scales and biases); the loader must hand back exactly these bytes.
RawExperts make_raw(const MoeSpec& s, uint32_t seed) {
  std::mt19937 rng(seed);
  auto bytes = [&](const Shape& shape) {
    Tensor t(DType::u8, shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.data_as<uint8_t>()[i] = uint8_t(rng());
    return t;
  };
  auto floats = [&](DType dt, const Shape& shape) {
    Tensor t(dt, shape);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (int64_t i = 0; i < t.numel(); ++i) store_from_float(dt, t.data(), i, u(rng));
    return t;
  };
  auto matrix = [&](Fc fc, bool bias, bool zp) {
    RawMatrix m;
    m.weights = bytes(raw_weight_shape(s, fc));
    m.scales = floats(s.scale_dtype, raw_scale_shape(s, fc));
    if (bias) m.bias = floats(s.act_dtype, raw_bias_shape(s, fc));
    if (zp) m.zero_points = bytes(raw_zero_point_shape(s, fc));
    return m;
  };
  RawExperts r;
  r.fc1 = matrix(Fc::fc1, s.fc1_bias, s.fc1_zero_points);
  r.fc2 = matrix(Fc::fc2, s.fc2_bias, s.fc2_zero_points);
  if (s.has_fc3()) r.fc3 = matrix(Fc::fc3, s.fc3_bias, s.fc3_zero_points);
  return r;
}

// Builds a one-node QMoE model. Inputs are addressed by the operator's input index; tensors become
// initializers stored as `storage` says.
class ModelBuilder {
 public:
  explicit ModelBuilder(fs::path dir) : dir_(std::move(dir)) {
    m_.set_ir_version(9);
    auto* op = m_.add_opset_import();
    op->set_domain("");
    op->set_version(17);
    op = m_.add_opset_import();
    op->set_domain("com.microsoft");
    op->set_version(1);
    g_ = m_.mutable_graph();
    g_->set_name("qmoe_test");
    node_ = g_->add_node();
    node_->set_name("moe0");
    node_->set_op_type("QMoE");
    node_->set_domain("com.microsoft");
    node_->add_output("out");
  }

  pb::ModelProto& model() { return m_; }
  pb::NodeProto& node() { return *node_; }

  void set_input(int index, const std::string& name) {
    while (node_->input_size() <= index) node_->add_input("");
    node_->set_input(index, name);
  }
  // A runtime tensor declared in graph.input / graph.output: elem type and dims (-1 = symbolic).
  void declare(const std::string& name, int elem, const std::vector<int64_t>& dims, bool output = false) {
    pb::ValueInfoProto* vi = output ? g_->add_output() : g_->add_input();
    vi->set_name(name);
    auto* tt = vi->mutable_type()->mutable_tensor_type();
    tt->set_elem_type(elem);
    for (int64_t d : dims) {
      auto* dim = tt->mutable_shape()->add_dim();
      if (d < 0)
        dim->set_dim_param("rows");
      else
        dim->set_dim_value(d);
    }
  }
  pb::TensorProto* add_initializer(const std::string& name, const Tensor& t, Storage storage) {
    pb::TensorProto* p = g_->add_initializer();
    p->set_name(name);
    p->set_data_type(onnx_type(t.dtype()));
    for (int64_t d : t.shape()) p->add_dims(d);
    const auto* b = static_cast<const char*>(t.data());
    switch (storage) {
      case Storage::raw_data: p->set_raw_data(b, t.nbytes()); break;
      case Storage::typed:
        for (int64_t i = 0; i < t.numel(); ++i) {
          if (t.dtype() == DType::f32)
            p->add_float_data(t.data_as<float>()[i]);
          else if (t.dtype() == DType::u8)
            p->add_int32_data(t.data_as<uint8_t>()[i]);
          else
            p->add_int32_data(t.data_as<uint16_t>()[i]);
        }
        break;
      case Storage::external:
      case Storage::external_unaligned: {
        // Append to weights.bin; aligned offsets let the loader map the bytes without copying,
        // unaligned ones force its copy path.
        const size_t align = storage == Storage::external ? 4096 : 1;
        size_t off = (ext_.size() + align - 1) / align * align;
        if (storage == Storage::external_unaligned) off += 3;
        ext_.resize(off, '\0');
        ext_.append(b, t.nbytes());
        p->set_data_location(pb::TensorProto::EXTERNAL);
        add_kv(p, "location", "weights.bin");
        add_kv(p, "offset", std::to_string(off));
        add_kv(p, "length", std::to_string(t.nbytes()));
        break;
      }
    }
    return p;
  }
  static void add_kv(pb::TensorProto* p, const std::string& k, const std::string& v) {
    auto* kv = p->add_external_data();
    kv->set_key(k);
    kv->set_value(v);
  }
  void attr_int(const std::string& name, int64_t v) {
    auto* a = node_->add_attribute();
    a->set_name(name);
    a->set_type(pb::AttributeProto::INT);
    a->set_i(v);
  }
  void attr_float(const std::string& name, float v) {
    auto* a = node_->add_attribute();
    a->set_name(name);
    a->set_type(pb::AttributeProto::FLOAT);
    a->set_f(v);
  }
  void attr_string(const std::string& name, const std::string& v) {
    auto* a = node_->add_attribute();
    a->set_name(name);
    a->set_type(pb::AttributeProto::STRING);
    a->set_s(v);
  }
  void remove_attr(const std::string& name) {
    auto* attrs = node_->mutable_attribute();
    for (int i = 0; i < attrs->size(); ++i)
      if (attrs->Get(i).name() == name) {
        attrs->erase(attrs->begin() + i);
        return;
      }
  }
  pb::TensorProto* initializer(const std::string& name) {
    for (auto& t : *g_->mutable_initializer())
      if (t.name() == name) return &t;
    return nullptr;
  }
  void remove_initializer(const std::string& name) {
    auto* inits = g_->mutable_initializer();
    for (int i = 0; i < inits->size(); ++i)
      if (inits->Get(i).name() == name) {
        inits->erase(inits->begin() + i);
        return;
      }
  }

  std::string save(const std::string& name = "model.onnx") {
    if (!ext_.empty()) {
      std::ofstream f(dir_ / "weights.bin", std::ios::binary);
      f.write(ext_.data(), std::streamsize(ext_.size()));
    }
    const std::string path = (dir_ / name).string();
    std::ofstream f(path, std::ios::binary);
    const std::string bytes = m_.SerializeAsString();
    f.write(bytes.data(), std::streamsize(bytes.size()));
    return path;
  }

 private:
  fs::path dir_;
  pb::ModelProto m_;
  pb::GraphProto* g_ = nullptr;
  pb::NodeProto* node_ = nullptr;
  std::string ext_;
};

// What a test model holds, so each test can tweak one thing.
struct Layer {
  MoeSpec spec;
  RawExperts raw;
  Storage storage = Storage::raw_data;
  bool write_attrs = true;
  bool declare_io = true;
};

Layer default_layer() {
  Layer l;
  l.spec.num_experts = 4;
  l.spec.hidden = 32;
  l.spec.inter = 16;
  l.spec.k = 2;
  l.spec.fc1_bias = l.spec.fc2_bias = true;
  l.raw = make_raw(l.spec, 1);
  return l;
}

// Writes every attribute of the spec (explicitly, even defaults) and every tensor as an initializer.
void build(ModelBuilder& b, const Layer& l) {
  const MoeSpec& s = l.spec;
  b.set_input(0, "x");
  b.set_input(1, "router_probs");
  if (l.declare_io) {
    b.declare("x", onnx_type(s.act_dtype), {-1, s.hidden});
    b.declare("router_probs", onnx_type(s.act_dtype), {-1, s.num_experts});
    b.declare("out", onnx_type(s.act_dtype), {-1, s.hidden}, /*output=*/true);
  }
  auto put = [&](int idx, const std::string& name, const Tensor& t) {
    b.set_input(idx, name);
    b.add_initializer(name, t, l.storage);
  };
  auto put_matrix = [&](const RawMatrix& m, const std::string& p, int w, int sc, int bias, int zp) {
    put(w, p + ".weight", m.weights);
    put(sc, p + ".scales", m.scales);
    if (m.bias) put(bias, p + ".bias", *m.bias);
    if (m.zero_points) put(zp, p + ".zp", *m.zero_points);
  };
  put_matrix(l.raw.fc1, "fc1", 2, 3, 4, 11);
  put_matrix(l.raw.fc2, "fc2", 5, 6, 7, 12);
  if (l.raw.fc3) put_matrix(*l.raw.fc3, "fc3", 8, 9, 10, 13);
  if (l.write_attrs) {
    b.attr_int("k", s.k);
    b.attr_string("activation_type", std::string(activation_name(s.activation)));
    b.attr_int("normalize_routing_weights", s.normalize_routing_weights);
    b.attr_int("use_sparse_mixer", s.use_sparse_mixer);
    b.attr_int("expert_weight_bits", s.bits);
    if (s.block_size) b.attr_int("block_size", s.block_size);
    b.attr_int("swiglu_fusion", int(s.swiglu_fusion));
    if (std::isfinite(s.swiglu_limit)) b.attr_float("swiglu_limit", s.swiglu_limit);
    b.attr_float("activation_alpha", s.activation_alpha);
    b.attr_float("activation_beta", s.activation_beta);
    b.attr_string("quant_type", "int");
    b.attr_int("weights_prepacked", 0);
  }
}

void expect_same_tensor(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_FALSE(a.empty()) << what;
  ASSERT_FALSE(b.empty()) << what;
  EXPECT_EQ(a.dtype(), b.dtype()) << what;
  ASSERT_EQ(a.shape(), b.shape()) << what;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.nbytes()), 0) << what << ": bytes differ";
}

void expect_same_matrix(const RawMatrix& a, const RawMatrix& b, const std::string& p) {
  expect_same_tensor(a.weights, b.weights, p + " weights");
  expect_same_tensor(a.scales, b.scales, p + " scales");
  ASSERT_EQ(bool(a.bias), bool(b.bias)) << p;
  if (a.bias) expect_same_tensor(*a.bias, *b.bias, p + " bias");
  ASSERT_EQ(bool(a.zero_points), bool(b.zero_points)) << p;
  if (a.zero_points) expect_same_tensor(*a.zero_points, *b.zero_points, p + " zero points");
}

void expect_same_spec(const MoeSpec& a, const MoeSpec& b) {
  EXPECT_EQ(a.to_string(), b.to_string());
  EXPECT_EQ(a.num_experts, b.num_experts);
  EXPECT_EQ(a.hidden, b.hidden);
  EXPECT_EQ(a.inter, b.inter);
  EXPECT_EQ(a.k, b.k);
  EXPECT_EQ(a.bits, b.bits);
  EXPECT_EQ(a.block_size, b.block_size);
  EXPECT_EQ(a.activation, b.activation);
  EXPECT_EQ(a.swiglu_fusion, b.swiglu_fusion);
  EXPECT_EQ(float_to_bits(a.swiglu_limit), float_to_bits(b.swiglu_limit));
  EXPECT_EQ(a.activation_alpha, b.activation_alpha);
  EXPECT_EQ(a.activation_beta, b.activation_beta);
  EXPECT_EQ(a.normalize_routing_weights, b.normalize_routing_weights);
  EXPECT_EQ(a.use_sparse_mixer, b.use_sparse_mixer);
  EXPECT_EQ(a.act_dtype, b.act_dtype);
  EXPECT_EQ(a.scale_dtype, b.scale_dtype);
  EXPECT_EQ(a.fc1_bias, b.fc1_bias);
  EXPECT_EQ(a.fc2_bias, b.fc2_bias);
  EXPECT_EQ(a.fc3_bias, b.fc3_bias);
  EXPECT_EQ(a.fc1_zero_points, b.fc1_zero_points);
  EXPECT_EQ(a.fc2_zero_points, b.fc2_zero_points);
  EXPECT_EQ(a.fc3_zero_points, b.fc3_zero_points);
}

class OnnxLoaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("qmoe_onnx_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "m");
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Models live in dir_/m so tests can place files next to (outside) the model folder.
  fs::path mdir() const { return dir_ / "m"; }

  // Builds `l`, lets `tweak` edit the model, saves and loads it.
  OnnxLayer roundtrip(const Layer& l, const std::function<void(ModelBuilder&)>& tweak = {},
                      const OnnxLoadOptions& opt = {}) {
    ModelBuilder b(mdir());
    build(b, l);
    if (tweak) tweak(b);
    return load_onnx(b.save(), opt);
  }

  void check_loads_back(const Layer& l) {
    OnnxLayer got = roundtrip(l);
    expect_same_spec(got.spec, l.spec);
    expect_same_matrix(got.raw.fc1, l.raw.fc1, "fc1");
    expect_same_matrix(got.raw.fc2, l.raw.fc2, "fc2");
    ASSERT_EQ(bool(got.raw.fc3), bool(l.raw.fc3));
    if (l.raw.fc3) expect_same_matrix(*got.raw.fc3, *l.raw.fc3, "fc3");
    EXPECT_EQ(got.node_name, "moe0");
    EXPECT_EQ(got.input_name, "x");
    EXPECT_EQ(got.router_probs_name, "router_probs");
    EXPECT_EQ(got.output_name, "out");
  }

  // Expects loading to fail with a message that names the file and contains every needle.
  void expect_error(const Layer& l, const std::function<void(ModelBuilder&)>& tweak,
                    std::vector<std::string> needles, const OnnxLoadOptions& opt = {}) {
    try {
      OnnxLayer got = roundtrip(l, tweak, opt);
      FAIL() << "expected an error containing '" << needles.front() << "', loaded " << got.spec.to_string();
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("model.onnx"), std::string::npos) << "message lacks the file name: " << msg;
      for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "missing '" << n << "' in: " << msg;
    }
  }
  void expect_file_error(const std::string& path, const std::string& needle) {
    try {
      load_onnx(path);
      FAIL() << "expected an error containing '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }

  fs::path dir_;
};

// ---- models that load -------------------------------------------------------------------------

TEST_F(OnnxLoaderTest, InlineRawDataRowWise) { check_loads_back(default_layer()); }

TEST_F(OnnxLoaderTest, TypedFieldsEveryDtype) {
  for (DType t : {DType::f32, DType::f16, DType::bf16}) {
    for (DType t2 : {DType::f32, DType::f16, DType::bf16}) {
      SCOPED_TRACE(std::string(dtype_name(t)) + "/" + std::string(dtype_name(t2)));
      Layer l = default_layer();
      l.spec.act_dtype = t;
      l.spec.scale_dtype = t2;
      l.spec.fc1_zero_points = true;
      l.raw = make_raw(l.spec, 2);
      l.storage = Storage::typed;
      check_loads_back(l);
    }
  }
}

TEST_F(OnnxLoaderTest, ExternalDataBlockWiseSwigluFused) {
  for (Storage st : {Storage::external, Storage::external_unaligned}) {
    for (SwigluFusion f : {SwigluFusion::interleaved, SwigluFusion::concatenated}) {
      SCOPED_TRACE(int(f));
      Layer l = default_layer();
      l.spec.hidden = 64;
      l.spec.inter = 48;
      l.spec.block_size = 16;
      l.spec.activation = Activation::swiglu;
      l.spec.swiglu_fusion = f;
      l.spec.swiglu_limit = 7.0f;
      l.spec.activation_alpha = 1.702f;
      l.spec.activation_beta = 1.0f;
      l.spec.act_dtype = l.spec.scale_dtype = DType::f16;
      l.spec.fc1_zero_points = l.spec.fc2_zero_points = true;
      l.raw = make_raw(l.spec, 3);
      l.storage = st;
      check_loads_back(l);
    }
  }
}

TEST_F(OnnxLoaderTest, SwigluSeparateFc3AndOptionalInputsByEmptyName) {
  Layer l = default_layer();
  l.spec.activation = Activation::swiglu;
  l.spec.bits = 8;
  l.spec.fc1_bias = false;  // input 4 stays an empty name between given inputs
  l.spec.fc3_bias = true;
  l.spec.fc3_zero_points = true;
  l.spec.block_size = 16;
  l.raw = make_raw(l.spec, 4);
  check_loads_back(l);
  // router_weights (input 14) after empty zero-point slots.
  OnnxLayer got = roundtrip(l, [](ModelBuilder& b) { b.set_input(14, "rw"); });
  EXPECT_EQ(got.router_weights_name, "rw");
  EXPECT_FALSE(got.raw.fc1.bias);
  EXPECT_TRUE(got.raw.fc3->zero_points);
}

TEST_F(OnnxLoaderTest, TwoBitAndRowWiseScalesAsEN1) {
  Layer l = default_layer();
  l.spec.bits = 2;
  l.spec.fc2_zero_points = true;
  l.raw = make_raw(l.spec, 5);
  check_loads_back(l);
  // Row-wise scales spelled [E, N, 1] with a block_size attribute: still row-wise (contract §5.2).
  l.raw.fc1.scales = l.raw.fc1.scales.reshaped({4, 16, 1});
  OnnxLayer got = roundtrip(l, [](ModelBuilder& b) { b.attr_int("block_size", 64); });
  EXPECT_EQ(got.spec.block_size, 0);
  EXPECT_EQ(got.raw.fc1.scales.shape(), (Shape{4, 16, 1}));
}

TEST_F(OnnxLoaderTest, AttributeDefaults) {
  Layer l = default_layer();
  l.spec.k = 1;
  l.write_attrs = false;
  OnnxLayer got = roundtrip(l);
  const MoeSpec& s = got.spec;
  EXPECT_EQ(s.k, 1);
  EXPECT_EQ(s.activation, Activation::relu);
  EXPECT_FALSE(s.normalize_routing_weights);
  EXPECT_FALSE(s.use_sparse_mixer);
  EXPECT_EQ(s.bits, 4);
  EXPECT_EQ(s.block_size, 0);
  EXPECT_EQ(s.swiglu_fusion, SwigluFusion::separate);
  EXPECT_TRUE(std::isinf(s.swiglu_limit) && s.swiglu_limit > 0);
  EXPECT_EQ(s.activation_alpha, 1.0f);
  EXPECT_EQ(s.activation_beta, 0.0f);
  EXPECT_EQ(s.act_dtype, DType::f32);
  // Attribute set, as written by old exporters without the `type` field (IR < 4).
  got = roundtrip(l, [](ModelBuilder& b) {
    auto* a = b.node().add_attribute();
    a->set_name("k");
    a->set_i(3);
    auto* n = b.node().add_attribute();
    n->set_name("normalize_routing_weights");
    n->set_i(1);
  });
  EXPECT_EQ(got.spec.k, 3);
  EXPECT_TRUE(got.spec.normalize_routing_weights);
}

TEST_F(OnnxLoaderTest, AttributesReachTheSpec) {
  Layer l = default_layer();
  l.spec.k = 2;
  l.spec.use_sparse_mixer = true;
  l.spec.normalize_routing_weights = true;
  l.spec.activation = Activation::gelu;
  check_loads_back(l);
  l.spec.activation = Activation::identity;
  l.spec.use_sparse_mixer = false;
  l.spec.bits = 8;
  l.raw = make_raw(l.spec, 6);
  check_loads_back(l);
}

TEST_F(OnnxLoaderTest, TypeRuleFallsBackToBiasWhenIoIsUndeclared) {
  Layer l = default_layer();
  l.spec.act_dtype = DType::bf16;
  l.raw = make_raw(l.spec, 7);
  l.declare_io = false;
  EXPECT_EQ(roundtrip(l).spec.act_dtype, DType::bf16);
  // Declared router_probs alone decides when the input is not declared.
  l.spec.act_dtype = DType::f16;
  l.raw = make_raw(l.spec, 7);
  OnnxLayer got = roundtrip(l, [](ModelBuilder& b) { b.declare("router_probs", pb::TensorProto::FLOAT16, {-1, 4}); });
  EXPECT_EQ(got.spec.act_dtype, DType::f16);
}

// ---- ORT CUDA layout (contract §7) ------------------------------------------------------------------

// H = 128, I = 64 (K multiples of 64, N multiples of 16 as the layout needs); fc1/fc2 stored as ORT's
// CUDA EP expects them, declared [E, K, N/pack].
Layer cuda_layer(int bits, int64_t H, int64_t I) {
  Layer l;
  l.spec.num_experts = 2;
  l.spec.hidden = H;
  l.spec.inter = I;
  l.spec.bits = bits;
  l.spec.block_size = 64;
  l.spec.fc2_bias = true;
  l.raw = make_raw(l.spec, 8);
  return l;
}

void to_cuda(ModelBuilder& b, const Layer& l, int prepacked) {
  const MoeSpec& s = l.spec;
  Tensor c1 = raw_to_ort_cuda(l.raw.fc1.weights, s.fc1_rows(), s.hidden, s.bits);
  Tensor c2 = raw_to_ort_cuda(l.raw.fc2.weights, s.hidden, s.inter, s.bits);
  b.remove_initializer("fc1.weight");
  b.remove_initializer("fc2.weight");
  b.add_initializer("fc1.weight", c1, Storage::raw_data);
  b.add_initializer("fc2.weight", c2, Storage::raw_data);
  b.remove_attr("weights_prepacked");
  if (prepacked != -1) b.attr_int("weights_prepacked", prepacked);
}

TEST_F(OnnxLoaderTest, OrtCudaLayoutDetectedFromShapes) {
  for (int bits : {4, 8}) {
    SCOPED_TRACE(bits);
    Layer l = cuda_layer(bits, 128, 64);
    for (int prepacked : {-1, 1}) {
      OnnxLayer got = roundtrip(l, [&](ModelBuilder& b) { to_cuda(b, l, prepacked); });
      expect_same_spec(got.spec, l.spec);
      expect_same_matrix(got.raw.fc1, l.raw.fc1, "fc1");
      expect_same_matrix(got.raw.fc2, l.raw.fc2, "fc2");
    }
    // Raw bytes with the default attribute are detected as raw from their shape.
    OnnxLayer got = roundtrip(l, [](ModelBuilder& b) { b.remove_attr("weights_prepacked"); });
    expect_same_matrix(got.raw.fc1, l.raw.fc1, "fc1");
  }
}

TEST_F(OnnxLoaderTest, OrtCudaLayoutAmbiguousWhenHEqualsI) {
  Layer l = cuda_layer(4, 64, 64);
  auto tweak = [&](ModelBuilder& b) { to_cuda(b, l, -1); };
  expect_error(l, tweak, {"cannot tell the weights layout", "H == I == 64", "--weights-layout raw|ort-cuda"});
  OnnxLoadOptions opt;
  opt.layout = WeightsLayout::ort_cuda;
  OnnxLayer got = roundtrip(l, tweak, opt);
  expect_same_matrix(got.raw.fc1, l.raw.fc1, "fc1");
  expect_same_matrix(got.raw.fc2, l.raw.fc2, "fc2");
  // The same file read as raw loads without error, with different (the stored) bytes.
  opt.layout = WeightsLayout::raw;
  got = roundtrip(l, tweak, opt);
  EXPECT_NE(std::memcmp(got.raw.fc1.weights.data(), l.raw.fc1.weights.data(), l.raw.fc1.weights.nbytes()), 0);
  // weights_prepacked = 0 says raw: no ambiguity, and a contradicting option is refused.
  got = roundtrip(l, [&](ModelBuilder& b) { to_cuda(b, l, 0); });
  EXPECT_EQ(got.spec.hidden, 64);
  opt.layout = WeightsLayout::ort_cuda;
  expect_error(l, [&](ModelBuilder& b) { to_cuda(b, l, 0); }, {"weights_prepacked = 0 declares raw"}, opt);
}

TEST_F(OnnxLoaderTest, OrtCudaLayoutErrors) {
  Layer l = cuda_layer(4, 128, 64);
  // weights_prepacked = 0 with CUDA-shaped bytes: the raw shape check names the tensor.
  expect_error(l, [&](ModelBuilder& b) { to_cuda(b, l, 0); },
               {"fc1_experts_weights: expected shape [2, 64, 64], got [2, 128, 32]"});
  // Option ort_cuda on raw-shaped weights.
  OnnxLoadOptions opt;
  opt.layout = WeightsLayout::ort_cuda;
  auto no_attr = [](ModelBuilder& b) { b.remove_attr("weights_prepacked"); };
  expect_error(l, no_attr, {"ORT CUDA layout: fc1 [2, 128, 32], fc2 [2, 64, 64]", "got fc1_experts_weights [2, 64, 64]"},
               opt);
  // Neither layout fits.
  expect_error(l, [](ModelBuilder& b) {
    b.remove_initializer("fc2.weight");
    b.add_initializer("fc2.weight", Tensor(DType::u8, {2, 128, 31}), Storage::raw_data);
    b.remove_attr("weights_prepacked");
  }, {"fit neither the raw layout", "fc2_experts_weights [2, 128, 31]"});
  // A shape the CUDA layout cannot hold (K = H = 32 is not a multiple of 64) is reported by the converter.
  Layer small = cuda_layer(4, 32, 16);
  small.spec.block_size = 16;
  small.raw = make_raw(small.spec, 9);
  expect_error(small, [&](ModelBuilder& b) {
    b.remove_initializer("fc1.weight");
    b.remove_initializer("fc2.weight");
    b.add_initializer("fc1.weight", Tensor(DType::u8, {2, 32, 8}), Storage::raw_data);
    b.add_initializer("fc2.weight", Tensor(DType::u8, {2, 16, 16}), Storage::raw_data);
    b.remove_attr("weights_prepacked");
  }, {"fc1_experts_weights (ORT CUDA layout)"});
}

// ---- malformed files ----------------------------------------------------------------------------

TEST_F(OnnxLoaderTest, NotOnnxTruncatedEmptyMissing) {
  const std::string p = (mdir() / "model.onnx").string();
  {
    std::ofstream f(p, std::ios::binary);
    f << "this is not a protobuf \xff\xff\xff\xff\xff";
  }
  expect_file_error(p, "not a valid ONNX model");
  { std::ofstream f(p, std::ios::binary); }
  expect_file_error(p, "not an ONNX model (no graph");
  // A serialized model cut in the middle of the weights.
  ModelBuilder b(mdir());
  build(b, default_layer());
  const std::string bytes = b.model().SerializeAsString();
  for (size_t cut : {bytes.size() / 2, bytes.size() - 1, size_t(3)}) {
    SCOPED_TRACE(cut);
    {
      std::ofstream f(p, std::ios::binary);
      f.write(bytes.data(), std::streamsize(cut));
    }
    expect_file_error(p, "model.onnx");
  }
  expect_file_error((mdir() / "nope.onnx").string(), "cannot open");
  expect_file_error(mdir().string(), "not a regular file");
}

TEST_F(OnnxLoaderTest, GraphMustBeOneQMoENode) {
  const Layer l = default_layer();
  expect_error(l, [](ModelBuilder& b) { b.node().set_op_type("MoE"); },
               {"expected operator com.microsoft::QMoE, found com.microsoft::MoE"});
  expect_error(l, [](ModelBuilder& b) { b.node().set_domain(""); },
               {"expected operator com.microsoft::QMoE, found ai.onnx::QMoE"});
  expect_error(l, [](ModelBuilder& b) { b.node().set_domain("com.example"); }, {"found com.example::QMoE"});
  expect_error(l, [](ModelBuilder& b) {
    auto* n = b.model().mutable_graph()->add_node();
    n->set_op_type("Relu");
    n->add_input("out");
    n->add_output("y");
  }, {"exactly one node", "found 2 nodes", "com.microsoft::QMoE, ai.onnx::Relu"});
  expect_error(l, [](ModelBuilder& b) { b.model().mutable_graph()->clear_node(); }, {"found 0 nodes"});
  expect_error(l, [](ModelBuilder& b) { b.node().clear_output(); }, {"no output"});
}

TEST_F(OnnxLoaderTest, InputsMissingOrUnsupported) {
  const Layer l = default_layer();
  expect_error(l, [](ModelBuilder& b) { b.set_input(3, ""); }, {"required input 3 (fc1_scales) is missing"});
  expect_error(l, [](ModelBuilder& b) { b.set_input(1, ""); }, {"required input 1 (router_probs)"});
  expect_error(l, [](ModelBuilder& b) { b.remove_initializer("fc2.scales"); },
               {"fc2_scales: 'fc2.scales' is not an initializer"});
  expect_error(l, [](ModelBuilder& b) { b.set_input(5, "fc2_w_typo"); }, {"fc2_experts_weights: 'fc2_w_typo'"});
  expect_error(l, [](ModelBuilder& b) { b.set_input(17, "act_scale"); },
               {"input 17 (fc1_act_scale) is given", "quant_type 'int' only"});
  expect_error(l, [](ModelBuilder& b) { b.set_input(21, "x22"); }, {"22 inputs", "at most 21"});
  expect_error(l, [](ModelBuilder& b) { b.set_input(9, "fc1.scales"); },
               {"fc3_scales: given ('fc1.scales') without fc3_experts_weights"});
  expect_error(l, [](ModelBuilder& b) {
    auto* s = b.model().mutable_graph()->add_sparse_initializer();
    s->mutable_values()->set_name("sparse_zp");
    b.set_input(11, "sparse_zp");
  }, {"fc1_zero_points: 'sparse_zp' is a sparse initializer"});
  expect_error(l, [](ModelBuilder& b) {
    auto* t = b.model().mutable_graph()->add_initializer();
    t->set_name("fc1.weight");
  }, {"initializer 'fc1.weight' is defined twice"});
}

TEST_F(OnnxLoaderTest, WrongDtypeOrShape) {
  const Layer l = default_layer();
  expect_error(l, [](ModelBuilder& b) { b.initializer("fc1.weight")->set_data_type(pb::TensorProto::INT8); },
               {"fc1_experts_weights ('fc1.weight')", "element type INT8"});
  expect_error(l, [](ModelBuilder& b) {
    b.remove_initializer("fc2.weight");
    b.add_initializer("fc2.weight", Tensor(DType::f16, {4, 32, 4}), Storage::raw_data);
  }, {"fc2_experts_weights: expected dtype uint8, got float16"});
  expect_error(l, [](ModelBuilder& b) {
    b.remove_initializer("fc1.scales");
    b.add_initializer("fc1.scales", Tensor(DType::u8, {4, 16}), Storage::raw_data);
  }, {"fc1_scales: expected dtype float32, float16 or bfloat16, got uint8"});
  expect_error(l, [](ModelBuilder& b) {
    b.remove_initializer("fc2.scales");
    b.add_initializer("fc2.scales", Tensor(DType::f16, {4, 32}), Storage::raw_data);
  }, {"fc2_scales: expected dtype float32, got float16"});
  expect_error(l, [](ModelBuilder& b) {
    b.remove_initializer("fc1.bias");
    b.add_initializer("fc1.bias", Tensor(DType::f32, {4, 15}), Storage::raw_data);
  }, {"fc1_experts_bias: expected shape [4, 16], got [4, 15]"});
  expect_error(l, [](ModelBuilder& b) {
    b.remove_initializer("fc1.weight");
    b.add_initializer("fc1.weight", Tensor(DType::u8, {4, 16}), Storage::raw_data);
  }, {"fc1_experts_weights: expected a 3-D tensor, got shape [4, 16]"});
  expect_error(l, [](ModelBuilder& b) {
    b.remove_initializer("fc2.scales");
    b.add_initializer("fc2.scales", Tensor(DType::f32, {4}), Storage::raw_data);
  }, {"fc2_scales: expected shape [E, N] or [E, N, blocks], got [4]"});
  // Byte counts that disagree with the declared dims.
  expect_error(l, [](ModelBuilder& b) { b.initializer("fc1.weight")->mutable_raw_data()->pop_back(); },
               {"raw_data has 1023 bytes", "needs 1024"});
  expect_error(l, [](ModelBuilder& b) { b.initializer("fc1.weight")->add_dims(1 << 30); }, {"raw_data has"});
  expect_error(l, [](ModelBuilder& b) { b.initializer("fc1.weight")->set_dims(0, -4); }, {"negative dimension"});
  expect_error(l, [](ModelBuilder& b) {
    auto* t = b.initializer("fc1.weight");
    for (int i = 0; i < 4; ++i) t->add_dims(int64_t(1) << 40);
  }, {"too many elements"});
  expect_error(l, [](ModelBuilder& b) { b.initializer("fc1.weight")->add_int32_data(3); },
               {"both raw_data and typed data"});
  expect_error(l, [](ModelBuilder& b) { b.initializer("fc1.weight")->mutable_segment()->set_begin(0); },
               {"segmented"});
  // Typed fields: wrong count, out-of-range values, wrong field for the type.
  Layer t = default_layer();
  t.storage = Storage::typed;
  expect_error(t, [](ModelBuilder& b) { b.initializer("fc1.scales")->add_float_data(1.f); },
               {"float_data has 65 values", "needs 64"});
  expect_error(t, [](ModelBuilder& b) { b.initializer("fc1.weight")->set_int32_data(5, 256); },
               {"int32_data[5] = 256 is out of range for uint8"});
  expect_error(t, [](ModelBuilder& b) { b.initializer("fc1.weight")->add_int64_data(1); },
               {"stores its values in int64_data"});
  expect_error(t, [](ModelBuilder& b) { b.initializer("fc1.weight")->clear_int32_data(); },
               {"int32_data has 0 values"});
}

TEST_F(OnnxLoaderTest, BadAttributeValues) {
  const Layer l = default_layer();
  auto replace_int = [](const std::string& name, int64_t v) {
    return [=](ModelBuilder& b) {
      b.remove_attr(name);
      b.attr_int(name, v);
    };
  };
  expect_error(l, replace_int("k", 0), {"k: expected in [1, E=4], got 0"});
  expect_error(l, replace_int("k", 5), {"k: expected in [1, E=4], got 5"});
  expect_error(l, replace_int("expert_weight_bits", 3), {"attribute 'expert_weight_bits': expected 2, 4 or 8, got 3"});
  expect_error(l, replace_int("block_size", 24), {"attribute 'block_size': expected 0 (row-wise) or a power of two"});
  expect_error(l, replace_int("block_size", -16), {"attribute 'block_size'", "got -16"});
  expect_error(l, replace_int("swiglu_fusion", 3), {"attribute 'swiglu_fusion': expected 0, 1 or 2, got 3"});
  expect_error(l, replace_int("swiglu_fusion", 1), {"swiglu_fusion: expected 0 with activation 'relu'"});
  expect_error(l, replace_int("normalize_routing_weights", 2), {"'normalize_routing_weights': expected 0 or 1, got 2"});
  expect_error(l, replace_int("use_sparse_mixer", -1), {"'use_sparse_mixer': expected 0 or 1, got -1"});
  expect_error(l, replace_int("weights_prepacked", 2), {"'weights_prepacked': expected -1, 0 or 1, got 2"});
  expect_error(l, [](ModelBuilder& b) {
    b.remove_attr("activation_type");
    b.attr_string("activation_type", "tanh");
  }, {"activation_type: expected one of relu, gelu, silu, swiglu, identity, got 'tanh'"});
  expect_error(l, [](ModelBuilder& b) {
    b.remove_attr("quant_type");
    b.attr_string("quant_type", "fp4");
  }, {"attribute 'quant_type': qmoe implements 'int' only, got 'fp4'"});
  expect_error(l, [](ModelBuilder& b) {
    b.remove_attr("k");
    b.attr_float("k", 2.0f);
  }, {"attribute 'k': expected type INT, got FLOAT"});
  expect_error(l, [](ModelBuilder& b) {
    b.remove_attr("activation_alpha");
    b.attr_int("activation_alpha", 2);
  }, {"attribute 'activation_alpha': expected type FLOAT, got INT"});
  expect_error(l, [](ModelBuilder& b) { b.attr_int("tensor_shards", 2); },
               {"attribute 'tensor_shards': unknown to qmoe"});
  expect_error(l, [](ModelBuilder& b) { b.attr_int("k", 2); }, {"attribute 'k' is given twice"});
  expect_error(l, [](ModelBuilder& b) {
    b.remove_attr("use_sparse_mixer");
    b.attr_int("use_sparse_mixer", 1);
    b.remove_attr("k");
    b.attr_int("k", 1);
  }, {"k: expected 2 when use_sparse_mixer = 1"});
  Layer sw = default_layer();
  sw.spec.activation = Activation::swiglu;
  sw.spec.swiglu_fusion = SwigluFusion::interleaved;
  sw.raw = make_raw(sw.spec, 10);
  expect_error(sw, [](ModelBuilder& b) { b.attr_float("swiglu_limit", -1.f); }, {"swiglu_limit: expected > 0, got -1"});
  expect_error(sw, [](ModelBuilder& b) {
    b.remove_initializer("fc1.scales");
    b.add_initializer("fc1.scales", Tensor(DType::f32, {4, 31}), Storage::raw_data);
  }, {"fc1_scales: swiglu with swiglu_fusion = 1 needs 2*I rows", "31"});
  // Block-wise scales with no block_size attribute.
  Layer bw = default_layer();
  bw.spec.block_size = 16;
  bw.raw = make_raw(bw.spec, 11);
  expect_error(bw, [](ModelBuilder& b) { b.remove_attr("block_size"); },
               {"fc1_scales: shape [4, 16, 2] has 2 blocks per row", "'block_size' is absent"});
  // fc2 scales disagreeing with fc1's block-wise choice.
  expect_error(bw, [](ModelBuilder& b) {
    b.remove_initializer("fc2.scales");
    b.add_initializer("fc2.scales", Tensor(DType::f32, {4, 32}), Storage::raw_data);
  }, {"fc2_scales: expected shape [4, 32, 1], got [4, 32]"});
}

TEST_F(OnnxLoaderTest, ActivationTypeRules) {
  Layer l = default_layer();
  expect_error(l, [](ModelBuilder& b) {
    b.model().mutable_graph()->mutable_output(0)->mutable_type()->mutable_tensor_type()->set_elem_type(
        pb::TensorProto::FLOAT16);
  }, {"T: input 'x' is declared FLOAT but output 'out' is declared FLOAT16"});
  expect_error(l, [](ModelBuilder& b) {
    for (auto& vi : *b.model().mutable_graph()->mutable_input())
      vi.mutable_type()->mutable_tensor_type()->set_elem_type(pb::TensorProto::DOUBLE);
    b.model().mutable_graph()->mutable_output(0)->mutable_type()->mutable_tensor_type()->set_elem_type(
        pb::TensorProto::DOUBLE);
  }, {"T: input 'x' is declared DOUBLE; expected FLOAT, FLOAT16 or BFLOAT16"});
  // Nothing declares T and there is no bias.
  Layer nb = default_layer();
  nb.spec.fc1_bias = nb.spec.fc2_bias = false;
  nb.raw = make_raw(nb.spec, 12);
  nb.declare_io = false;
  expect_error(nb, {}, {"T: cannot determine the activation type", "'x'"});
  // Biases of another type than the declared T.
  expect_error(l, [](ModelBuilder& b) {
    b.remove_initializer("fc2.bias");
    b.add_initializer("fc2.bias", Tensor(DType::f16, {4, 32}), Storage::raw_data);
  }, {"fc2_experts_bias: expected dtype float32, got float16"});
  // Static dims that disagree with the weights.
  expect_error(l, [](ModelBuilder& b) {
    b.model().mutable_graph()->mutable_input(0)->mutable_type()->mutable_tensor_type()->mutable_shape()->mutable_dim(1)->set_dim_value(31);
  }, {"input 'x': last dimension is declared 31, expected H = 32"});
  expect_error(l, [](ModelBuilder& b) {
    b.model().mutable_graph()->mutable_input(1)->mutable_type()->mutable_tensor_type()->mutable_shape()->mutable_dim(1)->set_dim_value(8);
  }, {"router_probs 'router_probs': last dimension is declared 8, expected E = 4"});
}

TEST_F(OnnxLoaderTest, ExternalDataPathsAndLengths) {
  Layer l = default_layer();
  l.storage = Storage::external;
  auto set_kv = [](ModelBuilder& b, const std::string& init, const std::string& key, const std::string& value) {
    for (auto& kv : *b.initializer(init)->mutable_external_data())
      if (kv.key() == key) kv.set_value(value);
  };
  // Escaping the model's folder, lexically or through a symlink.
  {
    std::ofstream f(dir_ / "outside.bin", std::ios::binary);
    f << std::string(8192, 'x');
  }
  expect_error(l, [&](ModelBuilder& b) { set_kv(b, "fc1.weight", "location", "../outside.bin"); },
               {"fc1_experts_weights", "'../outside.bin' escapes the model's folder"});
  expect_error(l, [&](ModelBuilder& b) { set_kv(b, "fc1.weight", "location", "sub/../../outside.bin"); },
               {"escapes the model's folder"});
  expect_error(l, [&](ModelBuilder& b) { set_kv(b, "fc1.weight", "location", (dir_ / "outside.bin").string()); },
               {"is absolute"});
  fs::create_symlink(dir_ / "outside.bin", mdir() / "link.bin");
  expect_error(l, [&](ModelBuilder& b) { set_kv(b, "fc1.weight", "location", "link.bin"); },
               {"'link.bin' resolves to", "outside the model's folder"});
  expect_error(l, [&](ModelBuilder& b) { set_kv(b, "fc1.weight", "location", ""); }, {"empty 'location'"});
  expect_error(l, [&](ModelBuilder& b) { set_kv(b, "fc1.weight", "location", "missing.bin"); },
               {"cannot open external data file", "missing.bin"});
  // Lengths and offsets.
  expect_error(l, [&](ModelBuilder& b) { set_kv(b, "fc2.weight", "offset", "99999999"); },
               {"fc2_experts_weights", "lies beyond the end of 'weights.bin'"});
  expect_error(l, [&](ModelBuilder& b) { set_kv(b, "fc2.weight", "offset", "18446744073709551615"); },
               {"lies beyond the end"});
  expect_error(l, [&](ModelBuilder& b) { set_kv(b, "fc2.weight", "length", "1025"); },
               {"'length' is 1025 bytes", "needs 1024"});
  expect_error(l, [&](ModelBuilder& b) { set_kv(b, "fc2.weight", "offset", "-5"); },
               {"'offset': expected a non-negative decimal integer, got '-5'"});
  expect_error(l, [&](ModelBuilder& b) { set_kv(b, "fc2.weight", "length", "12abc"); },
               {"'length': expected a non-negative decimal integer, got '12abc'"});
  expect_error(l, [&](ModelBuilder& b) { b.initializer("fc2.weight")->clear_external_data(); },
               {"external data without a 'location'"});
  expect_error(l, [&](ModelBuilder& b) { b.initializer("fc2.weight")->set_raw_data("abc"); },
               {"marked EXTERNAL but also holds inline data"});
  expect_error(l, [&](ModelBuilder& b) { b.initializer("fc2.weight")->set_data_location(pb::TensorProto::DEFAULT); },
               {"external_data entries but data_location is not EXTERNAL"});
  // The external file shorter than the data it should hold (cut after saving).
  ModelBuilder b(mdir());
  build(b, l);
  const std::string p = b.save();
  fs::resize_file(mdir() / "weights.bin", 5000);
  expect_file_error(p, "lies beyond the end of 'weights.bin' (5000 bytes)");
  // Without a length key the byte count follows from the dims; a subfolder location is fine.
  ModelBuilder b2(mdir());
  build(b2, l);
  b2.save();
  fs::create_directories(mdir() / "data");
  fs::rename(mdir() / "weights.bin", mdir() / "data" / "weights.bin");
  for (auto& t : *b2.model().mutable_graph()->mutable_initializer()) {
    auto* kvs = t.mutable_external_data();
    for (int i = kvs->size() - 1; i >= 0; --i)
      if (kvs->Get(i).key() == "length") kvs->erase(kvs->begin() + i);
    for (auto& kv : *kvs)
      if (kv.key() == "location") kv.set_value("./data/weights.bin");
  }
  const std::string bytes = b2.model().SerializeAsString();
  std::ofstream(p, std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
  OnnxLayer got = load_onnx(p);
  expect_same_matrix(got.raw.fc1, l.raw.fc1, "fc1");
  expect_same_matrix(got.raw.fc2, l.raw.fc2, "fc2");
}

TEST_F(OnnxLoaderTest, MappedTensorsOutliveTheLoader) {
  // Aligned external tensors are wrapped around the mapping; they must stay valid after load_onnx
  // returns and after the file is deleted, and writing through them must not touch the file.
  Layer l = default_layer();
  l.storage = Storage::external;
  ModelBuilder b(mdir());
  build(b, l);
  const std::string p = b.save();
  OnnxLayer got = load_onnx(p);
  fs::remove(mdir() / "weights.bin");
  expect_same_matrix(got.raw.fc2, l.raw.fc2, "fc2");
  got.raw.fc1.weights.data_as<uint8_t>()[0] ^= 0xff;  // copy-on-write page, no fault
}

}  // namespace
