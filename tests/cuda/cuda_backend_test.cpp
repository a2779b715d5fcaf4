// GPU tests of the CUDA backend against reference_forward (the scalar oracle).
//
// Built only with QMOE_CUDA=ON, as its own executable (qmoe_cuda_tests). Exits 0 with a message when
// no CUDA device is visible, so it is safe in CI. Usage: qmoe_cuda_tests [--quick] [--only N] [--gemm G]
//   --list    the configurations with their indices (no device needed)
//   --quick   the uploader check and the first 12 configurations (for compute-sanitizer runs)
//   --wide    the configurations of at most 520 tokens with more than 48 per expert, which the wgmma
//             kernels run at their widest (N = 128; for compute-sanitizer runs with --gemm sm90)
//   --gemm    auto (default) | sm80 | sm90: sm90 forces the Hopper wgmma kernels on every
//             configuration they serve (all but block size 16), whatever the batch
//
// What it checks, per configuration (seeded; a failure prints seed, spec, first bad index, values):
//  * layout: every code of the packed fc1/fc2 blobs decoded with element_of() (the layout header's
//    index function) equals the raw code (unpack(pack(w)) == w), padding codes are 0;
//  * the output is fully written (output poisoned with NaN bytes first) and close to the reference:
//      relative L2 error <= 1.2 u_c + u_T  and  |out - ref| <= 6 u_c rms(ref) + 2 u_T |ref| elementwise,
//    where u_c is the unit roundoff of the compute type the activations pass through (fc1's
//    activation `a` is stored as fp16 (2^-11) or bf16 (2^-8) for fc2; fp32 inputs are also rounded
//    to bf16, so u_c doubles) and u_T that of the output type. Reason: the mma sums exact integer
//    weights (q - z) times x, scales are applied in fp32 per block, so besides fp32 accumulation the
//    only error is each a_i's rounding (relative <= u_c, mean-square u_c^2/3); through fc2's random-sign
//    dot products that gives an output error of ~0.58 u_c relative in L2 (1.2 u_c is 2x margin) and a
//    per-element standard deviation of ~0.58 u_c rms(ref) (6 u_c is ~10 sigma);
//    except for bf16 with bf16 block-wise scales, where both kernel families feed the tensor cores
//    s * (q - z) rounded to bf16 (DQ: relative <= u_c, mean-square u_c^2/3 per weight), in fc1 and
//    fc2. Each of those two roundings adds an error term of the same form and size as a_i's, so three
//    equal terms: ~1.0 u_c relative in L2 (measured 3.4-3.8e-3 = 0.9-1.0 u_c on an H100) and a
//    per-element deviation of ~1.0 u_c rms(ref). There the bounds are 2 u_c + u_T and
//    10 u_c rms(ref) + 2 u_T |ref| (the same margins; 6 u_c failed 1 of 4.2M elements of a K = 48
//    case at 6.6 sigma, where few terms give heavier tails than a normal law). fp32 layers with bf16
//    block-wise scales take DQ too and keep their bounds: u_c, already doubled for them, covers the
//    two extra terms (measured <= 3.8e-3 against 9.4e-3 in L2 on an H100);
//  * a second run is bitwise identical;
//  * for every 3rd configuration: the device-pointer core captured in a CUDA graph and replayed
//    gives bitwise the same output as the host-tensor run.
// Before the configurations (counted as one more): prepack's host-to-device uploader on its own
// (check_uploader).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda_sm80_layout.h"
#include "cuda/host_upload.h"
#include "qmoe/cuda_backend.h"
#include "qmoe/error.h"
#include "qmoe/reference.h"
#include "reference_bound.h"

using namespace qmoe;

namespace {

#define CU(call)                                                                                  \
  do {                                                                                            \
    cudaError_t e_ = (call);                                                                      \
    if (e_ != cudaSuccess) throw Error(std::string(#call) + ": " + cudaGetErrorString(e_));       \
  } while (0)

struct Case {
  MoeSpec spec;
  int64_t T = 1;
  bool one_expert = false;  // all tokens routed to the same expert(s)
  bool router_weights = false;
  // mixed: logits drawn from {-inf, -1, -0, +0, 1, +inf, NaN}: ties, signed zeros, infinities and
  // NaN, first or later, in every token; all_nan, all_neg_inf: every logit that value (the routing's
  // NaN and tie rules; use with router_weights, so outputs stay finite).
  enum class Special { none, mixed, all_nan, all_neg_inf } special_logits = Special::none;
  uint64_t seed = 0;
};

const char* special_name(Case::Special s) {
  switch (s) {
    case Case::Special::mixed: return " special-logits";
    case Case::Special::all_nan: return " logits-all-nan";
    case Case::Special::all_neg_inf: return " logits-all-neg-inf";
    default: return "";
  }
}

float urand(std::mt19937_64& r, float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(r); }
int64_t irand(std::mt19937_64& r, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(r); }

Tensor rand_float(std::mt19937_64& r, DType t, Shape shape, float lo, float hi, bool random_sign = false) {
  Tensor x(t, shape);
  for (int64_t i = 0; i < x.numel(); ++i) {
    float v = urand(r, lo, hi);
    if (random_sign && (r() & 1)) v = -v;
    store_from_float(t, x.data(), i, v);
  }
  return x;
}

Tensor rand_bytes(std::mt19937_64& r, Shape shape) {
  Tensor x(DType::u8, shape);
  auto* p = x.data_as<uint8_t>();
  for (int64_t i = 0; i < x.numel(); ++i) p[i] = uint8_t(r());
  return x;
}

RawMatrix make_matrix(std::mt19937_64& r, const MoeSpec& s, Fc fc, bool zp, bool bias) {
  RawMatrix m;
  const int64_t K = fc_cols(s, fc);
  m.weights = rand_bytes(r, raw_weight_shape(s, fc));
  // |q - z| ~ 2^bits / sqrt(12) and x ~ U(-1,1): keep fc outputs O(1).
  const float qstd = float(1 << s.bits) / 3.4641f;
  const float mag = 1.7f / (qstd * std::sqrt(float(K)));
  m.scales = rand_float(r, s.scale_dtype, raw_scale_shape(s, fc), 0.5f * mag, 1.5f * mag, true);
  if (zp) m.zero_points = rand_bytes(r, raw_zero_point_shape(s, fc));
  if (bias) m.bias = rand_float(r, s.act_dtype, raw_bias_shape(s, fc), -0.5f, 0.5f);
  return m;
}

RawExperts make_raw(std::mt19937_64& r, const MoeSpec& s) {
  RawExperts raw;
  raw.fc1 = make_matrix(r, s, Fc::fc1, s.fc1_zero_points, s.fc1_bias);
  raw.fc2 = make_matrix(r, s, Fc::fc2, s.fc2_zero_points, s.fc2_bias);
  if (s.has_fc3()) raw.fc3 = make_matrix(r, s, Fc::fc3, s.fc3_zero_points, s.fc3_bias);
  return raw;
}

// Layout check: decode packed weights with the layout's own index function and compare with raw.
bool check_layout(const MoeSpec& s, const RawExperts& raw, const PackedExperts& packed, std::string& why) {
  using namespace qmoe::cuda;
  const auto blobs = packed.to_blobs();
  auto blob = [&](const std::string& n) -> const Tensor* {
    for (const auto& b : blobs)
      if (b.name == n) return &b.tensor;
    return nullptr;
  };
  const int64_t I64 = (s.inter + 63) / 64 * 64;
  struct M {
    const char* name;
    MatrixGeom g;
    bool fc1;
  } ms[] = {{"fc1.weights",
             make_geom(s.inter, s.hidden, I64, s.bits, s.block_size, s.is_swiglu() ? RowMap::swiglu : RowMap::plain),
             true},
            {"fc2.weights", make_geom(s.hidden, s.inter, (s.hidden + 15) / 16 * 16, s.bits, s.block_size, RowMap::plain),
             false}};
  for (const M& m : ms) {
    const Tensor* t = blob(m.name);
    if (!t) return why = std::string("missing blob ") + m.name, false;
    if (int64_t(t->nbytes()) != s.num_experts * m.g.weight_bytes_per_expert())
      return why = std::string("blob size ") + m.name, false;
    const uint8_t* p = t->data_as<uint8_t>();
    const int sk = span_k(m.g.sbits);
    for (int64_t e = 0; e < s.num_experts; ++e)
      for (int64_t mt = 0; mt < m.g.MT; ++mt)
        for (int64_t sp = 0; sp < m.g.S; ++sp)
          for (int lane = 0; lane < kLanes; ++lane)
            for (int byte = 0; byte < kVecBytes; ++byte)
              for (int hi = 0; hi < (m.g.sbits == 4 ? 2 : 1); ++hi) {
                const uint8_t b = p[((e * m.g.MT + mt) * m.g.S + sp) * kSpanBytes + lane * kVecBytes + byte];
                const int got = m.g.sbits == 8 ? b : (b >> (4 * hi)) & 15;
                int f, kk;
                element_of(m.g.sbits, lane, byte, hi, f, kk);
                const int64_t c = sp * sk + kk;
                // logical source of tile row f
                const RawMatrix* src = m.fc1 ? &raw.fc1 : &raw.fc2;
                int64_t row = 16 * mt + f, nrows = m.fc1 ? s.fc1_rows() : s.hidden;
                bool valid = row < (m.fc1 ? s.inter : s.hidden);
                if (m.fc1 && s.is_swiglu()) {
                  const int part = f >> 3;
                  const int64_t i = 8 * mt + (f & 7);
                  valid = i < s.inter;
                  if (s.swiglu_fusion == SwigluFusion::interleaved) row = 2 * i + part;
                  else if (s.swiglu_fusion == SwigluFusion::concatenated) row = part * s.inter + i;
                  else {
                    row = i;
                    if (part) src = &*raw.fc3, nrows = s.inter;
                  }
                }
                const int64_t K = m.fc1 ? s.hidden : s.inter;
                int want = 0;
                if (valid && c < K)
                  want = raw_code(src->weights.data_as<uint8_t>() + e * nrows * (K / s.pack()), K, s.bits, row, c);
                if (got != want) {
                  char buf[256];
                  std::snprintf(buf, sizeof buf, "%s e=%lld mt=%lld span=%lld lane=%d byte=%d hi=%d: code %d, raw %d",
                                m.name, (long long)e, (long long)mt, (long long)sp, lane, byte, hi, got, want);
                  why = buf;
                  return false;
                }
              }
  }
  return true;
}

struct Result {
  bool ok = true;
  std::string why;
  double rel = 0, maxerr = 0;
};

Result compare(const Case& c, const Tensor& out, const Tensor& ref) {
  Result res;
  const MoeSpec& s = c.spec;
  const test::ReferenceBound bound = test::reference_bound(s);  // header comment
  const int64_t n = ref.numel();
  double ss = 0, se = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(load_as_float(s.act_dtype, ref.data(), i)) * load_as_float(s.act_dtype, ref.data(), i);
  const double rms = std::sqrt(ss / std::max<int64_t>(n, 1));
  for (int64_t i = 0; i < n; ++i) {
    const float o = load_as_float(s.act_dtype, out.data(), i), r = load_as_float(s.act_dtype, ref.data(), i);
    const double d = std::fabs(double(o) - r);
    se += d * d;
    res.maxerr = std::max(res.maxerr, d);
    const double tol = bound.per_rms * rms + bound.per_ref * std::fabs(r);
    if (!(d <= tol) && res.ok) {  // NaN (unwritten poison) fails here too
      char buf[200];
      std::snprintf(buf, sizeof buf, "first bad index %lld (token %lld, h %lld): got %.7g, ref %.7g, tol %.3g",
                    (long long)i, (long long)(i / s.hidden), (long long)(i % s.hidden), o, r, tol);
      res.ok = false;
      res.why = buf;
    }
  }
  res.rel = ss > 0 ? std::sqrt(se / ss) : std::sqrt(se);
  if (res.ok && !(res.rel <= bound.rel_l2)) {
    res.ok = false;
    res.why = "relative L2 error " + std::to_string(res.rel) + " > " + std::to_string(bound.rel_l2);
  }
  return res;
}

Case random_case(int idx, uint64_t seed) {
  std::mt19937_64 r(seed);
  Case c;
  c.seed = seed;
  MoeSpec& s = c.spec;
  const int bits_pick[] = {4, 4, 4, 8, 8, 2};
  s.bits = bits_pick[irand(r, 0, 5)];
  const int64_t bs_pick[] = {0, 16, 32, 64, 128, 256};
  s.block_size = bs_pick[irand(r, 0, 5)];
  const Activation acts[] = {Activation::relu, Activation::gelu, Activation::silu, Activation::identity,
                             Activation::swiglu, Activation::swiglu, Activation::swiglu};
  s.activation = acts[irand(r, 0, 6)];
  if (s.is_swiglu()) {
    s.swiglu_fusion = SwigluFusion(irand(r, 0, 2));
    if (r() & 1) s.swiglu_limit = urand(r, 0.5f, 3.f), s.activation_alpha = 1.702f, s.activation_beta = 1.0f;
  }
  const DType acts_t[] = {DType::f16, DType::bf16, DType::f16, DType::bf16, DType::f32};
  s.act_dtype = acts_t[irand(r, 0, 4)];
  const DType sc_t[] = {DType::f16, DType::bf16, DType::f32};
  s.scale_dtype = sc_t[irand(r, 0, 2)];
  const int64_t E_pick[] = {1, 2, 3, 4, 8, 16, 32, 64, 128, 256};
  s.num_experts = E_pick[irand(r, 0, 9)];
  s.k = irand(r, 1, std::min<int64_t>(8, s.num_experts));
  if (s.k == 2 && (r() % 4 == 0)) s.use_sparse_mixer = true;
  s.normalize_routing_weights = r() & 1;
  const int64_t dims[] = {4, 8, 12, 20, 36, 60, 64, 100, 128, 132, 200, 256, 260, 384, 516, 1000, 1028};
  const int pack = s.pack();
  auto pick_dim = [&]() {
    int64_t d = dims[irand(r, 0, 16)];
    if (s.bits == 8 && (r() & 1)) d += 1;  // odd sizes where the format allows (8-bit: any)
    return (d + pack - 1) / pack * pack;
  };
  s.hidden = pick_dim();
  s.inter = pick_dim();
  s.fc1_bias = r() & 1;
  s.fc2_bias = r() & 1;
  s.fc1_zero_points = r() % 3 == 0;
  s.fc2_zero_points = r() % 3 == 0;
  if (s.has_fc3()) s.fc3_bias = r() & 1, s.fc3_zero_points = r() % 3 == 0;
  // Tokens: mostly decode sizes, some prefill; keep the scalar reference under ~4e7 MACs.
  const int64_t T_pick[] = {1, 1, 2, 3, 5, 8, 9, 16, 17, 33, 64, 65, 128, 300, 1024, 4096};
  c.T = T_pick[irand(r, 0, 15)];
  const int64_t per_tok = s.k * (s.fc1_rows() * s.hidden + (s.has_fc3() ? s.inter * s.hidden : 0) + s.inter * s.hidden);
  while (c.T > 1 && c.T * per_tok > 40'000'000) c.T = (c.T + 1) / 2;
  c.one_expert = r() % 8 == 0;
  c.router_weights = !s.use_sparse_mixer && r() % 5 == 0;
  (void)idx;
  return c;
}

std::vector<Case> all_cases() {
  std::vector<Case> cs;
  // Hand-picked edges first (these also form the --quick subset used under compute-sanitizer).
  auto base = [](int64_t E, int64_t k, int64_t H, int64_t I, int bits, int64_t bs, Activation a, DType t) {
    Case c;
    c.spec.num_experts = E, c.spec.k = k, c.spec.hidden = H, c.spec.inter = I, c.spec.bits = bits;
    c.spec.block_size = bs, c.spec.activation = a, c.spec.act_dtype = t, c.spec.scale_dtype = t;
    return c;
  };
  {
    Case c = base(8, 2, 256, 192, 4, 128, Activation::swiglu, DType::f16);
    c.spec.swiglu_fusion = SwigluFusion::interleaved, c.spec.swiglu_limit = 7.f, c.spec.activation_alpha = 1.702f;
    c.spec.activation_beta = 1.f, c.spec.fc1_bias = c.spec.fc2_bias = true, c.T = 3;
    cs.push_back(c);
  }
  // Decode (T = 1): the one-token FC variant (XR = 1) at every scale-block loop shape (bs 32: two
  // blocks per int4 span; 8-bit row-wise; bs 16: one per k-step), with zero points.
  {
    Case c = base(8, 2, 256, 192, 4, 32, Activation::swiglu, DType::bf16);
    c.spec.swiglu_fusion = SwigluFusion::interleaved, c.spec.swiglu_limit = 7.f, c.spec.activation_alpha = 1.702f;
    c.spec.activation_beta = 1.f, c.spec.fc1_zero_points = true, c.spec.fc2_bias = true, c.T = 1;
    cs.push_back(c);
  }
  {
    Case c = base(16, 4, 128, 96, 8, 0, Activation::gelu, DType::f16);
    c.spec.fc2_bias = true, c.spec.fc2_zero_points = true, c.T = 1;
    cs.push_back(c);
  }
  {
    Case c = base(4, 1, 64, 64, 4, 16, Activation::silu, DType::f16);
    c.spec.fc2_zero_points = true, c.T = 1;
    cs.push_back(c);
  }
  {  // K long enough for in-block split-K (kw = 2 in fc1 and fc2: partial sums through the rings)
    Case c = base(4, 2, 1024, 768, 4, 128, Activation::swiglu, DType::bf16);
    c.spec.swiglu_fusion = SwigluFusion::concatenated, c.T = 1;
    cs.push_back(c);
  }
  {
    Case c = base(4, 2, 130, 72, 8, 0, Activation::swiglu, DType::bf16);
    c.spec.swiglu_fusion = SwigluFusion::separate, c.spec.fc1_zero_points = true, c.spec.fc3_bias = true, c.T = 17;
    cs.push_back(c);
  }
  {
    Case c = base(16, 4, 64, 100, 2, 32, Activation::gelu, DType::bf16);
    c.spec.fc2_zero_points = true, c.spec.normalize_routing_weights = true, c.T = 9;
    cs.push_back(c);
  }
  {
    Case c = base(8, 1, 96, 64, 4, 16, Activation::relu, DType::f16);  // every token on one expert
    c.T = 200, c.one_expert = true, c.spec.fc1_zero_points = true;
    cs.push_back(c);
  }
  {
    Case c = base(256, 8, 64, 32, 4, 64, Activation::swiglu, DType::bf16);  // most experts empty
    c.spec.swiglu_fusion = SwigluFusion::concatenated, c.T = 2, c.spec.normalize_routing_weights = true;
    cs.push_back(c);
  }
  {
    Case c = base(4, 4, 48, 40, 8, 16, Activation::silu, DType::f32);  // k = E, fp32 activations
    c.spec.scale_dtype = DType::f16, c.T = 5, c.router_weights = true, c.spec.fc2_bias = true;
    cs.push_back(c);
  }
  {
    Case c = base(16, 2, 128, 64, 4, 32, Activation::identity, DType::f16);  // sparse mixer
    c.spec.use_sparse_mixer = true, c.T = 33;
    cs.push_back(c);
  }
  for (int64_t E : {64, 300}) {  // special logits; E = 300 takes the routing's general path (E > 256)
    Case c = base(E, 8, 64, 32, 4, 32, Activation::silu, DType::bf16);
    c.T = 37, c.router_weights = true, c.special_logits = Case::Special::mixed;
    cs.push_back(c);
    // One token: the one-warp routing kernel, which places the k choices by rank, so they must be
    // distinct whatever the logits hold.
    c.T = 1;
    for (auto sp : {Case::Special::mixed, Case::Special::mixed, Case::Special::all_nan, Case::Special::all_neg_inf}) {
      c.special_logits = sp;
      cs.push_back(c);
    }
  }
  {
    Case c = base(1, 1, 20, 12, 4, 0, Activation::relu, DType::bf16);  // E = 1, tiny odd sizes
    c.T = 4096;
    cs.push_back(c);
  }
  {
    Case c = base(8, 2, 64, 48, 4, 32, Activation::swiglu, DType::bf16);  // prefill, many tokens
    c.spec.swiglu_fusion = SwigluFusion::interleaved, c.T = 4096, c.spec.fc1_bias = true;
    cs.push_back(c);
  }
  {
    // 4 MiB of raw codes per expert matrix: prepack's upload splits each copy over its worker threads.
    Case c = base(2, 1, 2048, 2048, 8, 0, Activation::identity, DType::f16);
    c.T = 3;
    cs.push_back(c);
  }
  for (size_t i = 0; i < cs.size(); ++i) cs[i].seed = 1000 + i;
  for (int i = 0; i < 64; ++i) cs.push_back(random_case(i, 0x5eed0000ull + uint64_t(i)));
  // Prefill sizes for the wgmma kernels (several 128-token items per expert, a partial last item,
  // several 64-k stages and 128-row blocks, every scale-block loop shape), then the scale case of
  // the reliability issue: 65536 tokens with the workspace the API reports.
  const size_t n0 = cs.size();
  {
    Case c = base(8, 2, 256, 384, 4, 128, Activation::swiglu, DType::bf16);
    c.spec.swiglu_fusion = SwigluFusion::interleaved, c.spec.fc1_bias = c.spec.fc2_bias = true, c.T = 600;
    cs.push_back(c);
  }
  {
    Case c = base(4, 2, 260, 200, 8, 0, Activation::gelu, DType::f16);  // odd 8-bit span count
    c.spec.fc1_zero_points = c.spec.fc2_zero_points = true, c.T = 700;
    cs.push_back(c);
  }
  {
    Case c = base(4, 1, 384, 256, 4, 32, Activation::silu, DType::bf16);
    c.spec.fc1_zero_points = true, c.T = 513;
    cs.push_back(c);
  }
  {
    Case c = base(2, 2, 128, 192, 8, 64, Activation::swiglu, DType::f16);  // k = E: every expert full
    c.spec.swiglu_fusion = SwigluFusion::separate, c.spec.fc3_bias = true, c.T = 300;
    cs.push_back(c);
  }
  for (int64_t bs : {16, 32}) {
    // Two layers of one shape in a row on the backend: block 16 runs the SM80 family only and reads
    // its bf16 input in place, so its workspace has no converted-input buffer; block 32 at 64 tokens
    // per expert takes the wgmma kernels on Hopper, which need one. The second must not reuse the
    // first's workspace (the workspace key; an illegal memory access before 790007b).
    Case c = base(8, 2, 256, 128, 4, bs, Activation::swiglu, DType::bf16);
    c.spec.swiglu_fusion = SwigluFusion::concatenated, c.T = 256;
    cs.push_back(c);
  }
  for (int64_t bs : {128, 32}) {
    // The same at 8 tokens per expert, where the two blocks' crossovers differ: block 128 runs the SM80
    // family, block 32 (DQ) the wgmma kernels (wgmma_from).
    Case c = base(8, 2, 256, 128, 4, bs, Activation::swiglu, DType::bf16);
    c.spec.swiglu_fusion = SwigluFusion::concatenated, c.T = 32;
    cs.push_back(c);
  }
  for (DType sd : {DType::bf16, DType::f32}) {
    // The same for width 192 at 128 tokens per expert: with bf16 block scales (DQ) the wgmma kernels
    // take it and make fewer, wider work items; with fp32 ones (partial sums per scale block) they stay
    // at 128 and make more. The second reuses the first's workspace, whose item buffer must hold its items
    // (reserve sizes it for width 128, run_config in cuda_backend.cpp).
    Case c = base(8, 2, 256, 128, 4, 128, Activation::swiglu, DType::bf16);
    c.spec.scale_dtype = sd, c.spec.swiglu_fusion = SwigluFusion::concatenated, c.T = 512;
    cs.push_back(c);
  }
  {
    Case c = base(8, 2, 64, 48, 4, 32, Activation::swiglu, DType::bf16);
    c.spec.swiglu_fusion = SwigluFusion::concatenated, c.T = 65536;
    cs.push_back(c);
  }
  {  // fp16 row-wise 4-bit at 100 tokens per expert: the wgmma kernel's three-consumer blocks
    Case c = base(8, 2, 128, 192, 4, 0, Activation::silu, DType::f16);
    c.spec.fc1_zero_points = c.spec.fc2_bias = true, c.T = 400;
    cs.push_back(c);
  }
  for (int64_t bs : {64, 32}) {
    // 8-bit weights with bf16 block scales (DQ) at 128 tokens per expert: width 192, three consumers;
    // block 32 puts two scale blocks in each stage (KB = 2 in fc_sm90.cu)
    Case c = base(8, 2, 256, 384, 8, bs, Activation::swiglu, DType::bf16);
    c.spec.swiglu_fusion = SwigluFusion::concatenated, c.spec.fc2_zero_points = bs == 64, c.T = 512;
    cs.push_back(c);
  }
  for (size_t i = n0; i < cs.size(); ++i) cs[i].seed = 2000 + i;
  return cs;
}

MoeInputs make_inputs(const Case& c, std::mt19937_64& r, Tensor& x, Tensor& logits, Tensor& rw) {
  const MoeSpec& s = c.spec;
  x = rand_float(r, s.act_dtype, {c.T, s.hidden}, -1.f, 1.f);
  logits = rand_float(r, s.act_dtype, {c.T, s.num_experts}, -3.f, 3.f);
  if (c.special_logits == Case::Special::mixed) {
    const float v[7] = {-INFINITY, -1.f, -0.f, 0.f, 1.f, INFINITY, NAN};
    for (int64_t i = 0; i < logits.numel(); ++i) store_from_float(s.act_dtype, logits.data(), i, v[r() % 7]);
  } else if (c.special_logits != Case::Special::none) {
    const float v = c.special_logits == Case::Special::all_nan ? NAN : -INFINITY;
    for (int64_t i = 0; i < logits.numel(); ++i) store_from_float(s.act_dtype, logits.data(), i, v);
  }
  if (c.one_expert)
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t j = 0; j < s.k; ++j) {
        const int64_t e = (3 + j) % s.num_experts;
        store_from_float(s.act_dtype, logits.data(), t * s.num_experts + e, 20.f - float(j));
      }
  MoeInputs in;
  in.input = x.view();
  in.router_probs = logits.view();
  if (c.router_weights) {
    rw = rand_float(r, s.act_dtype, {c.T, s.num_experts}, 0.1f, 1.f);
    in.router_weights = rw.view();
  }
  return in;
}

// The prepack uploader (cuda/host_upload.h) on its own: copies through the pinned chunks (pieces of
// >= 1 MiB split over the worker threads, copies across chunk boundaries, back-to-back copies reusing
// the chunks) and direct pageable copies. The source range is overwritten as soon as each copy
// returns (the uploader's contract: the source has been read by then); the device must hold the
// original bytes.
bool check_uploader() {
  const size_t sizes[] = {0, 1, 4097, (size_t(1) << 20) + 3, (size_t(5) << 20) + 7, (size_t(40) << 20) + 13};
  size_t total = 0;
  for (size_t n : sizes) total += n;
  std::vector<uint8_t> want(total), src(total), got(total);
  std::mt19937_64 r(0x0b10ad);
  for (auto& b : want) b = uint8_t(r() >> 56);
  void* d = nullptr;
  CU(cudaMalloc(&d, total));
  cudaStream_t st;
  CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  bool ok = true;
  for (const size_t chunk : {size_t(16) << 20, (size_t(3) << 20) + 5, size_t(0)}) {
    src = want;
    CU(cudaMemset(d, 0, total));
    CU(cudaDeviceSynchronize());
    bool staged = false;
    {
      cuda::HostUploader up(st, chunk);
      staged = up.staged();
      size_t off = 0;
      for (size_t n : sizes) {
        up.copy(static_cast<uint8_t*>(d) + off, src.data() + off, n);
        std::memset(src.data() + off, 0xa5, n);
        off += n;
      }
      CU(cudaStreamSynchronize(st));
    }
    CU(cudaMemcpy(got.data(), d, total, cudaMemcpyDeviceToHost));
    // The bytes, and the mode the chunk size asks for (pinned memory is available on the test GPUs).
    const bool pass = got == want && staged == (chunk != 0);
    std::printf("%s uploader: chunk %zu bytes, %s, %zu bytes in %zu copies\n", pass ? "PASS" : "FAIL", chunk,
                staged ? "pinned chunks" : "direct", total, std::size(sizes));
    ok = ok && pass;
  }
  CU(cudaStreamDestroy(st));
  CU(cudaFree(d));
  return ok;
}

void poison(Tensor& t) { std::memset(t.data(), 0xff, t.nbytes()); }  // NaN in f32/f16/bf16

bool run_case(Backend& be, const Case& c, bool graph) {
  const MoeSpec& s = c.spec;
  std::mt19937_64 r(c.seed * 7919 + 17);
  RawExperts raw = make_raw(r, s);
  Tensor x, logits, rw;
  MoeInputs in = make_inputs(c, r, x, logits, rw);
  const Tensor ref = reference_forward(s, raw, in);
  auto packed = be.prepack(s, raw);  // raw shares buffers with this copy; the reference keeps its own
  if (c.T >= 65536)
    std::printf("T=%lld: workspace %.1f MB (cuda_reserve_workspace)\n", (long long)c.T,
                double(cuda_reserve_workspace(be, *packed, c.T)) / 1e6);
  std::string why;
  bool ok = check_layout(s, raw, *packed, why);
  Tensor out(s.act_dtype, x.shape()), out2(s.act_dtype, x.shape());
  Result res;
  if (ok) {
    poison(out);
    be.run(*packed, in, out);
    res = compare(c, out, ref);
    ok = res.ok;
    why = res.why;
  }
  if (ok) {
    poison(out2);
    be.run(*packed, in, out2);
    if (std::memcmp(out.data(), out2.data(), out.nbytes()) != 0) ok = false, why = "second run not bitwise identical";
  }
  if (ok && graph) {
    const size_t at = dtype_size(s.act_dtype);
    void *dx, *dl, *dr = nullptr, *dout;
    CU(cudaMalloc(&dx, x.nbytes()));
    CU(cudaMalloc(&dl, logits.nbytes()));
    CU(cudaMalloc(&dout, out.nbytes()));
    CU(cudaMemcpy(dx, x.data(), x.nbytes(), cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dl, logits.data(), logits.nbytes(), cudaMemcpyHostToDevice));
    if (c.router_weights) {
      CU(cudaMalloc(&dr, rw.nbytes()));
      CU(cudaMemcpy(dr, rw.data(), rw.nbytes(), cudaMemcpyHostToDevice));
    }
    CU(cudaMemset(dout, 0xff, out.nbytes()));
    // The copies and the poison ran on the legacy stream (a pageable copy may return before its DMA);
    // st below does not wait for that stream.
    CU(cudaDeviceSynchronize());
    cudaStream_t st;
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cuda_reserve_workspace(be, *packed, c.T);
    CudaRunArgs a{dx, dl, dr, dout, c.T, st};
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    cuda_run_device(be, *packed, a);
    CU(cudaStreamEndCapture(st, &g));
    CU(cudaGraphInstantiate(&ge, g, 0));
    CU(cudaGraphLaunch(ge, st));
    CU(cudaGraphLaunch(ge, st));  // replay twice: the workspace's counters must reset themselves
    CU(cudaStreamSynchronize(st));
    Tensor og(s.act_dtype, x.shape());
    CU(cudaMemcpy(og.data(), dout, og.nbytes(), cudaMemcpyDeviceToHost));
    if (std::memcmp(og.data(), out.data(), og.nbytes()) != 0) ok = false, why = "graph replay differs from run()";
    (void)at;
    CU(cudaGraphExecDestroy(ge));
    CU(cudaGraphDestroy(g));
    CU(cudaStreamDestroy(st));
    cudaFree(dx), cudaFree(dl), cudaFree(dout);
    if (dr) cudaFree(dr);
  }
  std::printf("%s seed=%llu T=%lld %s%s%s%s%s | rel %.2e max %.2e%s%s\n", ok ? "PASS" : "FAIL",
              (unsigned long long)c.seed, (long long)c.T, s.to_string().c_str(), c.one_expert ? " one-expert" : "",
              c.router_weights ? " router_weights" : "", special_name(c.special_logits),
              graph ? " +graph" : "", res.rel, res.maxerr, ok ? "" : " :: ", ok ? "" : why.c_str());
  std::fflush(stdout);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && !std::strcmp(argv[1], "--list")) {  // no device needed: pick --only indices here
    const auto cases = all_cases();
    for (size_t i = 0; i < cases.size(); ++i)
      std::printf("%zu T=%lld %s\n", i, (long long)cases[i].T, cases[i].spec.to_string().c_str());
    return 0;
  }
  if (cuda_device_count() == 0) {
    std::printf("qmoe_cuda_tests: no CUDA device visible, skipping (0 tests run)\n");
    return 0;
  }
  bool quick = false, wide = false;
  int only = -1;
  CudaBackendOptions opt;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--wide")) wide = true;
    else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) only = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--gemm") && i + 1 < argc) {
      const std::string g = argv[++i];
      opt.gemm = g == "sm80" ? CudaGemm::sm80 : g == "sm90" ? CudaGemm::sm90 : CudaGemm::automatic;
    }
  }
  cudaDeviceProp p{};
  CU(cudaGetDeviceProperties(&p, 0));
  std::printf("device: %s (sm_%d%d, %d SMs)\n", p.name, p.major, p.minor, p.multiProcessorCount);
  auto be = make_cuda_backend(opt);
  const auto cases = all_cases();
  int fails = 0, runs = 0;
  if (only < 0 && !wide) {
    ++runs;
    if (!check_uploader()) ++fails;
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    if (quick && i >= 12) break;
    if (only >= 0 && int(i) != only) continue;
    if (wide) {  // the tokens per touched expert as the backend counts them (config_for)
      const int64_t slots = cases[i].T * cases[i].spec.k, touched = std::min(cases[i].spec.num_experts, slots);
      if (cases[i].T > 520 || (slots + touched - 1) / touched <= 48) continue;
    }
    ++runs;
    try {
      if (!run_case(*be, cases[i], i % 3 == 0)) ++fails;
    } catch (const std::exception& e) {
      std::printf("FAIL case %zu seed=%llu %s: exception: %s\n", i, (unsigned long long)cases[i].seed,
                  cases[i].spec.to_string().c_str(), e.what());
      ++fails;
    }
  }
  std::printf("%d of %d configurations passed\n", runs - fails, runs);
  return fails ? 1 : 0;
}
