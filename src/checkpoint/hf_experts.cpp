// Finding the routed experts of one layer in a Hugging Face checkpoint, and quantizing them.
//
// Detection works on tensor names only (plus config.json when present), never on file names or
// folder names: the same weights are published under many repository names. Two steps:
//  1. naming scheme: which of the four storage schemes (see ExpertNaming) the layer's tensors use;
//  2. family: config.json's model_type, else tell-tale neighbours (Phi-3.5-MoE's LayerNorm biases,
//     DeepSeek's shared_experts, Qwen2-MoE's shared_expert), which decide the routing facts.
// Only headers are read here; expert bytes are converted to fp32 one expert at a time in expert().
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "qmoe/checkpoint.h"
#include "qmoe/error.h"
#include "core/str_builder.h"

namespace qmoe {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

// Parses a decimal index ("0".."999999999") at s[pos...] up to the next '.'; nullopt if not one.
// Bounded so a hostile name cannot overflow, and leading zeros rejected so "01" is not expert 1.
std::optional<int64_t> parse_index(std::string_view s, size_t pos, size_t* after) {
  size_t i = pos;
  while (i < s.size() && i - pos < 10 && s[i] >= '0' && s[i] <= '9') ++i;
  if (i == pos || i - pos > 9 || i >= s.size() || s[i] != '.') return std::nullopt;
  if (s[pos] == '0' && i - pos > 1) return std::nullopt;
  *after = i + 1;
  return std::stoll(std::string(s.substr(pos, i - pos)));
}

// Per decoder layer: the prefixes ("model.layers.3.") under which MoE experts appear and their
// (block_sparse_moe | mlp) kind.
struct LayerHit {
  std::string prefix;
  bool block_sparse;  // block_sparse_moe.experts. rather than mlp.experts.
};

std::map<int64_t, std::vector<LayerHit>> scan_moe_layers(const std::vector<std::string>& names) {
  std::map<int64_t, std::vector<LayerHit>> out;
  std::set<std::pair<int64_t, std::string>> seen;
  for (const std::string& n : names) {
    // Any "layers.{N}." followed by one of the two expert containers; the part before it is kept
    // so multimodal checkpoints ("language_model.model.layers.3.") work too.
    for (size_t at = n.find("layers."); at != std::string::npos; at = n.find("layers.", at + 1)) {
      if (at > 0 && n[at - 1] != '.') continue;
      size_t after = 0;
      const auto L = parse_index(n, at + 7, &after);
      if (!L) continue;
      const std::string_view rest = std::string_view(n).substr(after);
      const bool bs = starts_with(rest, "block_sparse_moe.experts.");
      if (!bs && !starts_with(rest, "mlp.experts.")) continue;
      std::string prefix = n.substr(0, after);
      if (seen.insert({*L, prefix}).second) out[*L].push_back({prefix, bs});
      break;
    }
  }
  return out;
}

std::string layer_list(const std::map<int64_t, std::vector<LayerHit>>& layers) {
  // "1-3, 5, 7-26": compact even for 60-layer models.
  std::string s;
  auto it = layers.begin();
  while (it != layers.end()) {
    const int64_t first = it->first;
    int64_t last = first;
    auto next = std::next(it);
    while (next != layers.end() && next->first == last + 1) last = (next++)->first;
    s += (s.empty() ? "" : ", ") + std::to_string(first) + (last != first ? "-" + std::to_string(last) : "");
    it = next;
  }
  return s;
}

// config.json (or its text_config for multimodal models) as a small lookup. A key that is present
// with the wrong JSON type is an error, not "absent": a silently ignored "num_experts_per_tok": "2"
// would let a family default stand in for what the file meant to say.
struct Config {
  json root = json::object();
  std::string path;
  const json* find(const char* key) const {
    if (root.contains(key)) return &root[key];
    const auto tc = root.find("text_config");
    if (tc != root.end() && tc->is_object() && tc->contains(key)) return &(*tc)[key];
    return nullptr;
  }
  [[noreturn]] void bad(const char* key, const char* want, const json& v) const {
    throw Error(path + ": '" + key + "' must be " + want + ", got " + v.dump());
  }
  std::optional<int64_t> get_int(const char* key) const {
    const json* v = find(key);
    if (!v || v->is_null()) return std::nullopt;
    if (!v->is_number_integer()) bad(key, "an integer", *v);
    return v->get<int64_t>();
  }
  std::optional<bool> get_bool(const char* key) const {
    const json* v = find(key);
    if (!v || v->is_null()) return std::nullopt;
    if (!v->is_boolean()) bad(key, "true or false", *v);
    return v->get<bool>();
  }
  std::optional<double> get_number(const char* key) const {
    const json* v = find(key);
    if (!v || v->is_null()) return std::nullopt;
    if (!v->is_number()) bad(key, "a number", *v);
    return v->get<double>();
  }
  std::string get_string(const char* key) const {
    const json* v = find(key);
    if (!v || v->is_null()) return std::string();
    if (!v->is_string()) bad(key, "a string", *v);
    return v->get<std::string>();
  }
};

Config read_config(const std::string& folder) {
  Config c;
  const fs::path p = fs::path(folder) / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(p, ec)) return c;
  const auto size = fs::file_size(p, ec);
  if (ec || size > (16u << 20)) throw Error(p.string() + ": unreadable or larger than 16 MB");
  std::ifstream in(p, std::ios::binary);
  std::string text(size_t(size), '\0');
  in.read(text.data(), std::streamsize(size));
  // nlohmann parses iteratively, but a value nested millions deep would still be destroyed
  // recursively in older releases: count depth first, as the safetensors reader does.
  int depth = 0, max_depth = 0;
  bool in_str = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (in_str) {
      if (ch == '\\') ++i;
      else if (ch == '"') in_str = false;
    } else if (ch == '"') {
      in_str = true;
    } else if (ch == '{' || ch == '[') {
      max_depth = std::max(max_depth, ++depth);
    } else if (ch == '}' || ch == ']') {
      --depth;
    }
  }
  if (max_depth > 64) throw Error(p.string() + ": JSON nests deeper than 64 levels");
  try {
    c.root = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(p.string() + ": not valid JSON (" + e.what() + ")");
  }
  if (!c.root.is_object()) throw Error(p.string() + ": not a JSON object");
  c.path = p.string();
  return c;
}

std::string replace_e(const std::string& pattern, int64_t e) {
  std::string s = pattern;
  const size_t at = s.find("{e}");
  if (at != std::string::npos) s.replace(at, 3, std::to_string(e));
  return s;
}

// Checks an expert tensor exists with a float dtype and the expected shape.
const SafetensorsEntry& expect_tensor(const SafetensorsCheckpoint& c, const std::string& name, const Shape& shape) {
  if (!c.contains(name)) throw Error(c.folder() + ": tensor '" + name + "' is missing");
  const SafetensorsEntry& en = c.entry(name);
  if (!en.dtype || !is_float(*en.dtype))
    throw Error(c.folder() + ": tensor '" + name + "' has dtype " + en.dtype_name +
                "; qmoe reads F32, F16 or BF16 expert weights (FP8 checkpoints such as DeepSeek-V3's must be "
                "dequantized to BF16 first)");
  if (en.shape != shape)
    throw Error(c.folder() + ": tensor '" + name + "': expected shape " + shape_str(shape) + ", got " + shape_str(en.shape));
  return en;
}

const SafetensorsEntry& expect_u8(const SafetensorsCheckpoint& c, const std::string& name, const Shape& shape) {
  if (!c.contains(name)) throw Error(c.folder() + ": tensor '" + name + "' is missing");
  const SafetensorsEntry& en = c.entry(name);
  if (en.dtype != DType::u8) throw Error(c.folder() + ": tensor '" + name + "': expected U8, got " + en.dtype_name);
  if (en.shape != shape)
    throw Error(c.folder() + ": tensor '" + name + "': expected shape " + shape_str(shape) + ", got " + shape_str(en.shape));
  return en;
}

// A float tensor of the checkpoint read in place through its bytes. SafetensorsFile::tensor() would
// copy a misaligned tensor whole, which for gpt-oss' [E, H, 2I] tensors means gigabytes per expert;
// reading each element with memcpy has no alignment requirement and costs the same as a plain load.
struct FloatSource {
  Tensor bytes;  // keeps the mapping alive
  DType dtype = DType::f32;

  FloatSource(const SafetensorsCheckpoint& c, const std::string& name) : bytes(c.bytes(name)) {
    const SafetensorsEntry& e = c.entry(name);
    if (!e.dtype || !is_float(*e.dtype)) throw Error(c.folder() + ": tensor '" + name + "' is not F32, F16 or BF16");
    dtype = *e.dtype;
  }
  float at(int64_t i) const {
    const uint8_t* p = bytes.data_as<uint8_t>() + size_t(i) * dtype_size(dtype);
    if (dtype == DType::f32) {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    uint16_t h;
    std::memcpy(&h, p, 2);
    return dtype == DType::f16 ? half_to_float(h) : bf16_to_float(h);
  }
};

// fp32 copy of shape's element count starting at element `offset` of tensor `name`.
Tensor to_f32(const SafetensorsCheckpoint& c, const std::string& name, int64_t offset, Shape shape) {
  const FloatSource src(c, name);
  Tensor out(DType::f32, std::move(shape));
  float* o = out.data_as<float>();
  const int64_t n = out.numel();
  for (int64_t i = 0; i < n; ++i) o[i] = src.at(offset + i);
  return out;
}

// FP8 E4M3 ("fn": no infinities, S.1111.111 = NaN), as DeepSeek-V3 stores weights: 1 sign, 4 exponent
// bits (bias 7), 3 mantissa bits; (8 + m) * 2^(e - 10) for normal numbers, m * 2^-9 for subnormals.
float fp8_e4m3_to_float(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  float v;
  if (e == 15 && m == 7) v = std::numeric_limits<float>::quiet_NaN();
  else if (e == 0) v = std::ldexp(float(m), -9);
  else v = std::ldexp(float(8 + m), e - 10);
  return (b & 0x80) ? -v : v;
}

// A Linear weight [out, in]: float, or F8_E4M3 with its block scales "<name>_scale_inv". The FP8 block
// size comes from config.json's quantization_config.weight_block_size (DeepSeek: [128, 128]), else 128.
const SafetensorsEntry& expect_linear(const SafetensorsCheckpoint& c, const std::string& name, const Shape& shape,
                                      CheckpointLayer& L, const json* block_cfg) {
  if (!c.contains(name)) throw Error(c.folder() + ": tensor '" + name + "' is missing");
  const SafetensorsEntry& en = c.entry(name);
  if (en.dtype_name != "F8_E4M3") return expect_tensor(c, name, shape);
  if (en.shape != shape)
    throw Error(c.folder() + ": tensor '" + name + "': expected shape " + shape_str(shape) + ", got " + shape_str(en.shape));
  const std::string sn = name + "_scale_inv";
  if (!c.contains(sn))
    throw Error(c.folder() + ": tensor '" + name + "' has dtype F8_E4M3 but no block scales '" + sn +
                "'; qmoe reads F32, F16, BF16, or block-scaled FP8 weights");
  if (L.fp8_block_out == 0) {
    L.fp8_block_out = L.fp8_block_in = 128;
    if (block_cfg && block_cfg->is_array() && block_cfg->size() == 2 && (*block_cfg)[0].is_number_integer() &&
        (*block_cfg)[1].is_number_integer()) {
      L.fp8_block_out = (*block_cfg)[0].get<int64_t>();
      L.fp8_block_in = (*block_cfg)[1].get<int64_t>();
    }
    if (L.fp8_block_out < 1 || L.fp8_block_in < 1 || L.fp8_block_out > (1 << 20) || L.fp8_block_in > (1 << 20))
      throw Error(c.folder() + ": config.json quantization_config.weight_block_size must hold two integers in [1, 2^20]");
  }
  const Shape want{(shape[0] + L.fp8_block_out - 1) / L.fp8_block_out, (shape[1] + L.fp8_block_in - 1) / L.fp8_block_in};
  expect_tensor(c, sn, want);
  return en;
}

// fp32 [out, in] of a Linear weight checked by expect_linear.
Tensor load_linear(const CheckpointLayer& L, const std::string& name, int64_t out, int64_t in) {
  const SafetensorsCheckpoint& c = L.checkpoint;
  if (c.entry(name).dtype_name != "F8_E4M3") return to_f32(c, name, 0, {out, in});
  static const auto lut = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[size_t(i)] = fp8_e4m3_to_float(uint8_t(i));
    return t;
  }();
  const Tensor q = c.bytes(name);  // out * in bytes: the header check tied the byte count to the shape
  const FloatSource s(c, name + "_scale_inv");
  const int64_t sc = c.entry(name + "_scale_inv").shape[1];
  Tensor w(DType::f32, {out, in});
  float* o = w.data_as<float>();
  const uint8_t* b = q.data_as<uint8_t>();
  for (int64_t i = 0; i < out; ++i)
    for (int64_t j = 0; j < in; ++j)
      o[i * in + j] = lut[b[i * in + j]] * s.at((i / L.fp8_block_out) * sc + j / L.fp8_block_in);
  return w;
}

Shape shape_of(const SafetensorsCheckpoint& c, const std::string& name, const std::string& what) {
  if (!c.contains(name)) throw Error(c.folder() + ": " + what + " '" + name + "' is missing");
  return c.entry(name).shape;
}

// Expert indices present under `container` ("...experts."): must be exactly 0..n-1.
int64_t count_experts(const std::vector<std::string>& names, const std::string& container) {
  std::set<int64_t> idx;
  for (const std::string& n : names) {
    if (!starts_with(n, container)) continue;
    size_t after = 0;
    if (const auto e = parse_index(n, container.size(), &after)) idx.insert(*e);
  }
  if (idx.empty()) return 0;
  const int64_t n = int64_t(idx.size());
  if (*idx.begin() != 0 || *idx.rbegin() != n - 1)
    throw Error("experts under '" + container + "' are numbered " + std::to_string(*idx.begin()) + ".." +
                std::to_string(*idx.rbegin()) + " with " + std::to_string(n) + " present (expected 0.." +
                std::to_string(n - 1) + ")");
  return n;
}

// MXFP4 (OCP microscaling): 32 E2M1 codes share one E8M0 exponent (bias 127); the low nibble of a
// byte holds the even element. Decoded the way transformers' convert_moe_packed_tensors does it.
constexpr float kFp4Values[16] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                  -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

// Rows [row0, row0 + rows) of an MXFP4 matrix whose blocks are [.., G, 16] and scales [.., G].
Tensor mxfp4_rows(const Tensor& blocks, const Tensor& scales, int64_t row0, int64_t rows, int64_t G) {
  Tensor out(DType::f32, {rows, G * 32});
  float* o = out.data_as<float>();
  const uint8_t* b = blocks.data_as<uint8_t>() + row0 * G * 16;
  const uint8_t* s = scales.data_as<uint8_t>() + row0 * G;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float scale = std::ldexp(1.0f, int(s[r * G + g]) - 127);
      for (int j = 0; j < 16; ++j) {
        const uint8_t byte = b[(r * G + g) * 16 + j];
        o[r * G * 32 + g * 32 + 2 * j] = kFp4Values[byte & 15] * scale;
        o[r * G * 32 + g * 32 + 2 * j + 1] = kFp4Values[byte >> 4] * scale;
      }
    }
  return out;
}

const char* naming_name(ExpertNaming n) {
  switch (n) {
    case ExpertNaming::block_sparse_moe: return "block_sparse_moe";
    case ExpertNaming::mlp_experts: return "mlp_experts";
    case ExpertNaming::gpt_oss_fused: return "gpt_oss_fused";
    case ExpertNaming::gpt_oss_mxfp4: return "gpt_oss_mxfp4";
  }
  return "?";
}

std::string fmt_float(double v) {
  StrBuilder os;
  os.precision(9);
  os << v;
  return os.str();
}

}  // namespace

CheckpointLayer open_checkpoint_layer(const std::string& path, int64_t layer) {
  CheckpointLayer L;
  L.checkpoint = SafetensorsCheckpoint::open(path);
  L.source = path;
  L.layer = layer;
  const SafetensorsCheckpoint& c = L.checkpoint;
  const std::vector<std::string> names = c.names();
  const Config cfg = read_config(c.folder());
  const json* qcfg = cfg.find("quantization_config");
  const json* fp8_block = qcfg && qcfg->is_object() && qcfg->contains("weight_block_size") ? &(*qcfg)["weight_block_size"] : nullptr;

  const auto layers = scan_moe_layers(names);
  if (layers.empty()) {
    std::string sample;
    for (size_t i = 0; i < names.size() && i < 6; ++i) sample += (i ? ", " : "") + names[i];
    throw Error(path + ": no MoE experts found among " + std::to_string(names.size()) +
                " tensors (e.g. " + sample + "). Recognised: *layers.{L}.block_sparse_moe.experts.{e}.w1/w2/w3.weight "
                "(Mixtral, Phi-3.5-MoE), *layers.{L}.mlp.experts.{e}.gate_proj/up_proj/down_proj.weight "
                "(Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3), *layers.{L}.mlp.experts.gate_up_proj/down_proj (gpt-oss)");
  }
  const auto hit = layers.find(layer);
  if (hit == layers.end())
    throw Error(path + ": layer " + std::to_string(layer) + " has no MoE experts (a dense layer or out of range); "
                "layers with experts: " + layer_list(layers));
  // Several prefixes for one layer index (e.g. a vision tower with its own MoE): the language
  // model's "model.layers." wins, else the shortest prefix; the choice is recorded in the notes.
  std::vector<LayerHit> hits = hit->second;
  std::sort(hits.begin(), hits.end(), [](const LayerHit& a, const LayerHit& b) {
    const bool am = starts_with(a.prefix, "model.layers."), bm = starts_with(b.prefix, "model.layers.");
    if (am != bm) return am;
    return a.prefix.size() != b.prefix.size() ? a.prefix.size() < b.prefix.size() : a.prefix < b.prefix;
  });
  L.prefix = hits[0].prefix;
  if (hits.size() > 1) L.notes.push_back("several expert blocks for layer " + std::to_string(layer) + "; using '" + L.prefix + "'");
  const std::string& P = L.prefix;

  // ---- naming scheme, E, H, I ----
  if (hits[0].block_sparse) {
    L.naming = ExpertNaming::block_sparse_moe;
    const std::string base = P + "block_sparse_moe.experts.";
    L.source_names = {base + "{e}.w1.weight", base + "{e}.w3.weight", base + "{e}.w2.weight"};
    L.num_experts = count_experts(names, base);
    const Shape w1 = shape_of(c, base + "0.w1.weight", "expert weight");
    if (w1.size() != 2) throw Error(path + ": '" + base + "0.w1.weight' must be 2-D [I, H], got " + shape_str(w1));
    L.inter = w1[0];
    L.hidden = w1[1];
    if (c.contains(P + "block_sparse_moe.gate.weight")) L.router_weight_name = P + "block_sparse_moe.gate.weight";
  } else if (c.contains(P + "mlp.experts.gate_up_proj") || c.contains(P + "mlp.experts.gate_up_proj_blocks")) {
    const std::string base = P + "mlp.experts.";
    if (c.contains(base + "gate_up_proj")) {
      L.naming = ExpertNaming::gpt_oss_fused;
      const Shape gu = shape_of(c, base + "gate_up_proj", "fused expert weight");
      if (gu.size() != 3 || gu[2] % 2 != 0)
        throw Error(path + ": '" + base + "gate_up_proj' must be [E, H, 2I], got " + shape_str(gu));
      L.num_experts = gu[0];
      L.hidden = gu[1];
      L.inter = gu[2] / 2;
      L.source_names = {base + "gate_up_proj", base + "down_proj"};
    } else {
      L.naming = ExpertNaming::gpt_oss_mxfp4;
      const Shape gu = shape_of(c, base + "gate_up_proj_blocks", "MXFP4 expert blocks");
      if (gu.size() != 4 || gu[1] % 2 != 0 || gu[3] != 16)
        throw Error(path + ": '" + base + "gate_up_proj_blocks' must be [E, 2I, H/32, 16], got " + shape_str(gu));
      L.num_experts = gu[0];
      L.inter = gu[1] / 2;
      L.hidden = gu[2] * 32;
      L.source_names = {base + "gate_up_proj_blocks", base + "gate_up_proj_scales", base + "down_proj_blocks",
                        base + "down_proj_scales"};
    }
    if (c.contains(base + "gate_up_proj_bias")) L.source_names.push_back(base + "gate_up_proj_bias");
    if (c.contains(base + "down_proj_bias")) L.source_names.push_back(base + "down_proj_bias");
    if (c.contains(P + "mlp.router.weight")) L.router_weight_name = P + "mlp.router.weight";
    if (c.contains(P + "mlp.router.bias")) L.router_bias_name = P + "mlp.router.bias";
  } else {
    L.naming = ExpertNaming::mlp_experts;
    const std::string base = P + "mlp.experts.";
    if (!c.contains(base + "0.gate_proj.weight")) {
      std::string found;
      int shown = 0;
      for (const std::string& n : names)
        if (starts_with(n, base) && shown++ < 6) found += (found.empty() ? "" : ", ") + n;
      throw Error(path + ": layer " + std::to_string(layer) + " has tensors under '" + base +
                  "' but not in a recognised naming (found: " + found +
                  "); expected {e}.gate_proj/up_proj/down_proj.weight or gate_up_proj/down_proj");
    }
    L.source_names = {base + "{e}.gate_proj.weight", base + "{e}.up_proj.weight", base + "{e}.down_proj.weight"};
    L.num_experts = count_experts(names, base);
    const Shape g = shape_of(c, base + "0.gate_proj.weight", "expert weight");
    if (g.size() != 2) throw Error(path + ": '" + base + "0.gate_proj.weight' must be 2-D [I, H], got " + shape_str(g));
    L.inter = g[0];
    L.hidden = g[1];
    if (c.contains(P + "mlp.gate.weight")) L.router_weight_name = P + "mlp.gate.weight";
    if (c.contains(P + "mlp.gate.e_score_correction_bias")) L.router_bias_name = P + "mlp.gate.e_score_correction_bias";
  }
  if (L.num_experts < 1 || L.hidden < 1 || L.inter < 1)
    throw Error(path + ": layer " + std::to_string(layer) + ": experts have an empty shape (E=" + std::to_string(L.num_experts) +
                " H=" + std::to_string(L.hidden) + " I=" + std::to_string(L.inter) + ")");

  // ---- every expert tensor: present, float, consistent shapes (headers only) ----
  const int64_t E = L.num_experts, H = L.hidden, I = L.inter;
  switch (L.naming) {
    case ExpertNaming::block_sparse_moe:
    case ExpertNaming::mlp_experts:
      for (int64_t e = 0; e < E; ++e) {
        const auto& g = expect_linear(c, replace_e(L.source_names[0], e), {I, H}, L, fp8_block);
        expect_linear(c, replace_e(L.source_names[1], e), {I, H}, L, fp8_block);
        expect_linear(c, replace_e(L.source_names[2], e), {H, I}, L, fp8_block);
        if (e == 0) L.source_dtype = g.dtype_name;
      }
      break;
    case ExpertNaming::gpt_oss_fused: {
      const std::string base = P + "mlp.experts.";
      L.source_dtype = expect_tensor(c, base + "gate_up_proj", {E, H, 2 * I}).dtype_name;
      expect_tensor(c, base + "down_proj", {E, I, H});
      break;
    }
    case ExpertNaming::gpt_oss_mxfp4: {
      const std::string base = P + "mlp.experts.";
      if (I % 32 != 0) throw Error(path + ": MXFP4 down_proj needs I divisible by 32, got I=" + std::to_string(I));
      expect_u8(c, base + "gate_up_proj_blocks", {E, 2 * I, H / 32, 16});
      expect_u8(c, base + "gate_up_proj_scales", {E, 2 * I, H / 32});
      expect_u8(c, base + "down_proj_blocks", {E, H, I / 32, 16});
      expect_u8(c, base + "down_proj_scales", {E, H, I / 32});
      L.source_dtype = "MXFP4";
      break;
    }
  }
  if (L.naming == ExpertNaming::gpt_oss_fused || L.naming == ExpertNaming::gpt_oss_mxfp4) {
    const std::string base = P + "mlp.experts.";
    if (c.contains(base + "gate_up_proj_bias")) {
      expect_tensor(c, base + "gate_up_proj_bias", {E, 2 * I});
      L.has_bias = true;
    }
    if (c.contains(base + "down_proj_bias")) {
      expect_tensor(c, base + "down_proj_bias", {E, H});
      L.has_bias = true;
    }
  }
  if (!L.router_weight_name.empty()) {
    const Shape rs = c.entry(L.router_weight_name).shape;
    if (rs != Shape{E, H})
      throw Error(path + ": router '" + L.router_weight_name + "': expected shape " + shape_str({E, H}) + ", got " + shape_str(rs));
  }
  if (!L.router_bias_name.empty() && c.entry(L.router_bias_name).shape != Shape{E})
    throw Error(path + ": router bias '" + L.router_bias_name + "': expected shape [" + std::to_string(E) + "]");

  // ---- family and routing facts ----
  const std::string model_type = cfg.get_string("model_type");
  static const std::set<std::string> kKnown = {"mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "olmoe",
                                                "deepseek_v2", "deepseek_v3", "gpt_oss"};
  if (L.naming == ExpertNaming::gpt_oss_fused || L.naming == ExpertNaming::gpt_oss_mxfp4) {
    L.family = "gpt_oss";
  } else if (kKnown.count(model_type)) {
    L.family = model_type;
  } else if (L.naming == ExpertNaming::block_sparse_moe) {
    // Phi-3.5-MoE uses LayerNorm (with bias); Mixtral uses RMSNorm (no bias).
    L.family = c.contains(P + "input_layernorm.bias") || c.contains(P + "post_attention_layernorm.bias") ? "phimoe" : "mixtral";
  } else {
    bool shared_experts = false, shared_expert = false;
    for (const std::string& n : names) {
      shared_experts |= starts_with(n, P + "mlp.shared_experts.");
      shared_expert |= starts_with(n, P + "mlp.shared_expert.");
    }
    if (shared_experts) L.family = L.router_bias_name.empty() ? "deepseek_v2" : "deepseek_v3";
    else if (shared_expert) L.family = "qwen2_moe";
    else L.family = "mlp_experts";
  }
  if (!model_type.empty() && !kKnown.count(model_type))
    L.notes.push_back("config.json model_type '" + model_type + "' is not a family qmoe knows; routing facts come from its fields");

  // Family facts that never vary between released models of the family.
  if (L.family == "mixtral") {
    L.k = 2;
    L.normalize_routing_weights = true;  // softmax over all experts, then renormalised over the top 2
  } else if (L.family == "phimoe") {
    L.k = 2;
    L.use_sparse_mixer = true;
    L.normalize_routing_weights = false;
  } else if (L.family == "gpt_oss") {
    L.k = 4;
    L.normalize_routing_weights = true;  // softmax over the top-k logits == renormalised full softmax
    L.swiglu_limit = 7.0f;
    L.activation_alpha = 1.702f;
    L.activation_beta = 1.0f;
  } else if (L.family == "qwen2_moe" || L.family == "qwen3_moe" || L.family == "olmoe" || L.family == "deepseek_v2") {
    L.normalize_routing_weights = false;  // transformers' default when config.json omits norm_topk_prob
  } else if (L.family == "deepseek_v3") {
    L.normalize_routing_weights = true;
  }
  // config.json overrides the defaults where it states them.
  if (auto v = cfg.get_int("num_experts_per_tok")) L.k = *v;
  else if (auto v2 = cfg.get_int("experts_per_token")) L.k = *v2;
  if (auto v = cfg.get_bool("norm_topk_prob")) L.normalize_routing_weights = *v;
  if (L.family == "gpt_oss") {
    if (auto v = cfg.get_number("swiglu_limit")) L.swiglu_limit = float(*v);
  }
  if (L.k && (*L.k < 1 || *L.k > E))
    throw Error(path + ": config.json says " + std::to_string(*L.k) + " experts per token, but layer " +
                std::to_string(layer) + " has " + std::to_string(E) + " experts");

  // Where QMoE's routing (softmax of the given logits, top-k) is not the model's.
  const std::string scoring = cfg.get_string("scoring_func");
  if (L.family == "deepseek_v3" || scoring == "sigmoid")
    L.notes.push_back("routing uses sigmoid scores plus e_score_correction_bias and group-limited top-k; QMoE's softmax top-k only approximates it");
  const std::string topk_method = cfg.get_string("topk_method");
  if (topk_method == "group_limited_greedy" || topk_method == "noaux_tc")
    L.notes.push_back("topk_method '" + topk_method + "' (n_group/topk_group) restricts expert choice; QMoE picks from all experts");
  if (auto f = cfg.get_number("routed_scaling_factor"); f && *f != 1.0)
    L.notes.push_back("the model scales routed outputs by routed_scaling_factor=" + fmt_float(*f) + "; QMoE does not");
  if (L.family == "gpt_oss" && !L.router_bias_name.empty())
    L.notes.push_back("the router has a bias: router_probs = x . router.weight^T + router.bias");
  if (L.family == "deepseek_v2" || L.family == "deepseek_v3" || L.family == "qwen2_moe")
    L.notes.push_back("shared expert(s) are not part of the QMoE layer; add their output separately");
  if (L.router_weight_name.empty()) L.notes.push_back("no router weight found for this layer");
  return L;
}

std::vector<int64_t> checkpoint_moe_layers(const std::string& path) {
  std::vector<int64_t> out;
  for (const auto& [layer, hits] : scan_moe_layers(SafetensorsCheckpoint::open(path).names())) out.push_back(layer);
  return out;
}

ExpertWeights CheckpointLayer::expert(int64_t e) const {
  if (e < 0 || e >= num_experts)
    throw Error("expert " + std::to_string(e) + " out of range [0, " + std::to_string(num_experts) + ")");
  const int64_t H = hidden, I = inter;
  ExpertWeights w;
  const SafetensorsCheckpoint& c = checkpoint;
  switch (naming) {
    case ExpertNaming::block_sparse_moe:
    case ExpertNaming::mlp_experts:
      // source_names order: gate, up, down.
      w.gate = load_linear(*this, replace_e(source_names[0], e), I, H);
      w.up = load_linear(*this, replace_e(source_names[1], e), I, H);
      w.down = load_linear(*this, replace_e(source_names[2], e), H, I);
      return w;
    case ExpertNaming::gpt_oss_fused: {
      // gate_up_proj[e] is [H, 2I] (x @ W layout, the transpose of Linear.weight) with gate at even
      // columns and up at odd ones; down_proj[e] is [I, H].
      const FloatSource gu(c, prefix + "mlp.experts.gate_up_proj");
      const FloatSource dn(c, prefix + "mlp.experts.down_proj");
      w.gate = Tensor(DType::f32, {I, H});
      w.up = Tensor(DType::f32, {I, H});
      w.down = Tensor(DType::f32, {H, I});
      float* g = w.gate.data_as<float>();
      float* u = w.up.data_as<float>();
      float* d = w.down.data_as<float>();
      const int64_t base = e * H * 2 * I;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < I; ++i) {
          g[i * H + h] = gu.at(base + h * 2 * I + 2 * i);
          u[i * H + h] = gu.at(base + h * 2 * I + 2 * i + 1);
        }
      for (int64_t i = 0; i < I; ++i)
        for (int64_t h = 0; h < H; ++h) d[h * I + i] = dn.at(e * I * H + i * H + h);
      break;
    }
    case ExpertNaming::gpt_oss_mxfp4: {
      // Blocks are stored [out, in] already: rows 2i (gate) and 2i+1 (up) of gate_up, rows of down.
      const std::string base = prefix + "mlp.experts.";
      const Tensor gu = mxfp4_rows(c.tensor(base + "gate_up_proj_blocks"), c.tensor(base + "gate_up_proj_scales"),
                                   e * 2 * I, 2 * I, H / 32);
      w.down = mxfp4_rows(c.tensor(base + "down_proj_blocks"), c.tensor(base + "down_proj_scales"), e * H, H, I / 32);
      w.gate = Tensor(DType::f32, {I, H});
      w.up = Tensor(DType::f32, {I, H});
      for (int64_t i = 0; i < I; ++i) {
        std::memcpy(w.gate.data_as<float>() + i * H, gu.data_as<float>() + (2 * i) * H, size_t(H) * 4);
        std::memcpy(w.up.data_as<float>() + i * H, gu.data_as<float>() + (2 * i + 1) * H, size_t(H) * 4);
      }
      break;
    }
  }
  // gpt-oss biases: gate_up_proj_bias [E, 2I] interleaved like the weight columns, down_proj_bias [E, H].
  const std::string base = prefix + "mlp.experts.";
  if (c.contains(base + "gate_up_proj_bias")) {
    const FloatSource b(c, base + "gate_up_proj_bias");
    Tensor gb(DType::f32, {I}), ub(DType::f32, {I});
    for (int64_t i = 0; i < I; ++i) {
      gb.data_as<float>()[i] = b.at(e * 2 * I + 2 * i);
      ub.data_as<float>()[i] = b.at(e * 2 * I + 2 * i + 1);
    }
    w.gate_bias = std::move(gb);
    w.up_bias = std::move(ub);
  }
  if (c.contains(base + "down_proj_bias")) w.down_bias = to_f32(c, base + "down_proj_bias", e * H, {H});
  return w;
}

Tensor CheckpointLayer::router_weight() const {
  return router_weight_name.empty() ? Tensor() : checkpoint.tensor(router_weight_name);
}

Tensor CheckpointLayer::router_bias() const {
  return router_bias_name.empty() ? Tensor() : checkpoint.tensor(router_bias_name);
}

std::string CheckpointLayer::summary() const {
  StrBuilder os;
  os << family << " layer " << layer << ": E=" << num_experts << " H=" << hidden << " I=" << inter << " "
     << source_dtype << " (" << naming_name(naming) << ")";
  if (k) os << " k=" << *k;
  if (normalize_routing_weights) os << (*normalize_routing_weights ? " normalize" : " no-normalize");
  if (use_sparse_mixer) os << " sparse-mixer";
  if (has_bias) os << " bias";
  return os.str();
}

// ---- quantization ----

MoeSpec checkpoint_spec(const CheckpointLayer& L, const CheckpointQuantizeOptions& opt) {
  MoeSpec s;
  s.num_experts = L.num_experts;
  s.hidden = L.hidden;
  s.inter = L.inter;
  const std::optional<int64_t> k = opt.k ? opt.k : L.k;
  if (!k)
    throw Error(L.source + ": experts per token (k) unknown for family '" + L.family +
                "' (no config.json with num_experts_per_tok); pass k explicitly");
  const std::optional<bool> norm = opt.normalize_routing_weights ? opt.normalize_routing_weights : L.normalize_routing_weights;
  if (!norm)
    throw Error(L.source + ": whether routing weights are renormalised over the top-k is unknown for family '" +
                L.family + "' (no config.json with norm_topk_prob); pass it explicitly");
  s.k = *k;
  s.normalize_routing_weights = *norm;
  s.use_sparse_mixer = L.use_sparse_mixer;
  s.bits = opt.quant.bits;
  s.block_size = opt.quant.block_size;
  s.activation = Activation::swiglu;
  s.swiglu_fusion = opt.fusion;
  s.swiglu_limit = L.swiglu_limit;
  s.activation_alpha = L.activation_alpha;
  s.activation_beta = L.activation_beta;
  s.act_dtype = opt.act_dtype;
  s.scale_dtype = opt.quant.scale_dtype;
  const std::string base = L.prefix + "mlp.experts.";
  const bool up_bias = L.checkpoint.contains(base + "gate_up_proj_bias");
  const bool down_bias = L.checkpoint.contains(base + "down_proj_bias");
  s.fc1_bias = up_bias;
  s.fc3_bias = up_bias && s.has_fc3();
  s.fc2_bias = down_bias;
  s.fc1_zero_points = s.fc2_zero_points = !opt.quant.symmetric;
  s.fc3_zero_points = !opt.quant.symmetric && s.has_fc3();
  s.validate();
  return s;
}

namespace {

// Copies one expert's quantized matrix into slot e of the [E, ...] raw tensors.
void place(RawMatrix& m, const QuantizedMatrix& q, int64_t e) {
  auto put = [e](Tensor& dst, const Tensor& src) {
    if (src.nbytes() * size_t(dst.dim(0)) != dst.nbytes())
      throw Error("internal: quantized expert has " + std::to_string(src.nbytes()) + " bytes for slot of " +
                  shape_str(dst.shape()));
    std::memcpy(static_cast<uint8_t*>(dst.data()) + size_t(e) * src.nbytes(), src.data(), src.nbytes());
  };
  put(m.weights, q.weights);
  put(m.scales, q.scales);
  if (m.zero_points) put(*m.zero_points, *q.zero_points);
}

RawMatrix alloc_matrix(const MoeSpec& s, Fc fc, bool bias, bool zp) {
  RawMatrix m;
  m.weights = Tensor(DType::u8, raw_weight_shape(s, fc));
  m.scales = Tensor(s.scale_dtype, raw_scale_shape(s, fc));
  if (zp) m.zero_points = Tensor(DType::u8, raw_zero_point_shape(s, fc));
  if (bias) m.bias = Tensor(s.act_dtype, raw_bias_shape(s, fc));
  return m;
}

void store_bias(Tensor& dst, int64_t e, int64_t n, const float* src, int64_t count, int64_t stride = 1, int64_t offset = 0) {
  // Row e of a [E, N] bias; element offset + j * stride gets src[j].
  for (int64_t j = 0; j < count; ++j) store_from_float(dst.dtype(), dst.data(), e * n + offset + j * stride, src[j]);
}

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

}  // namespace

RawLayer quantize_checkpoint_layer(const CheckpointLayer& L, const CheckpointQuantizeOptions& opt) {
  RawLayer out;
  const MoeSpec s = checkpoint_spec(L, opt);
  out.spec = s;
  const int64_t E = s.num_experts, H = s.hidden, I = s.inter, N1 = s.fc1_rows();
  out.raw.fc1 = alloc_matrix(s, Fc::fc1, s.fc1_bias, s.fc1_zero_points);
  out.raw.fc2 = alloc_matrix(s, Fc::fc2, s.fc2_bias, s.fc2_zero_points);
  if (s.has_fc3()) out.raw.fc3 = alloc_matrix(s, Fc::fc3, s.fc3_bias, s.fc3_zero_points);

  Tensor fc1(DType::f32, {N1, H});
  for (int64_t e = 0; e < E; ++e) {
    const ExpertWeights w = L.expert(e);
    const float* g = w.gate.data_as<float>();
    const float* u = w.up.data_as<float>();
    float* f = fc1.data_as<float>();
    switch (s.swiglu_fusion) {
      case SwigluFusion::interleaved:  // gate row i -> 2i, up row i -> 2i + 1
        for (int64_t i = 0; i < I; ++i) {
          std::memcpy(f + (2 * i) * H, g + i * H, size_t(H) * 4);
          std::memcpy(f + (2 * i + 1) * H, u + i * H, size_t(H) * 4);
        }
        break;
      case SwigluFusion::concatenated:  // gate rows [0, I), up rows [I, 2I)
        std::memcpy(f, g, size_t(I * H) * 4);
        std::memcpy(f + I * H, u, size_t(I * H) * 4);
        break;
      case SwigluFusion::separate:
        std::memcpy(f, g, size_t(I * H) * 4);
        break;
    }
    place(out.raw.fc1, quantize_matrix(fc1.view(), opt.quant), e);
    if (s.has_fc3()) place(*out.raw.fc3, quantize_matrix(w.up.view(), opt.quant), e);
    place(out.raw.fc2, quantize_matrix(w.down.view(), opt.quant), e);

    if (s.fc1_bias) {
      const float* gb = w.gate_bias->data_as<float>();
      const float* ub = w.up_bias->data_as<float>();
      Tensor& b1 = *out.raw.fc1.bias;
      switch (s.swiglu_fusion) {
        case SwigluFusion::interleaved:
          store_bias(b1, e, N1, gb, I, 2, 0);
          store_bias(b1, e, N1, ub, I, 2, 1);
          break;
        case SwigluFusion::concatenated:
          store_bias(b1, e, N1, gb, I);
          store_bias(b1, e, N1, ub, I, 1, I);
          break;
        case SwigluFusion::separate:
          store_bias(b1, e, N1, gb, I);
          store_bias(*out.raw.fc3->bias, e, I, ub, I);
          break;
      }
    }
    if (s.fc2_bias) store_bias(*out.raw.fc2.bias, e, H, w.down_bias->data_as<float>(), H);
    if (opt.progress) opt.progress(e + 1, E);
  }
  validate_raw(s, out.raw);

  if (Tensor r = L.router_weight(); !r.empty()) out.router_weight = std::move(r);
  if (Tensor r = L.router_bias(); !r.empty()) out.router_bias = std::move(r);
  out.metadata["source_family"] = L.family;
  out.metadata["source_path"] = L.source;
  out.metadata["source_layer"] = std::to_string(L.layer);
  out.metadata["source_dtype"] = L.source_dtype;
  out.metadata["source_tensors"] = join(L.source_names, ",");
  if (!L.router_weight_name.empty()) out.metadata["source_router"] = L.router_weight_name;
  if (!L.router_bias_name.empty()) out.metadata["source_router_bias"] = L.router_bias_name;
  if (!L.notes.empty()) out.metadata["notes"] = join(L.notes, "\n");
  return out;
}

}  // namespace qmoe
