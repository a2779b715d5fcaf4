// Expert-parallel GPU tests (qmoe_ep_tests): run under the launcher, one process per GPU:
//   NCCL_NVLS_ENABLE=0 build/src/cuda/qmoe_ep_launch -n 2 -- build/src/cuda/qmoe_ep_tests [--only N]
// Started without the launcher it prints a note and exits 0 (CI compiles it, never runs it).
//
// Every rank builds the same seeded layers and inputs (make_synthetic_layer), so every rank can check
// its own replicated output. Per configuration (>= 20 random ones plus hand-picked edges; E divisible
// and not divisible by G, k larger than a rank's expert count, tokens fewer than ranks):
//  * weights: this rank's packed bytes == the single-GPU packed bytes * (its experts / E) exactly
//    (every packed buffer is expert-major), i.e. 1/G of the single-GPU figure when G divides E;
//  * both schemes (allreduce, alltoall), output poisoned with NaN bytes first:
//      - against the single-GPU CudaBackend on the same GPU, same weights and inputs:
//          |ep - single| <= 2 u_T |single| + u_c rms(single) elementwise, rel. L2 <= u_T + u_c / 4.
//        Reason: both round the same fp32 math to T once; the sums are reassociated (each rank sums
//        its own routes, then ranks are summed; the FC kernels may split K differently because the
//        launch configuration depends on the local expert count), which moves the fp32 value by
//        ~sqrt(K) 2^-24 relative. That can flip the final rounding by one unit in the last place of T
//        (<= 2 u_T |s|), and, rarely, the rounding of one fc1 activation stored in the compute type
//        (one ulp = 2 u_c relative of one of I >= 64 terms: <= ~u_c/3 rms per flip). u_c is the unit
//        roundoff of the compute type (fp16 2^-11, bf16 2^-8, fp32 activations 2^-7: they pass
//        through bf16), u_T that of the output type;
//      - against the scalar reference (reference_forward) with qmoe_cuda_tests' tolerance (including its
//        wider one for bf16 with bf16 block-wise scales, whose weights s * (q - z) are rounded to bf16);
//      - a second run is bitwise identical;
//  * E < G is refused with a message; a layer loaded with from_raw_safetensors (memory-mapped, each
//    rank packs only its experts) runs bitwise like the in-memory one; tune() fills the table; an allreduce run
//    captured in a CUDA graph replays bitwise equal to the direct run (last, since a failed capture
//    could leave a collective unmatched).
// A failure prints the seed, spec, scheme, first bad index and both values.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "qmoe/checkpoint.h"
#include "qmoe/cuda_backend.h"
#include "qmoe/cuda_ep.h"
#include "qmoe/error.h"
#include "qmoe/reference.h"
#include "qmoe/synthetic.h"
#include "reference_bound.h"

using namespace qmoe;

namespace {

#define CU(call)                                                                            \
  do {                                                                                      \
    cudaError_t e_ = (call);                                                                \
    if (e_ != cudaSuccess) throw Error(std::string(#call) + ": " + cudaGetErrorString(e_)); \
  } while (0)

int g_rank = 0, g_world = 1;

struct Case {
  MoeSpec spec;
  int64_t T = 1;
  bool one_expert = false;  // every token routed to experts 0..k-1 (all on the first ranks)
  bool router_weights = false;
  uint64_t seed = 0;
};

int64_t irand(std::mt19937_64& r, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(r); }

Case random_case(uint64_t seed) {
  std::mt19937_64 r(seed);
  Case c;
  c.seed = seed;
  MoeSpec& s = c.spec;
  const int bits[] = {4, 4, 8, 2};
  s.bits = bits[irand(r, 0, 3)];
  const int64_t bs[] = {0, 32, 64, 128};
  s.block_size = bs[irand(r, 0, 3)];
  const Activation acts[] = {Activation::relu, Activation::gelu, Activation::silu, Activation::swiglu,
                             Activation::swiglu, Activation::swiglu};
  s.activation = acts[irand(r, 0, 5)];
  if (s.is_swiglu()) {
    s.swiglu_fusion = SwigluFusion(irand(r, 0, 2));
    if (r() & 1) s.swiglu_limit = 7.f, s.activation_alpha = 1.702f, s.activation_beta = 1.f;
  }
  const DType at[] = {DType::bf16, DType::f16, DType::bf16, DType::f32};
  s.act_dtype = at[irand(r, 0, 3)];
  const DType st[] = {DType::bf16, DType::f16, DType::f32};
  s.scale_dtype = st[irand(r, 0, 2)];
  const int64_t Es[] = {2, 3, 4, 5, 6, 7, 8, 9, 16, 31, 64};
  s.num_experts = std::max<int64_t>(Es[irand(r, 0, 10)], g_world);
  s.k = irand(r, 1, std::min<int64_t>(8, s.num_experts));
  if (s.k == 2 && r() % 4 == 0) s.use_sparse_mixer = true;
  s.normalize_routing_weights = r() & 1;
  const int64_t dims[] = {64, 72, 128, 200, 256, 384};
  s.hidden = dims[irand(r, 0, 5)];
  s.inter = dims[irand(r, 0, 5)];
  s.fc1_bias = r() & 1;
  s.fc2_bias = r() & 1;
  s.fc1_zero_points = r() % 3 == 0;
  s.fc2_zero_points = r() % 3 == 0;
  if (s.has_fc3()) s.fc3_bias = r() & 1, s.fc3_zero_points = r() % 3 == 0;
  const int64_t Ts[] = {1, 2, 3, 7, 16, 33, 64, 100, 257, 1024};
  c.T = Ts[irand(r, 0, 9)];
  const int64_t per_tok = s.k * 3 * s.inter * s.hidden;
  while (c.T > 1 && c.T * per_tok > 30'000'000) c.T = (c.T + 1) / 2;
  c.router_weights = !s.use_sparse_mixer && r() % 5 == 0;
  return c;
}

std::vector<Case> all_cases() {
  std::vector<Case> cs;
  auto base = [](int64_t E, int64_t k, int64_t H, int64_t I, int64_t T) {
    Case c;
    MoeSpec& s = c.spec;
    s.num_experts = E, s.k = k, s.hidden = H, s.inter = I, s.bits = 4, s.block_size = 64;
    s.activation = Activation::swiglu, s.swiglu_fusion = SwigluFusion::concatenated;
    s.act_dtype = DType::bf16, s.scale_dtype = DType::bf16, s.normalize_routing_weights = true;
    c.T = T;
    return c;
  };
  cs.push_back(base(8, 2, 256, 512, 64));    // mixtral-like, divisible
  cs.push_back(base(32, 8, 256, 128, 33));   // deepseek-like (many experts, k = 8), odd T
  cs.push_back(base(5, 2, 128, 128, 17));    // E % G != 0
  cs.push_back(base(3, 3, 128, 64, 9));      // k = E > a rank's expert count
  cs.push_back(base(8, 2, 128, 64, 1));      // one token: rank 1 has an empty slice (alltoall)
  {
    Case c = base(8, 2, 128, 64, 40);  // every token on experts 0 and 1: only rank 0 computes
    c.one_expert = true;
    cs.push_back(c);
  }
  {
    Case c = base(6, 2, 128, 96, 20);
    c.spec.fc1_bias = c.spec.fc2_bias = true, c.spec.fc2_zero_points = true, c.router_weights = true;
    cs.push_back(c);
  }
  for (size_t i = 0; i < cs.size(); ++i) cs[i].seed = 4000 + i;
  for (int i = 0; i < 24; ++i) cs.push_back(random_case(0xe9000000ull + uint64_t(i)));
  return cs;
}

struct Cmp {
  bool ok = true;
  double rel = 0;
  std::string why;
};

// |got - want| <= a |want| + b rms(want) elementwise, relative L2 <= rel_tol; NaN fails.
Cmp compare(const MoeSpec& s, const Tensor& got, const Tensor& want, double a, double b, double rel_tol) {
  Cmp c;
  const int64_t n = want.numel();
  double ss = 0, se = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double w = load_as_float(s.act_dtype, want.data(), i);
    ss += w * w;
  }
  const double rms = std::sqrt(ss / std::max<int64_t>(n, 1));
  for (int64_t i = 0; i < n; ++i) {
    const double g = load_as_float(s.act_dtype, got.data(), i), w = load_as_float(s.act_dtype, want.data(), i);
    const double d = std::fabs(g - w), tol = a * std::fabs(w) + b * rms;
    se += d * d;
    if (!(d <= tol) && c.ok) {
      char buf[200];
      std::snprintf(buf, sizeof buf, "first bad index %lld (token %lld, h %lld): got %.7g, want %.7g, tol %.3g",
                    (long long)i, (long long)(i / s.hidden), (long long)(i % s.hidden), g, w, tol);
      c.ok = false, c.why = buf;
    }
  }
  c.rel = ss > 0 ? std::sqrt(se / ss) : std::sqrt(se);
  if (c.ok && !(c.rel <= rel_tol)) c.ok = false, c.why = "relative L2 " + std::to_string(c.rel) + " > " + std::to_string(rel_tol);
  return c;
}

struct DevIn {
  void *x = nullptr, *lg = nullptr, *rw = nullptr, *out = nullptr;
  ~DevIn() {
    for (void* p : {x, lg, rw, out})
      if (p) cudaFree(p);
  }
};

void upload(void*& d, const Tensor& t) {
  CU(cudaMalloc(&d, t.nbytes()));
  CU(cudaMemcpy(d, t.data(), t.nbytes(), cudaMemcpyHostToDevice));
  CU(cudaDeviceSynchronize());  // pageable copies may return before their DMA; the runs' stream is non-blocking
}

bool run_case(size_t idx, const Case& c, Backend& single_be, void* comm, cudaStream_t st) {
  const MoeSpec& s = c.spec;
  SyntheticOptions so;
  so.seed = c.seed;
  so.tokens = c.T;
  so.router_weights = c.router_weights;
  SyntheticLayer L = make_synthetic_layer(s, so);
  if (c.one_expert)
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t j = 0; j < s.k; ++j) store_from_float(s.act_dtype, L.router_probs.data(), t * s.num_experts + j, 20.f - j);
  const MoeInputs in = L.inputs();
  const Tensor ref = reference_forward(s, L.raw, in);
  auto single_packed = single_be.prepack(s, L.raw);
  Tensor single(s.act_dtype, L.input.shape());
  single_be.run(*single_packed, in, single);

  bool ok = true;
  std::string why;
  ExpertParallelLayer ep(s, L.raw, comm, st);
  const ExpertRange er = ep.experts();
  const size_t want_bytes = single_packed->resident_bytes() / size_t(s.num_experts) * size_t(er.count);
  if (ep.weight_bytes() != want_bytes || single_packed->resident_bytes() % size_t(s.num_experts) != 0) {
    ok = false;
    why = "weight bytes " + std::to_string(ep.weight_bytes()) + ", want " + std::to_string(want_bytes) +
          " (single GPU " + std::to_string(single_packed->resident_bytes()) + ")";
  }
  DevIn d;
  upload(d.x, L.input);
  upload(d.lg, L.router_probs);
  if (L.router_weights) upload(d.rw, *L.router_weights);
  CU(cudaMalloc(&d.out, single.nbytes()));
  const double uT = test::unit_roundoff(s.act_dtype), uc = test::compute_roundoff(s.act_dtype);
  const test::ReferenceBound bound = test::reference_bound(s);
  std::string detail;
  for (EpScheme scheme : {EpScheme::allreduce, EpScheme::alltoall}) {
    EpRunArgs a{d.x, d.lg, d.rw, d.out, c.T};
    Tensor o1(s.act_dtype, L.input.shape()), o2(s.act_dtype, L.input.shape());
    for (Tensor* o : {&o1, &o2}) {
      CU(cudaMemsetAsync(d.out, 0xff, o->nbytes(), st));
      ep.run_device(a, scheme);
      CU(cudaMemcpyAsync(o->data(), d.out, o->nbytes(), cudaMemcpyDeviceToHost, st));
      CU(cudaStreamSynchronize(st));
    }
    const Cmp vs_single = compare(s, o1, single, 2 * uT, uc, uT + uc / 4);
    const Cmp vs_ref = compare(s, o1, ref, bound.per_ref, bound.per_rms, bound.rel_l2);
    char buf[96];
    std::snprintf(buf, sizeof buf, " %s: vs1gpu %.1e vsref %.1e", std::string(ep_scheme_name(scheme)).c_str(),
                  vs_single.rel, vs_ref.rel);
    detail += buf;
    if (ok && !vs_single.ok) ok = false, why = std::string(ep_scheme_name(scheme)) + " vs single GPU: " + vs_single.why;
    if (ok && !vs_ref.ok) ok = false, why = std::string(ep_scheme_name(scheme)) + " vs reference: " + vs_ref.why;
    if (ok && std::memcmp(o1.data(), o2.data(), o1.nbytes()) != 0)
      ok = false, why = std::string(ep_scheme_name(scheme)) + ": second run not bitwise identical";
  }
  if (!ok || g_rank == 0)
    std::printf("%s [rank %d] case %zu seed=%llu T=%lld %s experts [%lld,%lld) %s%s%s%s\n", ok ? "PASS" : "FAIL", g_rank,
                idx, (unsigned long long)c.seed, (long long)c.T, s.to_string().c_str(), (long long)er.first,
                (long long)er.end(), c.one_expert ? "one-expert " : "", c.router_weights ? "router_weights " : "",
                detail.c_str(), ok ? "" : (" :: " + why).c_str());
  std::fflush(stdout);
  return ok;
}

bool check_refusal(void* comm, cudaStream_t st) {
  MoeSpec s;
  s.num_experts = g_world - 1, s.k = 1, s.hidden = 64, s.inter = 64, s.act_dtype = DType::bf16;
  s.scale_dtype = DType::bf16;
  if (s.num_experts < 1) return true;
  SyntheticLayer L = make_synthetic_layer(s, {});
  try {
    ExpertParallelLayer ep(s, L.raw, comm, st);
  } catch (const Error& e) {
    const bool ok = std::string(e.what()).find("cannot be split") != std::string::npos;
    std::printf("%s [rank %d] E=%lld < G=%d refused: %s\n", ok ? "PASS" : "FAIL", g_rank, (long long)s.num_experts,
                g_world, e.what());
    return ok;
  }
  std::printf("FAIL [rank %d] E=%lld < G=%d was accepted\n", g_rank, (long long)s.num_experts, g_world);
  return false;
}

bool check_tune_and_graph(void* comm, cudaStream_t st) {
  MoeSpec s;
  s.num_experts = 8, s.k = 2, s.hidden = 256, s.inter = 256, s.bits = 4, s.block_size = 64;
  s.activation = Activation::swiglu, s.swiglu_fusion = SwigluFusion::interleaved;
  s.act_dtype = DType::bf16, s.scale_dtype = DType::bf16, s.normalize_routing_weights = true;
  SyntheticOptions so;
  so.seed = 77;
  so.tokens = 96;
  SyntheticLayer L = make_synthetic_layer(s, so);
  ExpertParallelLayer ep(s, L.raw, comm, st);
  const auto tr = ep.tune({8, 512}, 5);
  bool ok = ep.scheme_table().to_string().find("8:") == 0 && tr.size() == 2;
  std::printf("%s [rank %d] tune: %s (8 rows: allreduce %.1f us, alltoall %.1f us; 512 rows: %.1f / %.1f us)\n",
              ok ? "PASS" : "FAIL", g_rank, ep.scheme_table().to_string().c_str(), tr.size() > 0 ? tr[0].allreduce_us : 0,
              tr.size() > 0 ? tr[0].alltoall_us : 0, tr.size() > 1 ? tr[1].allreduce_us : 0,
              tr.size() > 1 ? tr[1].alltoall_us : 0);
  DevIn d;
  upload(d.x, L.input);
  upload(d.lg, L.router_probs);
  CU(cudaMalloc(&d.out, L.input.nbytes()));
  EpRunArgs a{d.x, d.lg, nullptr, d.out, so.tokens};
  ep.reserve(so.tokens);
  Tensor direct(s.act_dtype, L.input.shape()), graphed(s.act_dtype, L.input.shape());
  ep.run_device(a, EpScheme::allreduce);
  CU(cudaMemcpyAsync(direct.data(), d.out, direct.nbytes(), cudaMemcpyDeviceToHost, st));
  CU(cudaStreamSynchronize(st));
  CU(cudaMemsetAsync(d.out, 0xff, direct.nbytes(), st));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  ep.run_device(a, EpScheme::allreduce);
  CU(cudaStreamEndCapture(st, &g));
  CU(cudaGraphInstantiate(&ge, g, 0));
  CU(cudaGraphLaunch(ge, st));
  CU(cudaGraphLaunch(ge, st));
  CU(cudaMemcpyAsync(graphed.data(), d.out, graphed.nbytes(), cudaMemcpyDeviceToHost, st));
  CU(cudaStreamSynchronize(st));
  const bool gok = std::memcmp(direct.data(), graphed.data(), direct.nbytes()) == 0;
  std::printf("%s [rank %d] allreduce run captured in a CUDA graph, replayed twice: %s\n", gok ? "PASS" : "FAIL", g_rank,
              gok ? "bitwise equal to the direct run" : "differs from the direct run");
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  return ok && gok;
}

// from_raw_safetensors (memory-mapped file, each rank packs only its experts) gives bitwise the
// output of the layer built from the same raw tensors in memory.
bool check_from_file(void* comm, cudaStream_t st) {
  MoeSpec s;
  s.num_experts = 6, s.k = 2, s.hidden = 128, s.inter = 192, s.bits = 4, s.block_size = 32;
  s.activation = Activation::swiglu, s.swiglu_fusion = SwigluFusion::interleaved, s.fc2_bias = true;
  s.act_dtype = DType::bf16, s.scale_dtype = DType::bf16, s.normalize_routing_weights = true;
  SyntheticOptions so;
  so.seed = 99;
  so.tokens = 50;
  SyntheticLayer L = make_synthetic_layer(s, so);
  const std::string path = "/tmp/qmoe_ep_test_" + std::to_string(getpid()) + ".safetensors";
  RawLayer rl;
  rl.spec = s;
  rl.raw = L.raw;
  write_raw_safetensors(path, rl);
  auto from_file = ExpertParallelLayer::from_raw_safetensors(path, comm, st);
  ExpertParallelLayer in_memory(s, L.raw, comm, st);
  DevIn d;
  upload(d.x, L.input);
  upload(d.lg, L.router_probs);
  CU(cudaMalloc(&d.out, L.input.nbytes()));
  EpRunArgs a{d.x, d.lg, nullptr, d.out, so.tokens};
  Tensor o1(s.act_dtype, L.input.shape()), o2(s.act_dtype, L.input.shape());
  from_file->run_device(a, EpScheme::allreduce);
  CU(cudaMemcpyAsync(o1.data(), d.out, o1.nbytes(), cudaMemcpyDeviceToHost, st));
  in_memory.run_device(a, EpScheme::allreduce);
  CU(cudaMemcpyAsync(o2.data(), d.out, o2.nbytes(), cudaMemcpyDeviceToHost, st));
  CU(cudaStreamSynchronize(st));
  std::remove(path.c_str());
  const bool ok = std::memcmp(o1.data(), o2.data(), o1.nbytes()) == 0 && from_file->weight_bytes() == in_memory.weight_bytes();
  std::printf("%s [rank %d] from_raw_safetensors: experts [%lld, %lld), %s\n", ok ? "PASS" : "FAIL", g_rank,
              (long long)from_file->experts().first, (long long)from_file->experts().end(),
              ok ? "bitwise equal to the in-memory layer" : "differs from the in-memory layer");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  std::optional<EpLaunchEnv> env;
  try {
    env = ep_launch_env();
  } catch (const std::exception& e) {
    std::printf("qmoe_ep_tests: %s\n", e.what());
    return 2;
  }
  if (!env) {
    std::printf("qmoe_ep_tests: not started by qmoe_ep_launch (run: qmoe_ep_launch -n 2 -- qmoe_ep_tests); 0 tests run\n");
    return 0;
  }
  g_rank = env->rank, g_world = env->world;
  const int ndev = cuda_device_count();
  if (ndev < g_world) {
    std::printf("FAIL [rank %d] %d ranks need %d GPUs, %d visible\n", g_rank, g_world, g_world, ndev);
    return 1;
  }
  int only = -1;
  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--only") && i + 1 < argc) only = std::atoi(argv[++i]);
  int fails = 0, runs = 0;
  try {
    void* comm = ep_comm_init_from_file(env->id_file, g_rank, g_world, g_rank);
    cudaStream_t st;
    CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaDeviceProp p{};
    CU(cudaGetDeviceProperties(&p, g_rank));
    std::printf("[rank %d of %d] device %d: %s (sm_%d%d), NCCL_NVLS_ENABLE=%s\n", g_rank, g_world, g_rank, p.name,
                p.major, p.minor, std::getenv("NCCL_NVLS_ENABLE") ? std::getenv("NCCL_NVLS_ENABLE") : "(unset)");
    CudaBackendOptions bo;
    bo.device = g_rank;
    auto single_be = make_cuda_backend(bo);
    const auto cases = all_cases();
    for (size_t i = 0; i < cases.size(); ++i) {
      if (only >= 0 && int(i) != only) continue;
      ++runs;
      try {
        if (!run_case(i, cases[i], *single_be, comm, st)) ++fails;
      } catch (const std::exception& e) {
        // Raised before any collective of the case on every rank alike (validation), or a CUDA error.
        std::printf("FAIL [rank %d] case %zu seed=%llu %s: exception: %s\n", g_rank, i,
                    (unsigned long long)cases[i].seed, cases[i].spec.to_string().c_str(), e.what());
        ++fails;
      }
    }
    if (only < 0) {
      ++runs;
      if (!check_refusal(comm, st)) ++fails;
      ++runs;
      try {
        if (!check_from_file(comm, st)) ++fails;
      } catch (const std::exception& e) {
        std::printf("FAIL [rank %d] from_raw_safetensors: exception: %s\n", g_rank, e.what());
        ++fails;
      }
      ++runs;
      if (!check_tune_and_graph(comm, st)) ++fails;
    }
    CU(cudaStreamDestroy(st));
    ep_comm_destroy(comm);
  } catch (const std::exception& e) {
    std::printf("FAIL [rank %d] exception: %s\n", g_rank, e.what());
    ++fails;
  }
  std::printf("[rank %d] %d of %d checks passed\n", g_rank, runs - fails, runs);
  return fails ? 1 : 0;
}
