// Expert-parallel benchmark (qmoe_ep_bench): 1 GPU vs G GPUs, both exchange schemes.
//
//   NCCL_NVLS_ENABLE=0 qmoe_ep_launch -n 2 -- qmoe_ep_bench [--shapes mixtral,deepseek-v3-like]
//       [--tokens 64,2048] [--quant int4b128|int4b32|int8] [--iters 30]
//
// Shapes from docs/performance.md (SwiGLU, bf16 activations and scales, normalized routing), random
// weights and uniform random routing (the same on every rank). Per shape and T, rank 0 prints:
//   1gpu_us      the single-GPU CudaBackend (cuda_run_device, no graph) on rank 0's GPU, all E experts;
//   allreduce_us / alltoall_us   ExpertParallelLayer::run_device with that scheme (no graph; the time
//                on rank 0 from launch to its output, which includes waiting for the other ranks);
//   auto         the scheme tune() picks at this T (the slower rank's mean decides);
//   speedup      1gpu_us / the faster EP scheme;  TFLOP/s of the faster scheme (6 T k H I flops).
// Medians of --iters runs after 3 warm-up runs; the logits rotate through 4 sets. Weight MB per GPU
// (EP) against the single-GPU figure are printed per shape.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "qmoe/cuda_backend.h"
#include "qmoe/cuda_ep.h"
#include "qmoe/error.h"

using namespace qmoe;

#define CU(call)                                                                                   \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));  \
      std::exit(2);                                                                                \
    }                                                                                              \
  } while (0)

namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t p = 0;
  while (p <= s.size()) {
    const size_t q = s.find(',', p);
    out.push_back(s.substr(p, q == std::string::npos ? std::string::npos : q - p));
    if (q == std::string::npos) break;
    p = q + 1;
  }
  return out;
}

void fill_random(uint8_t* p, size_t n, uint64_t seed) {
  const int nt = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> th;
  for (int t = 0; t < nt; ++t)
    th.emplace_back([=] {
      const size_t lo = n * size_t(t) / size_t(nt), hi = n * size_t(t + 1) / size_t(nt);
      uint64_t s = seed * 0x9E3779B97F4A7C15ull + uint64_t(t) * 0xBF58476D1CE4E5B9ull + 1;
      size_t i = lo;
      for (; i + 8 <= hi; i += 8) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        std::memcpy(p + i, &s, 8);
      }
      for (; i < hi; ++i) s ^= s << 13, s ^= s >> 7, s ^= s << 17, p[i] = uint8_t(s);
    });
  for (auto& x : th) x.join();
}

Tensor rand_float(DType t, const Shape& shape, float lo, float hi, uint64_t seed, bool random_sign = false) {
  Tensor x(t, shape);
  std::mt19937_64 r(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  for (int64_t i = 0; i < x.numel(); ++i) {
    float v = u(r);
    if (random_sign && (r() & 1)) v = -v;
    store_from_float(t, x.data(), i, v);
  }
  return x;
}

RawExperts make_raw(const MoeSpec& s) {
  RawExperts raw;
  auto make = [&](Fc fc, uint64_t seed) {
    RawMatrix m;
    m.weights = Tensor(DType::u8, raw_weight_shape(s, fc));
    fill_random(m.weights.data_as<uint8_t>(), m.weights.nbytes(), seed);
    const float qstd = float(1 << s.bits) / 3.4641f, mag = 1.7f / (qstd * std::sqrt(float(fc_cols(s, fc))));
    m.scales = rand_float(s.scale_dtype, raw_scale_shape(s, fc), 0.5f * mag, 1.5f * mag, seed + 1, true);
    return m;
  };
  raw.fc1 = make(Fc::fc1, 11);
  raw.fc2 = make(Fc::fc2, 22);
  return raw;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct ShapeDef {
  const char* name;
  int64_t H, I, E, k;
};

}  // namespace

int main(int argc, char** argv) {
  std::optional<EpLaunchEnv> env = ep_launch_env();
  if (!env) {
    std::printf("qmoe_ep_bench: start it with qmoe_ep_launch -n G -- qmoe_ep_bench ...\n");
    return 0;
  }
  const int rank = env->rank, world = env->world;
  std::vector<std::string> shapes_sel = {"mixtral", "deepseek-v3-like"};
  std::vector<int64_t> tokens = {64, 2048};
  std::string quant = "int4b128";
  int iters = 30;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--shapes" && i + 1 < argc) shapes_sel = split(argv[++i]);
    else if (a == "--tokens" && i + 1 < argc) {
      tokens.clear();
      for (auto& t : split(argv[++i])) tokens.push_back(std::stoll(t));
    } else if (a == "--quant" && i + 1 < argc) quant = argv[++i];
    else if (a == "--iters" && i + 1 < argc) iters = std::max(1, std::stoi(argv[++i]));
  }
  const ShapeDef shapes[] = {{"mixtral", 4096, 14336, 8, 2}, {"deepseek-v3-like", 7168, 2048, 256, 8}};
  int bits = 4;
  int64_t bs = 128;
  if (quant == "int4b32") bs = 32;
  else if (quant == "int8") bits = 8, bs = 0;
  else if (quant != "int4b128") {
    std::fprintf(stderr, "unknown --quant %s (int4b128, int4b32, int8)\n", quant.c_str());
    return 2;
  }

  void* comm = ep_comm_init_from_file(env->id_file, rank, world, rank);
  cudaStream_t st;
  CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  CU(cudaEventCreate(&e0));
  CU(cudaEventCreate(&e1));
  cudaDeviceProp prop{};
  CU(cudaGetDeviceProperties(&prop, rank));
  if (rank == 0) {
    std::printf("qmoe_ep_bench: %d ranks, device 0: %s (%d SMs); %s, bf16, no CUDA graph, median of %d\n", world,
                prop.name, prop.multiProcessorCount, quant.c_str(), iters);
    std::printf("%-17s %5s %10s %13s %12s %10s %8s %8s\n", "shape", "T", "1gpu_us", "allreduce_us", "alltoall_us",
                "auto", "speedup", "TFLOP/s");
  }
  const int64_t maxT = *std::max_element(tokens.begin(), tokens.end());
  for (const ShapeDef& sh : shapes) {
    if (std::find(shapes_sel.begin(), shapes_sel.end(), sh.name) == shapes_sel.end()) continue;
    MoeSpec s;
    s.num_experts = sh.E, s.k = sh.k, s.hidden = sh.H, s.inter = sh.I, s.bits = bits, s.block_size = bs;
    s.activation = Activation::swiglu, s.swiglu_fusion = SwigluFusion::concatenated;
    s.normalize_routing_weights = true, s.act_dtype = DType::bf16, s.scale_dtype = DType::bf16;
    s.validate();
    RawExperts raw = make_raw(s);
    constexpr int kSets = 4;
    const Tensor x = rand_float(DType::bf16, {maxT, s.hidden}, -1.f, 1.f, 5);
    void *dx, *dout, *dl[kSets];
    CU(cudaSetDevice(rank));
    CU(cudaMalloc(&dx, x.nbytes()));
    CU(cudaMalloc(&dout, x.nbytes()));
    CU(cudaMemcpy(dx, x.data(), x.nbytes(), cudaMemcpyHostToDevice));
    for (int i = 0; i < kSets; ++i) {
      const Tensor lg = rand_float(DType::bf16, {maxT, s.num_experts}, -3.f, 3.f, 100 + uint64_t(i));
      CU(cudaMalloc(&dl[i], lg.nbytes()));
      CU(cudaMemcpy(dl[i], lg.data(), lg.nbytes(), cudaMemcpyHostToDevice));
    }
    CU(cudaDeviceSynchronize());  // pageable copies may return before their DMA; st is non-blocking
    auto time_runs = [&](auto&& run) {
      for (int i = 0; i < 3; ++i) run(i);
      std::vector<double> ts;
      for (int i = 0; i < iters; ++i) {
        CU(cudaEventRecord(e0, st));
        run(i);
        CU(cudaEventRecord(e1, st));
        CU(cudaEventSynchronize(e1));
        float ms = 0;
        CU(cudaEventElapsedTime(&ms, e0, e1));
        ts.push_back(ms * 1e3);
      }
      return median(ts);
    };
    // 1 GPU: the whole layer on rank 0's GPU (the other ranks wait in their first collective below).
    std::vector<double> one(tokens.size(), 0);
    size_t one_bytes = 0;
    if (rank == 0) {
      CudaBackendOptions bo;
      bo.device = 0;
      auto be = make_cuda_backend(bo);
      auto packed = be->prepack(s, raw);
      one_bytes = packed->resident_bytes();
      for (size_t ti = 0; ti < tokens.size(); ++ti) {
        const int64_t T = tokens[ti];
        cuda_reserve_workspace(*be, *packed, T);
        one[ti] = time_runs([&](int i) {
          CudaRunArgs a{dx, dl[i % kSets], nullptr, dout, T, st};
          cuda_run_device(*be, *packed, a);
        });
      }
    }
    ExpertParallelLayer ep(s, raw, comm, st);
    raw = RawExperts{};  // the EP layer packed its slice; the host bytes are not needed any more
    ep.reserve(maxT);
    const auto tuned = ep.tune(tokens, 10);
    for (size_t ti = 0; ti < tokens.size(); ++ti) {
      const int64_t T = tokens[ti];
      double t_s[2];
      for (int sc = 0; sc < 2; ++sc) {
        const EpScheme scheme = sc == 0 ? EpScheme::allreduce : EpScheme::alltoall;
        t_s[sc] = time_runs([&](int i) {
          EpRunArgs a{dx, dl[i % kSets], nullptr, dout, T};
          ep.run_device(a, scheme);
        });
      }
      const double best = std::min(t_s[0], t_s[1]);
      const double flops = 6.0 * double(T) * double(s.k) * double(s.hidden) * double(s.inter);
      if (rank == 0)
        std::printf("%-17s %5lld %10.1f %13.1f %12.1f %10s %7.2fx %8.1f\n", sh.name, (long long)T, one[ti], t_s[0],
                    t_s[1], std::string(ep_scheme_name(ep.scheme_for(T))).c_str(), one[ti] / best,
                    flops / (best * 1e-6) / 1e12);
    }
    if (rank == 0) {
      std::printf("%-17s weights: %.1f MB per GPU on %d GPUs (rank 0, experts [%lld, %lld)), %.1f MB on 1 GPU; tune:",
                  sh.name, double(ep.weight_bytes()) / 1e6, world, (long long)ep.experts().first,
                  (long long)ep.experts().end(), double(one_bytes) / 1e6);
      for (const auto& t : tuned)
        std::printf(" T=%lld allreduce %.1f us alltoall %.1f us;", (long long)t.rows, t.allreduce_us, t.alltoall_us);
      std::printf("\n");
      std::fflush(stdout);
    }
    CU(cudaStreamSynchronize(st));
    cudaFree(dx);
    cudaFree(dout);
    for (void* p : dl) cudaFree(p);
  }
  CU(cudaStreamDestroy(st));
  ep_comm_destroy(comm);
  return 0;
}
