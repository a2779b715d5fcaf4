// CPU benchmark of the cpu backend on the model shapes of docs/performance.md.
//
// Usage: qmoe_bench_cpu [--quick] [--shapes mixtral,qwen3] [--tokens 1,8,64,512]
//                       [--quants int4b32,int4b128,int8] [--threads N] [--isa auto|avx512|avx2|portable]
//                       [--no-prepack] [--min-time S] [--scales f32|f16] [--cpu-compute exact|bf16|int8|int8x3]
// --cpu-compute picks CpuBackendOptions::compute (bf16, int8, int8x3: docs/DESIGN.md, "Numerics").
// Prints the machine's read bandwidth (measured in this run: every thread sums a disjoint part of a
// 1 GiB buffer, best of 5), then per shape and quantization the prepack rate and resident memory, and
// per token count: median µs of one layer call (fp32 in/out; fp32 scales by default, as ORT's CPU
// kernel needs T2 == T for the peer run of bench/ort_cpu_peer.py), wall and CPU time, the bytes floor
// and the fraction of it reached, effective GFLOP/s.
// Bytes floor (performance.md) = touched experts (counted from the routing actually used, averaged
// over the rotating logit sets) x 3 H I x bytes/weight (int4: 0.5 + S/bs, int8 row-wise: 1 + S/K, with
// S the scale size of the run: 4 for fp32 scales, 2 for fp16 as in performance.md)
// + activations (fp32 in + out: 8 T H); floor time = bytes / measured read bandwidth.
// Weights are random bytes (generating them is much faster than quantizing floats; the kernels'
// speed does not depend on the values). Logits rotate over 32 sets so repeated runs touch different
// experts and the last-level cache cannot serve a small touched set between runs.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "qmoe/backend.h"
#include "qmoe/error.h"
#include "qmoe/routing.h"

using namespace qmoe;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// CPU seconds (user + system) of this process: on a shared machine, wall time includes waiting for a
// core; cpu_us / threads close to us means the run had the cores to itself.
double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + 1e-6 * double(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// xorshift64*: fast enough to fill a GB of weights in well under a second per thread.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9e3779b97f4a7c15ull + 1) {}
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545f4914f6cdd1dull;
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * float(next() >> 40) * 0x1p-24f; }
};

double measure_read_bw(int threads) {
  const size_t bytes = size_t(1) << 30, n = bytes / 8;
  std::vector<uint64_t> buf(n);
  for (size_t i = 0; i < n; ++i) buf[i] = i;
  double best = 0;
  std::vector<uint64_t> sink(static_cast<size_t>(threads));
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = Clock::now();
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, t] {
        const size_t b = n * size_t(t) / size_t(threads), e = n * size_t(t + 1) / size_t(threads);
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        for (size_t i = b; i + 4 <= e; i += 4) a0 += buf[i], a1 += buf[i + 1], a2 += buf[i + 2], a3 += buf[i + 3];
        sink[size_t(t)] = a0 + a1 + a2 + a3;
      });
    for (auto& th : ts) th.join();
    best = std::max(best, double(bytes) / seconds_since(t0));
  }
  if (std::accumulate(sink.begin(), sink.end(), uint64_t(0)) == 42) std::printf(" ");
  return best;
}

// Copying into freshly allocated memory (what any prepack must do): the first touch of new pages costs
// page faults, which on this VM bound the rate well below the memory bandwidth. Prepack is compared
// with this in the output.
double measure_fresh_copy_rate(int threads) {
  const size_t bytes = size_t(512) << 20;
  std::vector<uint8_t> src(bytes, 1);
  double best = 0;
  for (int rep = 0; rep < 2; ++rep) {
    const auto t0 = Clock::now();
    auto* dst = static_cast<uint8_t*>(std::malloc(bytes));
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, t] {
        const size_t b = bytes * size_t(t) / size_t(threads), e = bytes * size_t(t + 1) / size_t(threads);
        std::memcpy(dst + b, src.data() + b, e - b);
      });
    for (auto& th : ts) th.join();
    best = std::max(best, double(bytes) / seconds_since(t0));
    if (dst[bytes / 2] != 1) std::printf(" ");
    std::free(dst);
  }
  return best;
}

// Resident set and its high-water mark, in MB (from /proc/self/status).
std::pair<double, double> rss_mb() {
  std::ifstream f("/proc/self/status");
  double rss = 0, hwm = 0;
  for (std::string line; std::getline(f, line);) {
    if (line.rfind("VmRSS:", 0) == 0) rss = std::stod(line.substr(6)) / 1024;
    if (line.rfind("VmHWM:", 0) == 0) hwm = std::stod(line.substr(6)) / 1024;
  }
  return {rss, hwm};
}

void reset_hwm() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";  // resets VmHWM to the current RSS (Linux >= 4.0)
}

struct ModelShape {
  std::string name;
  int64_t E, k, H, I;
};

struct Quant {
  std::string name;
  int bits;
  int64_t block;
};

RawMatrix random_matrix(const MoeSpec& s, Fc fc, int threads, uint64_t seed) {
  RawMatrix m;
  m.weights = Tensor(DType::u8, raw_weight_shape(s, fc));
  m.scales = Tensor(s.scale_dtype, raw_scale_shape(s, fc));
  uint8_t* w = m.weights.data_as<uint8_t>();
  const size_t n = m.weights.nbytes();
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      Rng r(seed + uint64_t(t));
      const size_t b = n * size_t(t) / size_t(threads) / 8 * 8, e = t + 1 == threads ? n : n * size_t(t + 1) / size_t(threads) / 8 * 8;
      size_t i = b;
      for (; i + 8 <= e; i += 8) {
        const uint64_t v = r.next();
        std::memcpy(w + i, &v, 8);
      }
      for (; i < e; ++i) w[i] = uint8_t(r.next());
    });
  for (auto& th : ts) th.join();
  Rng r(seed ^ 0xabcdef);
  // Scales ~ 1/sqrt(K) so activations stay O(1) through both layers.
  const float mag = 0.5f / std::sqrt(float(fc_cols(s, fc))) / float(1 << (s.bits - 1));
  const int64_t ns = m.scales.numel();
  for (int64_t i = 0; i < ns; ++i)
    store_from_float(s.scale_dtype, m.scales.data(), i, r.uniform(0.5f, 1.5f) * mag);
  return m;
}

int run(int argc, char** argv) {
  std::vector<std::string> shapes{"mixtral", "qwen3"}, quants{"int4b32", "int4b128", "int8"};
  std::vector<int64_t> tokens{1, 8, 64, 512};
  int threads = int(std::thread::hardware_concurrency());
  std::string isa = "auto", compute = "exact";
  bool prepack = true;
  double min_time = 1.0;
  DType scale_dtype = DType::f32;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) throw Error(a + ": needs a value");
      return argv[++i];
    };
    if (a == "--quick") {
      tokens = {1, 64};
      quants = {"int4b32"};
      min_time = 0.3;
    } else if (a == "--shapes") {
      shapes = split(val());
    } else if (a == "--quants") {
      quants = split(val());
    } else if (a == "--tokens") {
      tokens.clear();
      for (auto& t : split(val())) tokens.push_back(std::stoll(t));
    } else if (a == "--threads") {
      threads = std::stoi(val());
    } else if (a == "--isa") {
      isa = val();
    } else if (a == "--cpu-compute") {
      compute = val();
    } else if (a == "--no-prepack") {
      prepack = false;
    } else if (a == "--scales") {
      scale_dtype = parse_dtype(val());
    } else if (a == "--min-time") {
      min_time = std::stod(val());
    } else {
      std::fprintf(stderr, "unknown argument %s (see the comment at the top of bench/cpu_bench.cpp)\n", a.c_str());
      return 2;
    }
  }

  const double bw = measure_read_bw(threads);
  std::printf("qmoe_bench_cpu: %d threads, isa %s, compute %s, prepack %s\n", threads, isa.c_str(), compute.c_str(),
              prepack ? "on" : "off");
  std::printf("measured read bandwidth: %.1f GB/s (%d threads, 1 GiB, best of 5)\n", bw / 1e9, threads);
  std::printf("copy into fresh memory (page faults included): %.2f GB/s (%d threads, 512 MiB, best of 2)\n\n",
              measure_fresh_copy_rate(threads) / 1e9, threads);

  const std::vector<ModelShape> all_shapes{{"mixtral", 8, 2, 4096, 14336}, {"qwen3", 128, 8, 2048, 768}};
  const std::vector<Quant> all_quants{{"int4b32", 4, 32}, {"int4b128", 4, 128}, {"int8", 8, 0}};
  std::printf("%-8s %-9s %5s %11s %11s %8s %11s %7s %8s\n", "shape", "quant", "T", "us", "cpu_us", "touched", "floor_us", "%floor", "GFLOP/s");
  for (const auto& sname : shapes) {
    const auto sh = std::find_if(all_shapes.begin(), all_shapes.end(), [&](const ModelShape& x) { return x.name == sname; });
    if (sh == all_shapes.end()) throw Error("--shapes: unknown shape " + sname + " (mixtral, qwen3)");
    for (const auto& qname : quants) {
      const auto q = std::find_if(all_quants.begin(), all_quants.end(), [&](const Quant& x) { return x.name == qname; });
      if (q == all_quants.end()) throw Error("--quants: unknown " + qname + " (int4b32, int4b128, int8)");
      MoeSpec s;
      s.num_experts = sh->E;
      s.k = sh->k;
      s.hidden = sh->H;
      s.inter = sh->I;
      s.bits = q->bits;
      s.block_size = q->block;
      s.activation = Activation::swiglu;
      s.swiglu_fusion = SwigluFusion::interleaved;  // the mode ORT's CPU kernel accepts
      s.normalize_routing_weights = true;
      s.act_dtype = DType::f32;
      s.scale_dtype = scale_dtype;

      reset_hwm();
      const double rss0 = rss_mb().first;
      RawExperts raw;
      raw.fc1 = random_matrix(s, Fc::fc1, threads, 1);
      raw.fc2 = random_matrix(s, Fc::fc2, threads, 2);
      const double raw_bytes = double(raw.nbytes());
      auto be = make_cpu_backend({.threads = threads, .prepack = prepack, .isa = isa, .compute = compute});
      const auto t0 = Clock::now();
      const double c0 = cpu_seconds();
      auto packed = be->prepack(s, std::move(raw));
      const double t_pack = seconds_since(t0), c_pack = cpu_seconds() - c0;
      const auto [rss, hwm] = rss_mb();
      std::printf("# %s %s: %s\n#   layout %s; raw %.0f MB -> resident %.0f MB; prepack %.3f s (cpu %.3f s) = %.2f GB/s; "
                  "RSS after load %.0f MB (+%.0f), peak %.0f MB (+%.0f)\n",
                  sh->name.c_str(), q->name.c_str(), s.to_string().c_str(), packed->tag().to_string().c_str(),
                  raw_bytes / 1e6, double(packed->resident_bytes()) / 1e6, t_pack, c_pack, raw_bytes / t_pack / 1e9, rss, rss - rss0,
                  hwm, hwm - rss0);

      const double ssz = double(dtype_size(scale_dtype));
      const double bpw = q->bits == 4 ? 0.5 + ssz / double(q->block) : 1.0 + ssz / double(s.hidden);
      for (int64_t T : tokens) {
        const int sets = 32;
        Rng r(uint64_t(T) * 77 + 5);
        Tensor x(DType::f32, {T, s.hidden});
        const int64_t nx = x.numel();
        for (int64_t i = 0; i < nx; ++i) x.data_as<float>()[i] = r.uniform(-1.f, 1.f);
        std::vector<Tensor> logits;
        double touched_sum = 0;
        for (int set = 0; set < sets; ++set) {
          Tensor lg(DType::f32, {T, s.num_experts});
          const int64_t nl = lg.numel();
          for (int64_t i = 0; i < nl; ++i) lg.data_as<float>()[i] = r.uniform(-3.f, 3.f);
          const auto routes = route_all(s, MoeInputs{x.view(), lg.view(), std::nullopt});
          std::set<int32_t> used;
          for (const Route& rt : routes) used.insert(rt.expert);
          touched_sum += double(used.size());
          logits.push_back(std::move(lg));
        }
        const double touched = touched_sum / sets;
        const double floor_bytes = touched * 3.0 * double(s.hidden) * double(s.inter) * bpw + 8.0 * double(T) * double(s.hidden);
        const double floor_us = floor_bytes / bw * 1e6;
        Tensor out(DType::f32, {T, s.hidden});
        std::vector<double> times;
        double total = 0, cpu_total = 0;
        for (int rep = 0; rep < 200 && (total < min_time || times.size() < 5); ++rep) {
          const MoeInputs in{x.view(), logits[size_t(rep) % sets].view(), std::nullopt};
          const auto t1 = Clock::now();
          const double c1 = cpu_seconds();
          be->run(*packed, in, out);
          const double dt = seconds_since(t1);
          if (rep > 0) times.push_back(dt), cpu_total += cpu_seconds() - c1;  // rep 0 warms up
          total += dt;
          if (dt > 2.0 && times.size() >= 2) break;  // T=512 mixtral: a few runs suffice
        }
        std::sort(times.begin(), times.end());
        const double us = times[times.size() / 2] * 1e6;
        const double flops = 6.0 * double(T) * double(s.k) * double(s.hidden) * double(s.inter);
        float check = 0;
        for (int64_t i = 0; i < out.numel(); ++i) check += std::fabs(out.data_as<float>()[i]);
        if (!std::isfinite(check)) throw Error("benchmark output is not finite");
        std::printf("%-8s %-9s %5lld %11.1f %11.1f %8.2f %11.1f %6.1f%% %8.1f\n", sh->name.c_str(), q->name.c_str(),
                    static_cast<long long>(T), us, cpu_total / double(times.size()) * 1e6, touched, floor_us, 100.0 * floor_us / us, flops / (us * 1e-6) / 1e9);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}

}  // namespace

// Bad arguments (an unknown shape, a missing value) end with their message and status 2, not abort().
int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qmoe_bench_cpu: %s\n", e.what());
    return 2;
  }
}
