// ONNX writer for one QMoE layer (include/qmoe/onnx_export.h).
//
// Uses the protobuf-lite classes src/io generates from onnx.proto (package qmoe_onnx), so reader and
// writer share one schema. Choices that make ONNX Runtime's CPU kernel accept the file:
//  - weights_prepacked = 0 always: the bytes are raw (contract §7), on every ORT backend;
//  - swiglu_limit is written only when finite (absent = +inf, the operator's default);
//  - block_size is written only when block-wise (absent = row-wise);
//  - opset imports for "" (17, IR 8: what ORT 1.17+ reads) and "com.microsoft" (1).
// External data: offsets are aligned to 4096 bytes so loaders can mmap each initializer directly.
#include "qmoe/onnx_export.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <vector>

#include "checkpoint/file_util.h"
#include "qmoe/error.h"
#include "qmoe_onnx/onnx.pb.h"

namespace qmoe {

namespace {

namespace fs = std::filesystem;
namespace pb = ::qmoe_onnx;

constexpr int64_t kIrVersion = 8;
constexpr int64_t kOnnxOpset = 17;
constexpr int64_t kMsOpset = 1;
constexpr uint64_t kExternalAlign = 4096;

int onnx_dtype(DType t) {
  switch (t) {
    case DType::f32: return pb::TensorProto::FLOAT;
    case DType::f16: return pb::TensorProto::FLOAT16;
    case DType::bf16: return pb::TensorProto::BFLOAT16;
    case DType::u8: return pb::TensorProto::UINT8;
  }
  throw Error("export_onnx: no ONNX type for dtype " + std::to_string(int(t)));
}

void add_int(pb::NodeProto& n, const char* name, int64_t v) {
  pb::AttributeProto* a = n.add_attribute();
  a->set_name(name);
  a->set_type(pb::AttributeProto::INT);
  a->set_i(v);
}

void add_float(pb::NodeProto& n, const char* name, float v) {
  pb::AttributeProto* a = n.add_attribute();
  a->set_name(name);
  a->set_type(pb::AttributeProto::FLOAT);
  a->set_f(v);
}

void add_string(pb::NodeProto& n, const char* name, const std::string& v) {
  pb::AttributeProto* a = n.add_attribute();
  a->set_name(name);
  a->set_type(pb::AttributeProto::STRING);
  a->set_s(v);
}

// A graph input/output of type T with shape [num_tokens, d1].
void add_value_info(pb::ValueInfoProto* v, const std::string& name, DType t, int64_t d1) {
  v->set_name(name);
  pb::TypeProto_Tensor* tt = v->mutable_type()->mutable_tensor_type();
  tt->set_elem_type(onnx_dtype(t));
  pb::TensorShapeProto* s = tt->mutable_shape();
  s->add_dim()->set_dim_param("num_tokens");
  s->add_dim()->set_dim_value(d1);
}

struct Init {
  std::string name;
  const Tensor* t;
};

}  // namespace

void export_onnx(const std::string& path, const MoeSpec& spec, const RawExperts& raw, const OnnxExportOptions& opt) {
  spec.validate();
  validate_raw(spec, raw);
  for (const std::string* n : {&opt.input_name, &opt.router_probs_name, &opt.output_name})
    if (n->empty()) throw Error("export_onnx: graph input/output names must not be empty");

  // Operator inputs by index (contract §2); "" marks an absent optional input before a present one.
  std::vector<std::string> inputs(15);
  std::vector<Init> inits;
  auto put = [&](int index, const std::string& name, const Tensor* t) {
    inputs[size_t(index)] = name;
    if (t) inits.push_back({name, t});
  };
  inputs[0] = opt.input_name;
  inputs[1] = opt.router_probs_name;
  auto matrix = [&](const RawMatrix& m, const char* p, int w, int s, int b, int z) {
    const std::string pre = p;
    put(w, pre + "_experts_weights", &m.weights);
    put(s, pre + "_scales", &m.scales);
    if (m.bias) put(b, pre + "_experts_bias", &*m.bias);
    if (m.zero_points) put(z, pre + "_zero_points", &*m.zero_points);
  };
  matrix(raw.fc1, "fc1", 2, 3, 4, 11);
  matrix(raw.fc2, "fc2", 5, 6, 7, 12);
  if (raw.fc3) matrix(*raw.fc3, "fc3", 8, 9, 10, 13);
  if (!opt.router_weights_name.empty()) inputs[14] = opt.router_weights_name;
  while (!inputs.empty() && inputs.back().empty()) inputs.pop_back();

  pb::ModelProto model;
  model.set_ir_version(kIrVersion);
  model.set_producer_name("qmoe");
  model.set_producer_version("0.1.0");
  pb::OperatorSetIdProto* op = model.add_opset_import();
  op->set_domain("");
  op->set_version(kOnnxOpset);
  op = model.add_opset_import();
  op->set_domain("com.microsoft");
  op->set_version(kMsOpset);
  for (const auto& [k, v] : opt.metadata) {
    pb::StringStringEntryProto* e = model.add_metadata_props();
    e->set_key(k);
    e->set_value(v);
  }

  pb::GraphProto* g = model.mutable_graph();
  g->set_name("qmoe_layer");
  pb::NodeProto* node = g->add_node();
  node->set_name(opt.node_name);
  node->set_op_type("QMoE");
  node->set_domain("com.microsoft");
  for (const std::string& in : inputs) node->add_input(in);
  node->add_output(opt.output_name);
  add_int(*node, "k", spec.k);
  add_string(*node, "activation_type", std::string(activation_name(spec.activation)));
  add_int(*node, "normalize_routing_weights", spec.normalize_routing_weights ? 1 : 0);
  add_int(*node, "use_sparse_mixer", spec.use_sparse_mixer ? 1 : 0);
  add_int(*node, "expert_weight_bits", spec.bits);
  if (spec.block_wise()) add_int(*node, "block_size", spec.block_size);
  add_int(*node, "swiglu_fusion", int(spec.swiglu_fusion));
  if (std::isfinite(spec.swiglu_limit)) add_float(*node, "swiglu_limit", spec.swiglu_limit);
  add_float(*node, "activation_alpha", spec.activation_alpha);
  add_float(*node, "activation_beta", spec.activation_beta);
  add_int(*node, "weights_prepacked", 0);

  add_value_info(g->add_input(), opt.input_name, spec.act_dtype, spec.hidden);
  add_value_info(g->add_input(), opt.router_probs_name, spec.act_dtype, spec.num_experts);
  if (!opt.router_weights_name.empty())
    add_value_info(g->add_input(), opt.router_weights_name, spec.act_dtype, spec.num_experts);
  add_value_info(g->add_output(), opt.output_name, spec.act_dtype, spec.hidden);

  uint64_t total = 0;
  for (const Init& i : inits) total += i.t->nbytes();
  const bool external = total > opt.external_data_threshold;

  const fs::path model_path(path);
  const std::string data_name =
      opt.external_data_name.empty() ? model_path.filename().string() + ".data" : opt.external_data_name;
  if (external && (data_name.find('/') != std::string::npos || data_name == "." || data_name == ".."))
    throw Error("export_onnx: external data name '" + data_name + "' must be a plain file name (it is stored relative to the model)");
  const fs::path data_path = model_path.parent_path() / data_name;

  std::optional<AtomicFile> data_file;
  if (external) data_file.emplace(data_path.string());
  uint64_t offset = 0;
  static const char zeros[kExternalAlign] = {};
  for (const Init& i : inits) {
    pb::TensorProto* t = g->add_initializer();
    t->set_name(i.name);
    t->set_data_type(onnx_dtype(i.t->dtype()));
    for (int64_t d : i.t->shape()) t->add_dims(d);
    const size_t n = i.t->nbytes();
    if (!external) {
      // raw_data is little-endian, like qmoe's buffers on every platform qmoe builds for.
      t->set_raw_data(i.t->data(), n);
      continue;
    }
    const uint64_t pad = (kExternalAlign - offset % kExternalAlign) % kExternalAlign;
    data_file->write(zeros, size_t(pad));
    offset += pad;
    data_file->write(i.t->data(), n);
    t->set_data_location(pb::TensorProto::EXTERNAL);
    auto kv = [&](const char* k, const std::string& v) {
      pb::StringStringEntryProto* e = t->add_external_data();
      e->set_key(k);
      e->set_value(v);
    };
    kv("location", data_name);
    kv("offset", std::to_string(offset));
    kv("length", std::to_string(n));
    offset += n;
  }

  const size_t size = model.ByteSizeLong();
  if (size >= (size_t(1) << 31) - 1)
    throw Error("export_onnx: the model is " + std::to_string(size) + " bytes, over protobuf's 2 GiB limit; lower external_data_threshold");
  std::string bytes;
  if (!model.SerializeToString(&bytes)) throw Error("export_onnx: protobuf serialization failed");
  AtomicFile out(path);
  out.write(bytes.data(), bytes.size());
  if (data_file) data_file->commit();
  try {
    out.commit();
  } catch (...) {
    if (data_file) ::unlink(data_path.string().c_str());  // the model is missing, so its data is useless
    throw;
  }
}

}  // namespace qmoe
