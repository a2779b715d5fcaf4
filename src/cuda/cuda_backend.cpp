// The CUDA backend: owns device buffers, packs raw experts into the cuda-sm80 layout on the GPU,
// picks a launch configuration per run (problem -> config), and launches (cuda_kernels.h).
//
// run() with host tensors = copy inputs in, the capturable core (no allocation, no sync), copy the
// output out. The core is also reachable with device pointers through cuda_run_device().
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "cuda_kernels.h"
#include "cuda_slice.h"
#include "ep_kernels.h"
#include "fc_sm90.h"
#include "host_upload.h"
#include "qmoe/cuda_backend.h"
#include "qmoe/error.h"
#include "qmoe/reference.h"
#include "qmoe/routing.h"
#include "core/str_builder.h"

namespace qmoe {

namespace {

using cuda::Elt;
using cuda::MatrixGeom;
using cuda::RowMap;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call does not report it again
    throw Error(std::string("cuda backend: ") + what + ": " + cudaGetErrorString(e));
  }
}
#define QMOE_CU(call) check((call), #call)

Elt to_elt(DType t) {
  switch (t) {
    case DType::f32: return Elt::f32;
    case DType::f16: return Elt::f16;
    case DType::bf16: return Elt::bf16;
    default: throw Error("cuda backend: uint8 is not a float type");
  }
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// An owned device allocation.
class DevBuf {
 public:
  DevBuf() = default;
  explicit DevBuf(size_t bytes) : bytes_(bytes) {
    if (bytes) QMOE_CU(cudaMalloc(&ptr_, bytes));
  }
  ~DevBuf() {
    if (ptr_) cudaFree(ptr_);
  }
  DevBuf(DevBuf&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr, o.bytes_ = 0; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    if (this != &o) {
      if (ptr_) cudaFree(ptr_);
      ptr_ = o.ptr_, bytes_ = o.bytes_;
      o.ptr_ = nullptr, o.bytes_ = 0;
    }
    return *this;
  }
  void* get() const { return ptr_; }
  template <class T> T* as() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

const char* kLayoutName4 = "cuda-sm80-w4";  // 4-bit codes (and 2-bit codes stored as 4-bit)
const char* kLayoutName8 = "cuda-sm80-w8";

LayoutTag tag_for(const MoeSpec& s) {
  return LayoutTag{s.bits == 8 ? kLayoutName8 : kLayoutName4, 1, "cuda-sm80"};
}

// Layout geometry of a spec: fc1 (with fc3 merged as SwiGLU's linear rows) and fc2.
struct LayerGeom {
  int64_t H64 = 0, I64 = 0;  // x / a row lengths (multiples of 64, covering every span)
  MatrixGeom fc1, fc2;
};

LayerGeom layer_geom(const MoeSpec& s) {
  LayerGeom g;
  g.H64 = round_up(s.hidden, 64);
  g.I64 = round_up(s.inter, 64);
  if (s.is_swiglu())
    g.fc1 = cuda::make_geom(s.inter, s.hidden, g.I64, s.bits, s.block_size, RowMap::swiglu);
  else
    g.fc1 = cuda::make_geom(s.inter, s.hidden, g.I64, s.bits, s.block_size, RowMap::plain);
  g.fc2 = cuda::make_geom(s.hidden, s.inter, round_up(s.hidden, 16), s.bits, s.block_size, RowMap::plain);
  return g;
}

struct PackedMatrixBufs {
  DevBuf w, s, z;
};

class CudaPacked final : public PackedExperts {
 public:
  CudaPacked(const MoeSpec& spec, int device)
      : PackedExperts(tag_for(spec), spec), device(device), geom(layer_geom(spec)), route_spec(spec) {}

  int device;
  LayerGeom geom;
  // Expert parallel (cuda_slice.h): a slice holds experts [first_expert, first_expert + E_local) of a
  // layer routed by route_spec (E, k, routing flags); for a whole layer route_spec == spec().
  MoeSpec route_spec;
  int64_t first_expert = 0;
  bool is_slice() const { return route_spec.num_experts != spec().num_experts; }
  PackedMatrixBufs fc1, fc2;
  DevBuf bias_g, bias_l, bias2;  // fp32: [E][I64] gate/plain, [E][I64] linear, [E][H]

  size_t resident_bytes() const override {
    size_t n = 0;
    for (const DevBuf* b : all()) n += b->bytes();
    return n;
  }

  std::vector<const DevBuf*> all() const {
    return {&fc1.w, &fc1.s, &fc1.z, &fc2.w, &fc2.s, &fc2.z, &bias_g, &bias_l, &bias2};
  }
  static std::vector<std::string> names() {
    return {"fc1.weights", "fc1.scales", "fc1.zero_points", "fc2.weights", "fc2.scales",
            "fc2.zero_points", "fc1.bias_gate", "fc1.bias_linear", "fc2.bias"};
  }

  std::vector<NamedTensor> to_blobs() const override {
    QMOE_CU(cudaSetDevice(device));
    std::vector<NamedTensor> out;
    const auto bufs = all();
    const auto nm = names();
    for (size_t i = 0; i < bufs.size(); ++i) {
      if (!bufs[i]->bytes()) continue;
      Tensor t(DType::u8, {int64_t(bufs[i]->bytes())});
      QMOE_CU(cudaMemcpy(t.data(), bufs[i]->get(), bufs[i]->bytes(), cudaMemcpyDeviceToHost));
      out.push_back({nm[i], std::move(t)});
    }
    return out;
  }
};

// Sizes the packed buffers must have for a spec (used by prepack and from_blobs alike).
std::vector<size_t> expected_sizes(const MoeSpec& s) {
  const LayerGeom g = layer_geom(s);
  const int64_t E = s.num_experts;
  const size_t se = dtype_size(s.scale_dtype);
  auto wb = [&](const MatrixGeom& m) { return size_t(E * m.weight_bytes_per_expert()); };
  auto sb = [&](const MatrixGeom& m) { return size_t(E * m.scale_count_per_expert()) * se; };
  auto zb = [&](const MatrixGeom& m, bool has) { return has ? size_t(E * m.scale_count_per_expert()) : 0; };
  const bool z1 = s.fc1_zero_points || (s.has_fc3() && s.fc3_zero_points);
  const bool bg = s.fc1_bias, bl = s.is_swiglu() && (s.has_fc3() ? s.fc3_bias : s.fc1_bias);
  return {wb(g.fc1),
          sb(g.fc1),
          zb(g.fc1, z1),
          wb(g.fc2),
          sb(g.fc2),
          zb(g.fc2, s.fc2_zero_points),
          bg ? size_t(E * g.I64) * 4 : 0,
          bl ? size_t(E * g.I64) * 4 : 0,
          s.fc2_bias ? size_t(E * s.hidden) * 4 : 0};
}

// Per-run configuration (printable): problem -> config.
struct RunConfig {
  bool sm90 = false;  // the wgmma kernels (fc_sm90.h); then chunk = their width (nt = chunk / 8), one split
  int nt = 1, chunk = 8, max_items = 0, splits = 1, kw1 = 1, kw2 = 1, tpw = 1, xr = 8;
  int64_t spans_per_split = 0;
  std::string str() const {
    StrBuilder os;
    if (sm90) os << "sm90 ";
    os << "nt=" << nt << " tpw=" << tpw << " xr=" << xr << " max_items=" << max_items << " fc1_kw=" << kw1
       << " fc2_kw=" << kw2 << " fc2_splits=" << splits << " spans/split=" << spans_per_split;
    return os.str();
  }
};

// Average tokens per touched expert (RunCounts: slots / min(E, slots), rounded up) from which the
// wgmma kernels run instead of the SM80-family kernels (CudaGemm::automatic). Measured on H100s
// (`qmoe_cuda_bench --gemm sm80|sm90`, graph us, int4 b128 / int4 b32 / int8 on the four shapes of
// docs/performance.md, bf16; docs/PERF-cuda.md, "Dispatch", "Two blocks per SM" and "Every copy a
// tensor copy"):
//  - since the producer's tensor copies (8ee6982; T = 8..128, 20 cases per quantization), the wgmma
//    kernels ran 8-bit weights with row-wise scales faster in 19 of 20 (qwen3-30b-a3b T = 8, one token
//    per expert: 6% slower) and bf16 layers of 32-k scale blocks (DQ) in 20 of 20; both take them
//    from 2 tokens per expert (1.01-1.12x where that moved the choice; one token per expert, T = 1
//    among them, stays on the SM80 family, whose single-token kernels the wgmma ones were not
//    measured against);
//  - int4 b128 (DQ) still ran slower there in 15 of 20, faster from 16 tokens per expert;
//  - before that, at 16 and 32 tokens per expert the wgmma kernels won all 24 cases, 1.03-1.21x, and
//    below 16 the SM80 family won in most.
// Layers measured neither way (4-bit row-wise, 8-bit block-wise, fp16 block-wise) keep 16.
//  - at one token per expert (NVIDIA H200, both families forced, T = 1, 2, 4, 8 on the four shapes,
//    `--iters 30`; docs/PERF-cuda.md, "One token per expert on the wgmma kernels"), bf16 layers of 32-k
//    blocks ran faster on the wgmma kernels wherever a run routed at least 16 slots (8 of 8 cases,
//    1.03-1.14x: deepseek-v3-like and qwen3-30b-a3b T = 2..8, gpt-oss-20b T = 4, 8) and slower on fewer
//    (mixtral T = 1..4 0.54-0.96x, gpt-oss-20b T = 1 0.76x), so they take them from kWgmmaSpreadSlots
//    slots too; 8-bit row-wise layers were mixed there (0.94-1.12x) and keep 2 tokens per expert.
constexpr int64_t kWgmmaCrossover = 16;
constexpr int64_t kWgmmaCrossoverEarly = 2;
constexpr int64_t kWgmmaSpreadSlots = 16;

Elt compute_elt(DType act) { return act == DType::f16 ? Elt::f16 : Elt::bf16; }

// Where CudaGemm::automatic runs a layer on the wgmma kernels (on a GPU that has them): from `tokens`
// per touched expert (0: never, they cannot serve it), and also from `slots` routed slots (0: no such rule).
struct WgmmaFrom {
  int64_t tokens = 0, slots = 0;
  bool operator==(const WgmmaFrom&) const = default;
  bool pays(int64_t avg, int64_t routed) const { return tokens > 0 && (avg >= tokens || (slots > 0 && routed >= slots)); }
};
WgmmaFrom wgmma_from(const CudaPacked& p) {
  const MatrixGeom &g1 = p.geom.fc1, &g2 = p.geom.fc2;
  if (!cuda::sm90_serves(g1) || !cuda::sm90_serves(g2)) return {};
  const bool dq32 = cuda::fc_uses_dq(compute_elt(p.spec().act_dtype), to_elt(p.spec().scale_dtype), g1) && g1.kpb == 2;
  const bool int8_rowwise = g1.sbits == 8 && g1.NBP == 1 && g2.NBP == 1;
  if (dq32) return {kWgmmaCrossoverEarly, kWgmmaSpreadSlots};
  return {int8_rowwise ? kWgmmaCrossoverEarly : kWgmmaCrossover, 0};
}

// Whether the wgmma kernels can run the layer at width 192 (fc_sm90.h, sm90_wide_serves).
bool wgmma_wide_serves(const CudaPacked& p) {
  const Elt ct = compute_elt(p.spec().act_dtype), se = to_elt(p.spec().scale_dtype);
  return cuda::sm90_wide_serves(ct, se, p.geom.fc1) && cuda::sm90_wide_serves(ct, se, p.geom.fc2);
}

// What a workspace's sizes depend on besides the row count: everything config_for reads of the layer,
// so that layers with equal keys get the same launch configuration at every row count. (Without the
// local expert count, fc1's geometry and where the wgmma kernels take over, two layers of one shape
// differing only in those shared a workspace sized for the first: a block-16 layer, SM80 only, left no
// converted-input buffer for a block-32 layer whose run took the wgmma kernels.)
struct WsKey {
  int64_t E = 0, k = 0, E_local = 0, H = 0, H64 = 0, I64 = 0, MT1 = 0, S1 = 0, MT2 = 0, S2 = 0;
  int sbits = 0;
  WgmmaFrom wgmma;
  DType act = DType::f32;
  bool operator==(const WsKey&) const = default;
};
WsKey ws_key(const CudaPacked& p) {
  const MoeSpec& s = p.spec();
  const MatrixGeom &g1 = p.geom.fc1, &g2 = p.geom.fc2;
  return WsKey{p.route_spec.num_experts, p.route_spec.k, s.num_experts, s.hidden, p.geom.H64, p.geom.I64,
               g1.MT, g1.S, g2.MT, g2.S, g1.sbits, wgmma_from(p), s.act_dtype};
}

// Workspace for up to `rows` tokens of layers with key `key` (a backend serves one layer shape at a
// time; running a differently shaped layer reallocates on the next host run() or reserve).
struct Workspace {
  int64_t rows = 0;
  WsKey key;
  DevBuf counts, route_e, route_w, sorted, items, n_items, xbuf, abuf, ybuf, in, logits, rw, out;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& opt) : opt_(opt) {
    if (cuda_device_count() <= opt.device)
      throw Error("cuda backend: device " + std::to_string(opt.device) + " is not visible (" +
                  std::to_string(cuda_device_count()) + " CUDA devices)");
    QMOE_CU(cudaSetDevice(opt.device));
    cudaDeviceProp p{};
    QMOE_CU(cudaGetDeviceProperties(&p, opt.device));
    if (p.major < 8)
      throw Error("cuda backend: compute capability " + std::to_string(p.major) + "." + std::to_string(p.minor) +
                  " is not supported (the mma.sync kernels need sm_80 or newer)");
    sms_ = p.multiProcessorCount;
    QMOE_CU(cuda::init_kernels());
    sm90_ = opt.gemm != CudaGemm::sm80 && cuda::sm90_available(opt.device);
    if (sm90_) QMOE_CU(cuda::init_sm90_kernels());
    pdl_ = cuda::pdl_supported(opt.device);
    // QMOE_CUDA_PDL=0 launches every kernel plainly (for A/B measurements and as an escape hatch).
    if (const char* v = std::getenv("QMOE_CUDA_PDL")) pdl_ = pdl_ && std::string(v) != "0";
    // QMOE_CUDA_SM90_N=8|16|32|64|128|192 fixes the wgmma kernels' token width (for A/B measurements).
    if (const char* v = std::getenv("QMOE_CUDA_SM90_N")) {
      const std::string n(v);
      sm90_n_ = n == "8" ? 8 : n == "16" ? 16 : n == "32" ? 32 : n == "64" ? 64 : n == "128" ? 128 : n == "192" ? 192 : 0;
      if (!sm90_n_) throw Error("QMOE_CUDA_SM90_N: expected 8, 16, 32, 64, 128 or 192, got '" + n + "'");
    }
    QMOE_CU(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  ~CudaBackend() override {
    ws_ = Workspace{};
    uploader_.reset();
    if (stream_) cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  LayoutTag layout_for(const MoeSpec& spec) const override { return tag_for(spec); }

  std::unique_ptr<PackedExperts> prepack(const MoeSpec& spec, RawExperts raw) override;
  std::unique_ptr<PackedExperts> from_blobs(const MoeSpec& spec, std::vector<NamedTensor> blobs) override;
  void run(const PackedExperts& packed, const MoeInputs& inputs, Tensor& output) override;

  size_t reserve(const CudaPacked& p, int64_t rows);
  void run_core(const CudaPacked& p, const void* in, const void* logits, const void* rw, void* out, int64_t rows,
                cudaStream_t st, const CudaSliceRunArgs* slice = nullptr);
  RunConfig config_for(const CudaPacked& p, int64_t rows) const;
  RunConfig run_config(const CudaPacked& p, int64_t rows) const;

  const CudaPacked& check_packed(const PackedExperts& packed) const {
    require_layout(packed, tag_for(packed.spec()), "cuda backend");
    const auto* p = dynamic_cast<const CudaPacked*>(&packed);
    if (!p) throw Error("cuda backend: packed weights carry the cuda tag but were not made by the cuda backend");
    if (p->device != opt_.device)
      throw Error("cuda backend: weights live on device " + std::to_string(p->device) + ", backend runs on " +
                  std::to_string(opt_.device));
    return *p;
  }

 private:
  CudaBackendOptions opt_;
  int sms_ = 0;
  bool sm90_ = false;  // the wgmma kernels may run (Hopper GPU, sm_90a build, not turned off)
  int sm90_n_ = 0;     // their token width when fixed by QMOE_CUDA_SM90_N, else 0 (sm90_width)
  bool pdl_ = false;   // kernels after a run's first overlap their predecessor (cuda::pdl_supported)
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::HostUploader> uploader_;  // prepack's staging, made by the first prepack
  Workspace ws_;
  std::mutex mu_;
};

// ---------------------------------------------------------------------------------------------
// prepack
// ---------------------------------------------------------------------------------------------

void upload_bias(const MoeSpec& s, const std::optional<Tensor>& b, int64_t rows_per_expert_raw, int64_t first_row,
                 int64_t stride_rows, int64_t count, int64_t ld, std::vector<float>& host) {
  // host[e * ld + i] = bias[e][first_row + stride_rows * i] for i < count
  for (int64_t e = 0; e < s.num_experts; ++e)
    for (int64_t i = 0; i < count; ++i)
      host[size_t(e * ld + i)] =
          load_as_float(s.act_dtype, b->data(), e * rows_per_expert_raw + first_row + stride_rows * i);
}

std::unique_ptr<PackedExperts> CudaBackend::prepack(const MoeSpec& spec, RawExperts raw) {
  spec.validate();
  validate_raw(spec, raw);
  if (spec.num_experts > 4096)
    throw Error("cuda backend: num_experts " + std::to_string(spec.num_experts) + " > 4096 is not supported");
  std::lock_guard<std::mutex> lock(mu_);
  QMOE_CU(cudaSetDevice(opt_.device));
  auto p = std::make_unique<CudaPacked>(spec, opt_.device);
  const LayerGeom& g = p->geom;
  if ((g.fc1.MT + 3) / 4 > 65535 || (g.fc2.MT + 3) / 4 > 65535)
    throw Error("cuda backend: inter/hidden size too large for the launch grid");
  const auto sizes = expected_sizes(spec);
  DevBuf* dst[] = {&p->fc1.w, &p->fc1.s, &p->fc1.z, &p->fc2.w, &p->fc2.s, &p->fc2.z, &p->bias_g, &p->bias_l, &p->bias2};
  // The zero fill runs on the backend's stream, ahead of the pack kernels there. (A plain cudaMemset
  // runs on the legacy default stream, which a non-blocking stream does not wait for: the fill could
  // land after the packed weights. That happened once the uploader stopped being made per prepack,
  // whose pinned allocation had been holding the first pack kernel back.)
  for (size_t i = 0; i < sizes.size(); ++i) {
    *dst[i] = DevBuf(sizes[i]);
    if (sizes[i]) QMOE_CU(cudaMemsetAsync(dst[i]->get(), 0, sizes[i], stream_));
  }

  // One staging buffer, sized for one expert of the largest matrix (weights + scales + zero points).
  const int pack = spec.pack();
  struct Src {
    const RawMatrix* m;
    Fc fc;
  };
  std::vector<Src> srcs = {{&raw.fc1, Fc::fc1}, {&raw.fc2, Fc::fc2}};
  if (spec.has_fc3()) srcs.push_back({&*raw.fc3, Fc::fc3});
  size_t stage_bytes = 0;
  for (const Src& s : srcs) {
    const int64_t N = fc_rows(spec, s.fc), K = fc_cols(spec, s.fc), nb = spec.blocks(K);
    const size_t wb = size_t(N * (K / pack)), sb = size_t(N * nb) * dtype_size(spec.scale_dtype);
    const size_t zb = s.m->zero_points ? size_t(s.m->zero_points->nbytes() / spec.num_experts) : 0;
    stage_bytes = std::max(stage_bytes, round_up(int64_t(wb), 256) + round_up(int64_t(sb), 256) + zb);
  }
  DevBuf stage(stage_bytes);
  // Uploads and packs run in order on the backend's stream: an expert's upload into the staging
  // buffer starts after the previous expert's pack kernels have read it, so one buffer suffices.
  if (!uploader_) uploader_ = std::make_unique<cuda::HostUploader>(stream_);
  cuda::HostUploader& up = *uploader_;
  for (const Src& s : srcs) {
    const int64_t N = fc_rows(spec, s.fc), K = fc_cols(spec, s.fc), nb = spec.blocks(K);
    const size_t wb = size_t(N * (K / pack)), sb = size_t(N * nb) * dtype_size(spec.scale_dtype);
    const size_t zb = s.m->zero_points ? size_t(s.m->zero_points->nbytes() / spec.num_experts) : 0;
    const bool is2 = s.fc == Fc::fc2;
    const MatrixGeom& mg = is2 ? g.fc2 : g.fc1;
    PackedMatrixBufs& out = is2 ? p->fc2 : p->fc1;
    cuda::PackArgs a;
    a.geom = mg;
    a.bits = spec.bits;
    a.raw_rows = N;
    a.raw_k = K;
    a.nb = nb;
    a.bs = spec.block_size;
    a.scale_elt = to_elt(spec.scale_dtype);
    a.zdefault = spec.default_zero_point();
    if (!is2 && spec.is_swiglu()) {
      a.swiglu_fusion = int(spec.swiglu_fusion);
      a.swiglu_src = spec.has_fc3() ? (s.fc == Fc::fc1 ? 0 : 1) : 2;
    }
    uint8_t* sw = stage.as<uint8_t>();
    uint8_t* ss = sw + round_up(int64_t(wb), 256);
    uint8_t* sz = ss + round_up(int64_t(sb), 256);
    for (int64_t e = 0; e < spec.num_experts; ++e) {
      up.copy(sw, s.m->weights.data_as<uint8_t>() + e * wb, wb);
      up.copy(ss, static_cast<const uint8_t*>(s.m->scales.data()) + e * sb, sb);
      if (zb) up.copy(sz, s.m->zero_points->data_as<uint8_t>() + e * zb, zb);
      a.raw_w = sw;
      a.raw_s = ss;
      a.raw_z = zb ? sz : nullptr;
      a.dst_w = out.w.as<uint8_t>() + e * mg.weight_bytes_per_expert();
      a.dst_s = out.s.as<uint8_t>() + size_t(e * mg.scale_count_per_expert()) * dtype_size(spec.scale_dtype);
      a.dst_z = out.z.bytes() ? out.z.as<uint8_t>() + e * mg.scale_count_per_expert() : nullptr;
      cuda::launch_pack(a, stream_);
      QMOE_CU(cudaGetLastError());
    }
  }
  QMOE_CU(cudaStreamSynchronize(stream_));
  // Biases (tiny): converted to fp32 on the host.
  const int64_t E = spec.num_experts, I = spec.inter, H = spec.hidden;
  if (p->bias_g.bytes()) {
    std::vector<float> h(size_t(E * g.I64), 0.f);
    const int64_t N1 = spec.fc1_rows();
    if (!spec.is_swiglu()) upload_bias(spec, raw.fc1.bias, N1, 0, 1, I, g.I64, h);
    else if (spec.swiglu_fusion == SwigluFusion::interleaved) upload_bias(spec, raw.fc1.bias, N1, 0, 2, I, g.I64, h);
    else upload_bias(spec, raw.fc1.bias, N1, 0, 1, I, g.I64, h);
    QMOE_CU(cudaMemcpy(p->bias_g.get(), h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  }
  if (p->bias_l.bytes()) {
    std::vector<float> h(size_t(E * g.I64), 0.f);
    const int64_t N1 = spec.fc1_rows();
    if (spec.has_fc3()) upload_bias(spec, raw.fc3->bias, I, 0, 1, I, g.I64, h);
    else if (spec.swiglu_fusion == SwigluFusion::interleaved) upload_bias(spec, raw.fc1.bias, N1, 1, 2, I, g.I64, h);
    else upload_bias(spec, raw.fc1.bias, N1, I, 1, I, g.I64, h);
    QMOE_CU(cudaMemcpy(p->bias_l.get(), h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  }
  if (p->bias2.bytes()) {
    std::vector<float> h(size_t(E * H));
    upload_bias(spec, raw.fc2.bias, H, 0, 1, H, H, h);
    QMOE_CU(cudaMemcpy(p->bias2.get(), h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  }
  QMOE_CU(cudaDeviceSynchronize());
  return p;
}

std::unique_ptr<PackedExperts> CudaBackend::from_blobs(const MoeSpec& spec, std::vector<NamedTensor> blobs) {
  spec.validate();
  QMOE_CU(cudaSetDevice(opt_.device));
  auto p = std::make_unique<CudaPacked>(spec, opt_.device);
  const auto sizes = expected_sizes(spec);
  const auto names = CudaPacked::names();
  DevBuf* dst[] = {&p->fc1.w, &p->fc1.s, &p->fc1.z, &p->fc2.w, &p->fc2.s, &p->fc2.z, &p->bias_g, &p->bias_l, &p->bias2};
  for (size_t i = 0; i < sizes.size(); ++i) {
    const NamedTensor* b = nullptr;
    for (const auto& nb : blobs)
      if (nb.name == names[i]) b = &nb;
    if (!sizes[i]) {
      if (b) throw Error("packed file: unexpected blob " + names[i] + " for spec " + spec.to_string());
      continue;
    }
    if (!b) throw Error("packed file: blob " + names[i] + " is missing");
    if (b->tensor.nbytes() != sizes[i])
      throw Error("packed file: blob " + names[i] + " has " + std::to_string(b->tensor.nbytes()) + " bytes, expected " +
                  std::to_string(sizes[i]));
    *dst[i] = DevBuf(sizes[i]);
    QMOE_CU(cudaMemcpy(dst[i]->get(), b->tensor.data(), sizes[i], cudaMemcpyHostToDevice));
  }
  // cudaMemcpy from pageable memory may return before its DMA lands, and the runs' non-blocking
  // streams do not wait for the legacy stream it used.
  QMOE_CU(cudaDeviceSynchronize());
  return p;
}

// ---------------------------------------------------------------------------------------------
// run
// ---------------------------------------------------------------------------------------------

// x can be read straight from the input when it already is the compute type and rows are span-padded.
bool input_direct(const MoeSpec& s) {
  return (s.act_dtype == DType::f16 || s.act_dtype == DType::bf16) && s.hidden % 64 == 0;
}

// A run's routed slots and the experts they can touch: this backend's (an expert-parallel slice holds
// some of the layer's) and the whole layer's, whose average tokens per expert the slice sees too.
struct RunCounts {
  int64_t slots, touched, touched_all;
  RunCounts(const CudaPacked& p, int64_t rows)
      : slots(rows * p.route_spec.k),
        touched(std::min<int64_t>(p.spec().num_experts, slots)),
        touched_all(std::min<int64_t>(p.route_spec.num_experts, slots)) {}
  // Work items of at most `chunk` tokens: the full ones plus one partial item per touched expert.
  int items(int chunk) const { return int(touched + slots / chunk); }
};

RunConfig CudaBackend::config_for(const CudaPacked& p, int64_t rows) const {
  RunConfig c;
  const RunCounts n(p, rows);
  const int64_t slots = n.slots, touched_all = n.touched_all;
  const int64_t avg = touched_all ? (slots + touched_all - 1) / touched_all : 0;
  const WgmmaFrom from = wgmma_from(p);
  if (sm90_ && from.tokens > 0 && (opt_.gemm == CudaGemm::sm90 || from.pays(avg, slots))) {
    c.sm90 = true;
    c.chunk = sm90_n_ ? std::min(sm90_n_, 128) : cuda::sm90_width(avg);  // 192: run_config
    c.nt = c.chunk / 8;
    c.max_items = n.items(c.chunk);
    c.spans_per_split = p.geom.fc2.S;
    return c;
  }
  // n-tiles of 8 tokens per work item: an expert with more tokens than a chunk streams its weights
  // once per chunk, so the chunk is sized to hold most experts' tokens whole (H200, block-shared
  // activations, same call: mixtral T=64, 16 tokens per expert, int4 b128 547 -> 527 us with nt = 4
  // instead of 2; gpt-oss-20b T=64, 8 per expert, int4 b32 361 -> 278 us with nt = 2 instead of 1).
  c.nt = avg <= 6 ? 1 : avg <= 12 ? 2 : 4;
  c.chunk = 8 * c.nt;
  c.max_items = n.items(c.chunk);
  // Parallelism: aim for ~24 streaming warps per SM. At one token, first split K inside a block (kw
  // warps per tile, >= 3 spans each); then (fc2 only) across blocks, with >= 4 spans per split.
  const int64_t target = int64_t(sms_) * 24;
  const int64_t items = std::max(c.max_items, 1);
  auto pick_kw = [&](int64_t warps, int64_t S) {
    int kw = 1;
    while (kw < 4 && warps * kw < target && S / (2 * kw) >= 3) kw *= 2;
    return kw;
  };
  // Two tiles per warp from 2 tokens per expert: they share the B fragments (measured on an H100:
  // mixtral T=8 361 -> 331 us, deepseek T=64 2574 -> 2365 us; on an H200 with 2 and 4 n-tiles:
  // mixtral int4 b128 T=64 463 -> 413 us, int8 563 -> 467, gpt-oss-20b int4 b128 220 -> 207; blocks
  // of 32 +3-7%), one at 1 token per expert (two were slower there: 128 -> 140 us).
  c.tpw = avg >= 2 ? 2 : 1;
  const int tpw = c.tpw;
  const int64_t w1 = (p.geom.fc1.MT + tpw - 1) / tpw, w2 = (p.geom.fc2.MT + tpw - 1) / tpw;
  // One token (rows == 1): top-k picks distinct experts, so no work item holds more than one slot
  // (xr = 1). Else (xr = 8) a block's warps share the item's activation stages, so they share one K
  // range: no split inside the block (kw = 1), fc2 splits across blocks only.
  const bool one_token = rows == 1 && c.nt == 1 && c.tpw == 1;
  auto plan = [&](bool xr1) {
    c.xr = xr1 ? 1 : 8;
    // 4-bit weights: two warps per fc1 tile whatever pick_kw says (H100, T = 1, three runs: every
    // 4-bit case whose split changed was 1-9% faster, e.g. mixtral int4 b128 94.2 -> 85.8 us, gpt-oss-20b
    // 45.1 -> 42.4, qwen3-30b-a3b 28.9 -> 28.3; with 8-bit weights gpt-oss-20b was 5% slower), and fc2
    // split across blocks only (kw2 = 1, so more splits below; H100, two runs: qwen3-30b-a3b int4 b128
    // 26.5, 27.4 -> 25.2, 25.3 us, b32 -1.9 us, gpt-oss-20b -0.5..-1.1 us, mixtral within the spread).
    const bool w4 = p.geom.fc1.sbits == 4;
    c.kw1 = xr1 ? (w4 && p.geom.fc1.S >= 6 ? 2 : pick_kw(items * w1, p.geom.fc1.S)) : 1;
    c.kw2 = xr1 && !w4 ? pick_kw(items * w2, p.geom.fc2.S) : 1;
    const int64_t warps = items * w2 * c.kw2;
    int64_t splits = std::clamp<int64_t>((target + warps - 1) / warps, 1, 16);
    splits = std::min<int64_t>(splits, std::max<int64_t>(1, p.geom.fc2.S / (4 * c.kw2)));
    c.spans_per_split = (p.geom.fc2.S + splits - 1) / splits;
    c.splits = int((p.geom.fc2.S + c.spans_per_split - 1) / c.spans_per_split);
  };
  plan(one_token);
  // With 4-bit weights an xr = 1 block stages its token for its K range (fc1: all of H; fc2: one
  // split); where that would not fit, the xr = 8 kernels run.
  const bool stage_fits = p.geom.fc1.sbits != 4 || std::max(cuda::token_stage_bytes(p.geom.fc1.S),
                                                            cuda::token_stage_bytes(c.spans_per_split)) <= cuda::kMaxTokenStage;
  if (one_token && !stage_fits) plan(false);
  return c;
}

// config_for, then width 192 where both matrices' loops have room for it (wgmma_wide_serves) and, unless
// QMOE_CUDA_SM90_N fixes the width, where it pays (sm90_wide_pays). Applied per run only: width 192 makes
// fewer work items than 128, so config_for's items bound every run's and the workspace sizes (reserve)
// need not depend on it, nor pay sm90_wide_pays's sum at every row count.
RunConfig CudaBackend::run_config(const CudaPacked& p, int64_t rows) const {
  RunConfig c = config_for(p, rows);
  if (!c.sm90 || c.chunk != 128 || (sm90_n_ && sm90_n_ != 192) || !wgmma_wide_serves(p)) return c;
  const RunCounts n(p, rows);
  if (!sm90_n_ && !cuda::sm90_wide_pays(double(n.slots) / double(n.touched_all), p.route_spec.k,
                                        p.route_spec.num_experts))
    return c;
  c.chunk = 192;
  c.nt = c.chunk / 8;
  c.max_items = n.items(c.chunk);
  return c;
}

size_t CudaBackend::reserve(const CudaPacked& p, int64_t rows) {
  if (rows <= ws_.rows && ws_.key == ws_key(p)) {
    size_t n = 0;
    for (DevBuf* b : {&ws_.counts, &ws_.route_e, &ws_.route_w, &ws_.sorted, &ws_.items, &ws_.n_items, &ws_.xbuf,
                      &ws_.abuf, &ws_.ybuf, &ws_.in, &ws_.logits, &ws_.rw, &ws_.out})
      n += b->bytes();
    return n;
  }
  const MoeSpec& s = p.spec();
  QMOE_CU(cudaSetDevice(opt_.device));
  QMOE_CU(cudaStreamSynchronize(stream_));
  ws_ = Workspace{};
  const int64_t Eg = p.route_spec.num_experts, k = p.route_spec.k;  // routing: all experts of the layer
  const int64_t R = std::max<int64_t>(rows, 1), slots = R * k;
  // Exact maxima over every row count up to R (config_for is a few arithmetic operations; run_config's
  // width 192 only lowers max_items).
  int64_t max_items = 0, ysize = 0;
  const bool need_x = !input_direct(s);
  bool sm90 = false;
  for (int64_t r = 1; r <= R; ++r) {
    const RunConfig c = config_for(p, r);
    max_items = std::max<int64_t>(max_items, c.max_items);
    ysize = std::max<int64_t>(ysize, int64_t(c.splits) * r * k);
    sm90 = sm90 || c.sm90;
  }
  const size_t ct = 2, at = dtype_size(s.act_dtype);
  Workspace w;
  w.rows = R;
  w.key = ws_key(p);
  w.counts = DevBuf(size_t(Eg) * 4);
  // Zeroed before any run's stream can use it (the device synchronisation below; the routing kernels
  // return the counters to zero).
  QMOE_CU(cudaMemsetAsync(w.counts.get(), 0, w.counts.bytes(), stream_));
  w.route_e = DevBuf(size_t(slots) * 4);
  w.route_w = DevBuf(size_t(slots) * 4);
  w.sorted = DevBuf(size_t(slots) * 4);
  w.items = DevBuf(size_t(std::max<int64_t>(max_items, 1)) * 16);
  w.n_items = DevBuf(8);  // the work items, then the positions filled
  if (need_x) w.xbuf = DevBuf(size_t(R * p.geom.H64) * ct);
  w.abuf = DevBuf(size_t(slots * p.geom.I64) * ct);
  // The wgmma kernels' fc2 copies whole boxes of rows, past an item's own into rows an expert-parallel
  // run's fc1 never writes (slots of other ranks' experts): initialized once, they hold finite values.
  if (sm90) QMOE_CU(cudaMemsetAsync(w.abuf.get(), 0, w.abuf.bytes(), stream_));
  // The wgmma kernels read x gathered into expert order, one row per slot (a tensor copy cannot
  // gather), from ybuf: fc1 has read it before fc2 writes y there (both launched plainly, in order).
  const int64_t gathered = sm90 ? slots * p.geom.H64 * int64_t(ct) : 0;
  w.ybuf = DevBuf(size_t(std::max<int64_t>(ysize * s.hidden * 4, gathered)));
  w.in = DevBuf(size_t(R * s.hidden) * at);
  w.logits = DevBuf(size_t(R * Eg) * at);
  w.rw = DevBuf(size_t(R * Eg) * at);
  w.out = DevBuf(size_t(R * s.hidden) * at);
  QMOE_CU(cudaDeviceSynchronize());
  ws_ = std::move(w);
  return reserve(p, rows);
}

void CudaBackend::run_core(const CudaPacked& p, const void* in, const void* logits, const void* rw, void* out,
                           int64_t rows, cudaStream_t st, const CudaSliceRunArgs* slice) {
  const MoeSpec& s = p.spec();
  const MoeSpec& rs = p.route_spec;  // == s except for an expert-parallel slice
  if (rows > ws_.rows || !(ws_.key == ws_key(p)))
    throw Error("cuda backend: the workspace holds " + std::to_string(ws_.rows) + " rows for another layer shape or " +
                "fewer rows than " + std::to_string(rows) + " (call cuda_reserve_workspace for this layer first)");
  if (rows == 0) return;
  const RunConfig c = run_config(p, rows);
  const Elt ae = to_elt(s.act_dtype), ct = compute_elt(s.act_dtype);
  const int64_t slots = rows * rs.k;

  cuda::RouteArgs ra;
  ra.logits = logits;
  ra.router_weights = rw;
  ra.elt = ae;
  ra.T = rows;
  ra.E = int(rs.num_experts);
  ra.k = int(rs.k);
  ra.normalize = rs.normalize_routing_weights;
  ra.sparse_mixer = rs.use_sparse_mixer;
  ra.jitter_eps = kSparseMixerJitterEps;
  ra.route_e = ws_.route_e.as<int>();
  ra.route_w = ws_.route_w.as<float>();
  ra.counts = ws_.counts.as<int>();

  cuda::GroupArgs ga;
  ga.E = int(rs.num_experts);
  ga.slots = slots;
  ga.chunk = c.chunk;
  ga.route_e = ra.route_e;
  ga.counts = ra.counts;
  ga.items = ws_.items.as<int4>();
  ga.n_items = ws_.n_items.as<int>();
  ga.n_pos = ga.n_items + 1;
  ga.sorted_slot = ws_.sorted.as<int>();
  ga.e_first = int(p.first_expert);
  ga.e_count = int(s.num_experts);
  if (slice && slice->route_e) {  // expert parallel, all-to-all: routes came with the tokens
    ra.route_e = const_cast<int*>(slice->route_e);  // only read from here on (group, fc, combine)
    ra.route_w = const_cast<float*>(slice->route_w);
    ga.route_e = slice->route_e;
    ga.counts = slice->counts;
    cuda::launch_group(ga, st);
  } else {
    cuda::launch_route_group(ra, ga, st);
  }

  const void* x = in;
  int64_t x_ld = s.hidden;
  if (c.sm90) {
    cuda::launch_convert_input(in, ae, ws_.ybuf.get(), ct, slots, s.hidden, p.geom.H64, true, pdl_, st,
                               ga.sorted_slot, int(rs.k), ga.n_pos);
    x = ws_.ybuf.get();  // (reserve)
    x_ld = p.geom.H64;
  } else if (!input_direct(s)) {
    cuda::launch_convert_input(in, ae, ws_.xbuf.get(), ct, rows, s.hidden, p.geom.H64, false, pdl_, st);
    x = ws_.xbuf.get();
    x_ld = p.geom.H64;
  }

  cuda::FcArgs f1;
  f1.geom = p.geom.fc1;
  f1.w = p.fc1.w.as<uint8_t>();
  f1.experts = s.num_experts;
  f1.s = p.fc1.s.get();
  f1.scale_elt = to_elt(s.scale_dtype);
  f1.z = p.fc1.z.bytes() ? p.fc1.z.as<uint8_t>() : nullptr;
  f1.zdefault = s.default_zero_point();
  f1.ct = ct;
  f1.items = ga.items;
  f1.n_items = ga.n_items;
  f1.sorted_slot = ga.sorted_slot;
  f1.max_items = c.max_items;
  f1.nt = c.nt;
  f1.k = int(rs.k);
  f1.x = x;
  f1.x_ld = x_ld;
  f1.a = ws_.abuf.get();
  f1.a_ld = p.geom.I64;
  f1.I = s.inter;
  f1.bias_g = p.bias_g.bytes() ? p.bias_g.as<float>() : nullptr;
  f1.bias_l = p.bias_l.bytes() ? p.bias_l.as<float>() : nullptr;
  f1.act = int(s.activation);
  f1.limit = s.swiglu_limit;
  f1.alpha = s.activation_alpha;
  f1.beta = s.activation_beta;
  f1.slots = slots;
  f1.H = s.hidden;
  f1.splits = 1;
  f1.spans_per_split = p.geom.fc1.S;
  f1.kw = c.kw1;
  f1.tpw = c.tpw;
  f1.xr = c.xr;
  f1.pdl = pdl_ && !c.sm90;  // the wgmma kernels are launched plainly
  if (c.sm90) {
    QMOE_CU(cuda::launch_fc1_sm90(f1, st));
  } else {
    cuda::launch_fc1(f1, st);
  }

  cuda::FcArgs f2 = f1;
  f2.geom = p.geom.fc2;
  f2.w = p.fc2.w.as<uint8_t>();
  f2.s = p.fc2.s.get();
  f2.z = p.fc2.z.bytes() ? p.fc2.z.as<uint8_t>() : nullptr;
  f2.x = ws_.abuf.get();
  f2.x_ld = p.geom.I64;
  f2.y = ws_.ybuf.as<float>();
  f2.splits = c.splits;
  f2.spans_per_split = c.spans_per_split;
  f2.kw = c.kw2;
  f2.tpw = c.tpw;
  if (c.sm90) {
    QMOE_CU(cuda::launch_fc2_sm90(f2, st));
  } else {
    cuda::launch_fc2(f2, st);
  }

  cuda::CombineArgs ca;
  ca.y = f2.y;
  ca.splits = c.splits;
  ca.slots = slots;
  ca.T = rows;
  ca.H = s.hidden;
  ca.k = int(rs.k);
  ca.route_e = ra.route_e;
  ca.route_w = ra.route_w;
  ca.bias2 = p.bias2.bytes() ? p.bias2.as<float>() : nullptr;
  ca.out = out;
  ca.out_elt = ae;
  ca.pdl = pdl_;
  if (slice) {  // expert parallel: fp32 partial of this slice's routes (ep_kernels.cu)
    ca.out = slice->partial;
    ca.out_elt = Elt::f32;
    cuda::launch_combine_partial(ca, int(p.first_expert), int(s.num_experts), st);
  } else {
    cuda::launch_combine(ca, st);
  }
  QMOE_CU(cudaGetLastError());
}

void CudaBackend::run(const PackedExperts& packed, const MoeInputs& inputs, Tensor& output) {
  const CudaPacked& p = check_packed(packed);
  const MoeSpec& s = p.spec();
  if (p.is_slice()) throw Error("cuda backend: these weights are one rank's expert slice; run them through ExpertParallelLayer");
  validate_inputs(s, inputs);
  if (output.dtype() != inputs.input.dtype || output.shape() != inputs.input.shape)
    throw Error("output: expected " + std::string(dtype_name(inputs.input.dtype)) + " " +
                shape_str(inputs.input.shape) + ", got " + std::string(dtype_name(output.dtype())) + " " +
                shape_str(output.shape()));
  std::lock_guard<std::mutex> lock(mu_);
  QMOE_CU(cudaSetDevice(opt_.device));
  const int64_t rows = input_rows(inputs);
  if (rows == 0) return;
  reserve(p, rows);
  const size_t at = dtype_size(s.act_dtype);
  QMOE_CU(cudaMemcpyAsync(ws_.in.get(), inputs.input.data, size_t(rows * s.hidden) * at, cudaMemcpyHostToDevice, stream_));
  QMOE_CU(cudaMemcpyAsync(ws_.logits.get(), inputs.router_probs.data, size_t(rows * s.num_experts) * at,
                          cudaMemcpyHostToDevice, stream_));
  if (inputs.router_weights)
    QMOE_CU(cudaMemcpyAsync(ws_.rw.get(), inputs.router_weights->data, size_t(rows * s.num_experts) * at,
                            cudaMemcpyHostToDevice, stream_));
  run_core(p, ws_.in.get(), ws_.logits.get(), inputs.router_weights ? ws_.rw.get() : nullptr, ws_.out.get(), rows,
           stream_);
  QMOE_CU(cudaMemcpyAsync(output.data(), ws_.out.get(), size_t(rows * s.hidden) * at, cudaMemcpyDeviceToHost, stream_));
  QMOE_CU(cudaStreamSynchronize(stream_));
  QMOE_CU(cudaGetLastError());
}

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& opt) { return std::make_unique<CudaBackend>(opt); }

void cuda_run_device(Backend& backend, const PackedExperts& packed, const CudaRunArgs& args) {
  auto* b = dynamic_cast<CudaBackend*>(&backend);
  if (!b) throw Error("cuda_run_device: backend '" + backend.name() + "' is not the cuda backend");
  const CudaPacked& p = b->check_packed(packed);
  if (p.is_slice()) throw Error("cuda_run_device: these weights are one rank's expert slice; use ExpertParallelLayer");
  b->run_core(p, args.input, args.router_probs, args.router_weights, args.output, args.rows,
              static_cast<cudaStream_t>(args.stream));
}

size_t cuda_reserve_workspace(Backend& backend, const PackedExperts& packed, int64_t rows) {
  auto* b = dynamic_cast<CudaBackend*>(&backend);
  if (!b) throw Error("cuda_reserve_workspace: backend '" + backend.name() + "' is not the cuda backend");
  return b->reserve(b->check_packed(packed), rows);
}

// ---- expert parallel (cuda_slice.h; the NCCL side is cuda_ep.cpp) ----

std::unique_ptr<PackedExperts> cuda_prepack_slice(Backend& backend, const MoeSpec& global, RawExperts raw_slice,
                                                  const ExpertRange& range) {
  auto* b = dynamic_cast<CudaBackend*>(&backend);
  if (!b) throw Error("cuda_prepack_slice: backend '" + backend.name() + "' is not the cuda backend");
  global.validate();
  if (global.num_experts > 4096)  // grouping keeps 3 counters per global expert in shared memory
    throw Error("cuda backend: num_experts " + std::to_string(global.num_experts) + " > 4096 is not supported");
  auto packed = b->prepack(local_spec(global, range), std::move(raw_slice));
  auto* p = dynamic_cast<CudaPacked*>(packed.get());
  p->route_spec = global;
  p->first_expert = range.first;
  return packed;
}

void cuda_run_slice(Backend& backend, const PackedExperts& slice, const CudaSliceRunArgs& args) {
  auto* b = dynamic_cast<CudaBackend*>(&backend);
  if (!b) throw Error("cuda_run_slice: backend '" + backend.name() + "' is not the cuda backend");
  const CudaPacked& p = b->check_packed(slice);
  if (!args.partial) throw Error("cuda_run_slice: no partial output buffer");
  if (!args.route_e && !args.router_probs) throw Error("cuda_run_slice: neither logits nor routes given");
  if (args.route_e && (!args.route_w || !args.counts)) throw Error("cuda_run_slice: routes need weights and counts");
  b->run_core(p, args.input, args.router_probs, args.router_weights, nullptr, args.rows, args.stream, &args);
}

}  // namespace qmoe
