// GPU benchmark of the CUDA backend on the model shapes of docs/performance.md.
//
// Usage: qmoe_cuda_bench [--quick] [--tokens 1,8,64,512] [--shapes mixtral,qwen3-30b-a3b,gpt-oss-20b,
//                        deepseek-v3-like] [--quants int4b128,int4b32,int8] [--gemm auto|sm80|sm90] [--iters N]
// Prints: the device, its measured read bandwidth (a streaming-read kernel over 2 GiB, same run),
// then per case: µs of the whole layer (CUDA graph of the device-pointer core; no graph; and the
// host-tensor run() including its input/output copies), bytes floor, % of floor, TFLOP/s.
// Bytes floor = touched experts (counted from the routing actually used) x 3 H I x bytes/weight
// (int4: 0.5 + 2/bs, int8 row-wise: 1 + 2/K) + 4 T H (bf16 in/out); floor time = bytes / measured BW.
// Weight sets: one layer per case; routing sets rotate (16 logits sets, at T=1 chosen so consecutive
// runs touch disjoint experts where E allows), so L2 (50 MB) cannot serve weights between runs
// whenever the layer exceeds 4x L2 (all shapes here except qwen3 int4: see the printed layer MB).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cuda/timeline.h"
#include "qmoe/cuda_backend.h"
#include "qmoe/error.h"
#include "qmoe/routing.h"

using namespace qmoe;

#define CU(call)                                                                                       \
  do {                                                                                                 \
    cudaError_t e_ = (call);                                                                           \
    if (e_ != cudaSuccess) {                                                                           \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));      \
      std::exit(2);                                                                                    \
    }                                                                                                  \
  } while (0)

namespace {

__global__ void read_kernel(const uint4* p, size_t n, unsigned* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcs(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;  // keeps the loads; practically never taken
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double measure_read_bw() {
  const size_t bytes = size_t(2) << 30;
  void* p;
  unsigned* sink;
  CU(cudaMalloc(&p, bytes));
  CU(cudaMalloc(&sink, 4));
  CU(cudaMemset(p, 0x5a, bytes));
  int sms = 0;
  CU(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaEvent_t a, b;
  CU(cudaEventCreate(&a));
  CU(cudaEventCreate(&b));
  std::vector<double> ts;
  for (int i = 0; i < 15; ++i) {
    CU(cudaEventRecord(a));
    read_kernel<<<sms * 8, 512>>>(static_cast<const uint4*>(p), bytes / 16, sink);
    CU(cudaEventRecord(b));
    CU(cudaEventSynchronize(b));
    float ms;
    CU(cudaEventElapsedTime(&ms, a, b));
    if (i >= 3) ts.push_back(ms);
  }
  CU(cudaFree(p));
  CU(cudaFree(sink));
  return double(bytes) / (median(ts) * 1e-3);
}

void fill_random(uint8_t* p, size_t n, uint64_t seed) {
  const int nt = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> th;
  for (int t = 0; t < nt; ++t)
    th.emplace_back([=] {
      const size_t lo = n * t / nt, hi = n * (t + 1) / nt;
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

Tensor rand_scales(const Shape& shape, float mag, uint64_t seed) {
  Tensor t(DType::bf16, shape);
  std::mt19937 r{uint32_t(seed)};
  std::uniform_real_distribution<float> u(0.5f * mag, 1.5f * mag);
  auto* p = t.data_as<uint16_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    const bool neg = (r() & 1u) != 0;
    const float v = u(r);
    p[i] = qmoe::float_to_bf16(neg ? -v : v);
  }
  return t;
}

struct Shape_ {
  const char* name;
  int64_t H, I, E, k;
  SwigluFusion fusion;
  float limit, alpha, beta;
};
struct Quant {
  const char* name;
  int bits;
  int64_t bs;
};
const Shape_ kShapes[] = {
    {"mixtral", 4096, 14336, 8, 2, SwigluFusion::concatenated, INFINITY, 1.f, 0.f},
    {"qwen3-30b-a3b", 2048, 768, 128, 8, SwigluFusion::concatenated, INFINITY, 1.f, 0.f},
    {"gpt-oss-20b", 2880, 2880, 32, 4, SwigluFusion::interleaved, 7.f, 1.702f, 1.f},
    {"deepseek-v3-like", 7168, 2048, 256, 8, SwigluFusion::concatenated, INFINITY, 1.f, 0.f},
};
const Quant kQuants[] = {{"int4b128", 4, 128}, {"int4b32", 4, 32}, {"int8", 8, 0}};

// The names of a table's rows (kShapes, kQuants).
template <class Row, size_t N> std::vector<std::string> names_of(const Row (&rows)[N]) {
  std::vector<std::string> v;
  for (const Row& r : rows) v.push_back(r.name);
  return v;
}

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

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> all_shapes = names_of(kShapes), all_quants = names_of(kQuants);
  std::vector<int64_t> tokens = {1, 8, 64, 512};
  std::vector<std::string> shapes_sel = all_shapes, quants_sel = all_quants;
  int iters = 60;
  CudaBackendOptions opt;
  // Bad arguments end with a message and status 2, before any device work.
  auto bad = [](const std::string& m) {
    std::fprintf(stderr, "qmoe_cuda_bench: %s\n", m.c_str());
    return 2;
  };
  // An entry of `sel` missing from `all` as "'x' (a, b, ...)", or "" where there is none.
  auto unknown = [](const std::vector<std::string>& sel, const std::vector<std::string>& all) {
    for (const std::string& v : sel)
      if (std::find(all.begin(), all.end(), v) == all.end()) {
        std::string m = "'" + v + "' (";
        for (size_t i = 0; i < all.size(); ++i) m += (i ? ", " : "") + all[i];
        return m + ")";
      }
    return std::string();
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--quick") {
      iters = 20, tokens = {1, 64};
    } else if (a == "--tokens" && has_value) {
      tokens.clear();
      for (auto& s : split(argv[++i])) {
        char* end = nullptr;
        const long long t = std::strtoll(s.c_str(), &end, 10);
        if (s.empty() || *end || t < 1) return bad("--tokens: expected positive integers, got '" + s + "'");
        tokens.push_back(t);
      }
    } else if (a == "--shapes" && has_value) {
      shapes_sel = split(argv[++i]);
      if (const std::string v = unknown(shapes_sel, all_shapes); !v.empty()) return bad("--shapes: unknown shape " + v);
    } else if (a == "--quants" && has_value) {
      quants_sel = split(argv[++i]);
      if (const std::string v = unknown(quants_sel, all_quants); !v.empty())
        return bad("--quants: unknown quantization " + v);
    } else if (a == "--iters" && has_value) {
      iters = std::atoi(argv[++i]);
      if (iters < 1) return bad("--iters: expected a positive integer, got '" + std::string(argv[i]) + "'");
    } else if (a == "--gemm" && has_value) {
      const std::string g = argv[++i];
      if (g != "auto" && g != "sm80" && g != "sm90") return bad("--gemm: expected auto, sm80 or sm90, got '" + g + "'");
      opt.gemm = g == "sm80" ? CudaGemm::sm80 : g == "sm90" ? CudaGemm::sm90 : CudaGemm::automatic;
    } else {
      const bool takes_value = a == "--tokens" || a == "--shapes" || a == "--quants" || a == "--iters" || a == "--gemm";
      return bad(takes_value ? a + ": needs a value" : "unknown argument '" + a + "' (usage: the file's header)");
    }
  }
  if (cuda_device_count() == 0) {
    std::printf("qmoe_cuda_bench: no CUDA device visible\n");
    return 0;
  }
  cudaDeviceProp prop{};
  CU(cudaGetDeviceProperties(&prop, 0));
  int clk = 0, memclk = 0;
  cudaDeviceGetAttribute(&clk, cudaDevAttrClockRate, 0);
  cudaDeviceGetAttribute(&memclk, cudaDevAttrMemoryClockRate, 0);
  const double bw = measure_read_bw();
  std::printf("device: %s, %d SMs, L2 %d MB, SM clock %d MHz (max), memory clock %d MHz\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, clk / 1000, memclk / 1000);
  std::printf("measured read bandwidth: %.0f GB/s (streaming read of 2 GiB, median of 12)\n", bw / 1e9);

  std::printf("\n%-17s %-9s %5s %6s %9s %9s %9s %9s %8s %8s %8s\n", "shape", "quant", "T", "experts", "graph_us",
              "nograph_us", "run()_us", "floor_us", "%floor", "GB/s", "TFLOP/s");
  auto be = make_cuda_backend(opt);
  cudaStream_t st;
  CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaEvent_t ev0, ev1;
  CU(cudaEventCreate(&ev0));
  CU(cudaEventCreate(&ev1));

  for (const Shape_& sh : kShapes) {
    if (std::find(shapes_sel.begin(), shapes_sel.end(), sh.name) == shapes_sel.end()) continue;
    for (const Quant& q : kQuants) {
      if (std::find(quants_sel.begin(), quants_sel.end(), q.name) == quants_sel.end()) continue;
      MoeSpec s;
      s.num_experts = sh.E, s.hidden = sh.H, s.inter = sh.I, s.k = sh.k, s.bits = q.bits, s.block_size = q.bs;
      s.activation = Activation::swiglu, s.swiglu_fusion = sh.fusion, s.swiglu_limit = sh.limit;
      s.activation_alpha = sh.alpha, s.activation_beta = sh.beta, s.normalize_routing_weights = true;
      s.act_dtype = DType::bf16, s.scale_dtype = DType::bf16;
      s.validate();
      RawExperts raw;
      auto make = [&](Fc fc, uint64_t seed) {
        RawMatrix m;
        m.weights = Tensor(DType::u8, raw_weight_shape(s, fc));
        fill_random(m.weights.data_as<uint8_t>(), m.weights.nbytes(), seed);
        const float qstd = float(1 << s.bits) / 3.4641f;
        m.scales = rand_scales(raw_scale_shape(s, fc), 1.7f / (qstd * std::sqrt(float(fc_cols(s, fc)))), seed);
        return m;
      };
      raw.fc1 = make(Fc::fc1, 1);
      raw.fc2 = make(Fc::fc2, 2);
      const double layer_mb = double(raw.nbytes()) / 1e6;
      const auto t0 = std::chrono::steady_clock::now();
      auto packed = be->prepack(s, std::move(raw));
      const double prepack_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      std::printf("# %s %s: raw layer %.0f MB, packed resident %.0f MB, prepack %.1f ms (host raw -> device packed)\n",
                  sh.name, q.name, layer_mb, double(packed->resident_bytes()) / 1e6, prepack_ms);
      const double bpw = q.bits == 4 ? 0.5 + 2.0 / double(q.bs) : 1.0 + 2.0 / double(sh.H);  // int8 row-wise

      for (int64_t T : tokens) {
        // Routing sets: 16 rotate at small T (see the header); prefill reads every expert anyway, and 16
        // random input sets of T >= 512 rows would take longer to generate than to time.
        const int R = T >= 512 ? 2 : 16;
        std::vector<void*> dx(R), dl(R);
        void* dout;
        double touched_sum = 0;
        std::mt19937_64 r(uint64_t(T) * 1000 + 7);
        std::normal_distribution<float> nd(0.f, 1.f);
        for (int i = 0; i < R; ++i) {
          std::vector<uint16_t> x(size_t(T * s.hidden)), l(size_t(T * s.num_experts));
          std::vector<float> lf(size_t(T * s.num_experts));
          for (auto& v : x) v = qmoe::float_to_bf16(nd(r));
          for (int64_t t = 0; t < T; ++t)
            for (int64_t e = 0; e < s.num_experts; ++e) {
              float v = nd(r);
              if (T == 1 && ((e - i * s.k) % s.num_experts + s.num_experts) % s.num_experts < s.k) v += 10.f;
              lf[size_t(t * s.num_experts + e)] = qmoe::bf16_to_float(qmoe::float_to_bf16(v));
              l[size_t(t * s.num_experts + e)] = qmoe::float_to_bf16(v);
            }
          std::set<int> touched;
          std::vector<Route> routes(size_t(s.k));
          for (int64_t t = 0; t < T; ++t) {
            route_token(s, &lf[size_t(t * s.num_experts)], nullptr, routes.data());
            for (auto& ro : routes) touched.insert(ro.expert);
          }
          touched_sum += double(touched.size());
          CU(cudaMalloc(&dx[i], x.size() * 2));
          CU(cudaMalloc(&dl[i], l.size() * 2));
          CU(cudaMemcpy(dx[i], x.data(), x.size() * 2, cudaMemcpyHostToDevice));
          CU(cudaMemcpy(dl[i], l.data(), l.size() * 2, cudaMemcpyHostToDevice));
        }
        CU(cudaMalloc(&dout, size_t(T * s.hidden) * 2));
        CU(cudaDeviceSynchronize());  // the pageable copies above may return before their DMA; st is non-blocking
        cuda_reserve_workspace(*be, *packed, T);
        std::vector<cudaGraphExec_t> graphs(R);
        for (int i = 0; i < R; ++i) {
          cudaGraph_t g;
          CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
          cuda_run_device(*be, *packed, CudaRunArgs{dx[i], dl[i], nullptr, dout, T, st});
          CU(cudaStreamEndCapture(st, &g));
          CU(cudaGraphInstantiate(&graphs[i], g, 0));
          CU(cudaGraphDestroy(g));
        }
        auto time_it = [&](auto&& fn) {
          std::vector<double> ts;
          for (int it = 0; it < iters + 5; ++it) {
            CU(cudaEventRecord(ev0, st));
            fn(it % R);
            CU(cudaEventRecord(ev1, st));
            CU(cudaEventSynchronize(ev1));
            float ms;
            CU(cudaEventElapsedTime(&ms, ev0, ev1));
            if (it >= 5) ts.push_back(ms * 1e3);
          }
          return median(ts);
        };
        const double us_graph = time_it([&](int i) { CU(cudaGraphLaunch(graphs[i], st)); });
        if (qmoe::cuda::timeline_enabled())  // built with QMOE_CUDA_TIMELINE (src/cuda/timeline.h)
          for (int rep = 0; rep < 3; ++rep) {  // single replays after an idle stream; µs from the first mark
            CU(cudaStreamSynchronize(st));
            qmoe::cuda::timeline_reset();
            CU(cudaGraphLaunch(graphs[rep % R], st));
            CU(cudaStreamSynchronize(st));
            uint64_t v[qmoe::cuda::kTlPoints][2];
            qmoe::cuda::timeline_read(v);
            uint64_t t0 = UINT64_MAX;
            for (auto& p : v) t0 = std::min(t0, p[0]);
            std::printf("timeline %s %s T=%lld:", sh.name, q.name, (long long)T);
            for (int p = 0; p < qmoe::cuda::kTlPoints; ++p)
              if (v[p][1] != 0)
                std::printf(" %s %.2f..%.2f", qmoe::cuda::timeline_point_name(p), double(v[p][0] - t0) * 1e-3,
                            double(v[p][1] - t0) * 1e-3);
            std::printf("\n");
          }
        const double us_plain =
            time_it([&](int i) { cuda_run_device(*be, *packed, CudaRunArgs{dx[i], dl[i], nullptr, dout, T, st}); });
        CU(cudaGetLastError());
        // Host-tensor run(): includes H2D of input/logits and D2H of the output (host clock).
        std::vector<uint16_t> hx(size_t(T * s.hidden)), hl(size_t(T * s.num_experts));
        CU(cudaMemcpy(hx.data(), dx[0], hx.size() * 2, cudaMemcpyDeviceToHost));
        CU(cudaMemcpy(hl.data(), dl[0], hl.size() * 2, cudaMemcpyDeviceToHost));
        Tensor hin = Tensor::wrap(DType::bf16, {T, s.hidden}, hx.data(), nullptr);
        Tensor hlog = Tensor::wrap(DType::bf16, {T, s.num_experts}, hl.data(), nullptr);
        Tensor hout(DType::bf16, {T, s.hidden});
        MoeInputs in{hin.view(), hlog.view(), std::nullopt};
        std::vector<double> th;
        for (int it = 0; it < 25; ++it) {
          const auto a = std::chrono::steady_clock::now();
          be->run(*packed, in, hout);
          if (it >= 5) th.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a).count());
        }
        const double us_host = median(th);
        const double touched = touched_sum / R;
        const double bytes = touched * 3.0 * double(s.hidden) * double(s.inter) * bpw + 4.0 * double(T * s.hidden);
        const double floor_us = bytes / bw * 1e6;
        const double flops = 6.0 * double(T) * double(s.k) * double(s.hidden) * double(s.inter);
        std::printf("%-17s %-9s %5lld %6.1f %9.1f %9.1f %9.1f %9.1f %7.0f%% %8.0f %8.1f\n", sh.name, q.name,
                    (long long)T, touched, us_graph, us_plain, us_host, floor_us, 100.0 * floor_us / us_graph,
                    bytes / (us_graph * 1e-6) / 1e9, flops / (us_graph * 1e-6) / 1e12);
        std::fflush(stdout);
        for (auto g : graphs) CU(cudaGraphExecDestroy(g));
        for (int i = 0; i < R; ++i) {
          CU(cudaFree(dx[i]));
          CU(cudaFree(dl[i]));
        }
        CU(cudaFree(dout));
      }
    }
  }
  std::printf("\n(graph_us: CUDA graph replay of the device-pointer core, CUDA events, median of %d; nograph_us: same "
              "core launched directly; run()_us: host API with H2D/D2H copies, host clock, median of 20)\n",
              iters);
  return 0;
}
