// qmoe bench: how fast a backend runs a layer of a real model's shape, against the memory floor.
//
// A timing tool, not a correctness one: the weights are random bytes with scales ~ 1/sqrt(K) (the
// kernels' speed does not depend on the values, and generating bytes is far faster than quantizing
// floats), so even a DeepSeek-V3-sized layer is ready in seconds. Per token count it reports the
// median of --repeat timed runs after one warm-up, and the bytes floor of docs/performance.md:
//
//   floor bytes = touched experts x raw bytes of one expert (3 H I weights at bits/8 plus their
//                 scales: exactly "3·H·I × bytes per weight") + activations in and out (2 T H |T|)
//
// with the touched experts counted from the routing actually run (not the uniform-routing estimate).
// GB/s = floor bytes / median time, and it is compared with a read-bandwidth probe measured in the
// same process (every thread sums a disjoint part of a buffer, best of 5), so "% of read bandwidth"
// means something on whatever machine runs it. Logits rotate over 8 sets so repeated runs touch
// different experts; when the touched weights fit in the last-level cache (the small shape) the
// fraction can exceed 100% -- that is the cache, not a bug, and the text output says so.
//
// bench/cpu_bench.cpp is the benchmark that produced docs/PERF.md (it also runs the ORT peer); this
// subcommand is the quick, self-contained version for users.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <set>
#include <thread>

#include "commands.h"
#include "progress.h"
#include "qmoe/error.h"
#include "qmoe/layer.h"
#include "qmoe/routing.h"

namespace qmoe::cli {

namespace {

struct BenchArgs {
  std::string shape = "small";
  std::vector<int64_t> tokens{1, 8, 64};
  int bits = 4;
  int64_t block_size = 32;
  std::string scale_dtype = "float32";
  std::string dtype = "float32";
  int repeat = 10;
  int bandwidth_mib = 256;
  uint64_t seed = 0;
  bool json = false, quiet = false;
  BackendFlags backend;
};

struct ModelShape {
  const char* name;
  int64_t E, k, H, I;
  const char* note;
};

// docs/performance.md's shapes, plus a small one (Mixtral scaled by 1/4 in H and I) for quick runs.
constexpr ModelShape kShapes[] = {
    {"small", 8, 2, 1024, 3584, "Mixtral-like, H and I scaled 1/4"},
    {"mixtral", 8, 2, 4096, 14336, "Mixtral-8x7B"},
    {"qwen3-30b-a3b", 128, 8, 2048, 768, "Qwen3-30B-A3B"},
    {"gpt-oss-20b", 32, 4, 2880, 2880, "gpt-oss-20b (limit 7, alpha 1.702, beta 1)"},
    {"deepseek-v3-like", 256, 8, 7168, 2048, "DeepSeek-V3 routed experts (~5.8 GB in int4)"},
};

const ModelShape& find_shape(const std::string& name) {
  for (const ModelShape& s : kShapes)
    if (name == s.name) return s;
  throw Error("--shape: unknown shape '" + name + "'");  // unreachable: CLI11 checks the set
}

// xorshift64*: a few GB/s per thread, so a multi-GB layer fills in about a second.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull) {}
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545f4914f6cdd1dull;
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * float(next() >> 40) * 0x1p-24f; }
};

void parallel_for(int threads, const std::function<void(int)>& fn) {
  std::vector<std::thread> ts;
  for (int t = 1; t < threads; ++t) ts.emplace_back(fn, t);
  fn(0);
  for (auto& th : ts) th.join();
}

RawMatrix random_matrix(const MoeSpec& s, Fc fc, int threads, uint64_t seed) {
  RawMatrix m;
  m.weights = Tensor(DType::u8, raw_weight_shape(s, fc));
  m.scales = Tensor(s.scale_dtype, raw_scale_shape(s, fc));
  uint8_t* w = m.weights.data_as<uint8_t>();
  const size_t n = m.weights.nbytes();
  parallel_for(threads, [&](int t) {
    Rng r(seed * 1000 + uint64_t(t));
    const size_t b = n * size_t(t) / size_t(threads), e = n * size_t(t + 1) / size_t(threads);
    size_t i = b;
    for (; i + 8 <= e; i += 8) {
      const uint64_t v = r.next();
      std::memcpy(w + i, &v, 8);
    }
    for (; i < e; ++i) w[i] = uint8_t(r.next());
  });
  // Scales ~ 1/sqrt(K) / 2^(bits-1): activations stay O(1) through both matrices, outputs finite.
  Rng r(seed ^ 0xabcdef);
  const float mag = 0.5f / std::sqrt(float(fc_cols(s, fc))) / float(1 << (s.bits - 1));
  const int64_t ns = m.scales.numel();
  for (int64_t i = 0; i < ns; ++i) store_from_float(s.scale_dtype, m.scales.data(), i, r.uniform(0.5f, 1.5f) * mag);
  return m;
}

Tensor random_tensor(DType t, Shape shape, float lo, float hi, Rng& r) {
  Tensor x(t, std::move(shape));
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; ++i) store_from_float(t, x.data(), i, r.uniform(lo, hi));
  return x;
}

// Best of 5 passes over `mib` MiB, each thread summing a disjoint slice (what a GEMV over the weights
// does at best). Bytes per second.
double read_bandwidth(int threads, int mib) {
  const size_t n = (size_t(mib) << 20) / 8;
  std::vector<uint64_t> buf(n);
  parallel_for(threads, [&](int t) {
    const size_t b = n * size_t(t) / size_t(threads), e = n * size_t(t + 1) / size_t(threads);
    for (size_t i = b; i < e; ++i) buf[i] = i;  // first touch by the thread that reads it
  });
  std::vector<uint64_t> sink(size_t(threads), 0);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    Stopwatch clock;
    parallel_for(threads, [&](int t) {
      const size_t b = n * size_t(t) / size_t(threads), e = n * size_t(t + 1) / size_t(threads);
      uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      size_t i = b;
      for (; i + 4 <= e; i += 4) a0 += buf[i], a1 += buf[i + 1], a2 += buf[i + 2], a3 += buf[i + 3];
      for (; i < e; ++i) a0 += buf[i];
      sink[size_t(t)] = a0 + a1 + a2 + a3;
    });
    best = std::max(best, double(n * 8) / (clock.ms() * 1e-3));
  }
  // Use the sums so the compiler cannot drop the loads.
  if (std::accumulate(sink.begin(), sink.end(), uint64_t(0)) == 1) std::fprintf(stderr, " ");
  return best;
}

// "AMD EPYC 9654 96-Core Processor" from /proc/cpuinfo, so a saved report says which machine ran it.
std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  return "unknown";
}

struct Case {
  int64_t tokens = 0;
  double median_us = 0, min_us = 0, touched = 0, floor_bytes = 0, flops = 0;
};

void bench_command(const BenchArgs& a) {
  const ModelShape& shape = find_shape(a.shape);
  MoeSpec s;
  s.num_experts = shape.E;
  s.k = shape.k;
  s.hidden = shape.H;
  s.inter = shape.I;
  s.bits = a.bits;
  s.block_size = a.block_size;
  s.activation = Activation::swiglu;
  s.swiglu_fusion = SwigluFusion::interleaved;  // the mode ORT's exporters and CPU kernel use
  s.normalize_routing_weights = true;
  if (std::string(shape.name) == "gpt-oss-20b") {
    s.swiglu_limit = 7.0f;
    s.activation_alpha = 1.702f;
    s.activation_beta = 1.0f;
  }
  s.act_dtype = parse_dtype(a.dtype);
  s.scale_dtype = parse_dtype(a.scale_dtype);
  s.validate();
  for (int64_t T : a.tokens)
    if (T < 1 || T > (int64_t(1) << 20)) throw Error("--tokens: expected counts in [1, 1048576], got " + std::to_string(T));

  const LayerOptions lopt = layer_options(a.backend);
  std::unique_ptr<Backend> backend = make_backend(lopt.backend, lopt);
  const int threads = a.backend.threads > 0 ? a.backend.threads : std::max(1, int(std::thread::hardware_concurrency()));

  const int64_t runs_total = int64_t(a.tokens.size()) * (a.repeat + 1);
  Progress progress("bench: measuring read bandwidth", 0, !a.quiet);
  const double bw = a.bandwidth_mib > 0 ? read_bandwidth(threads, a.bandwidth_mib) : 0.0;

  progress.phase("bench: generating " + std::string(shape.name) + " weights");
  RawExperts raw;
  raw.fc1 = random_matrix(s, Fc::fc1, threads, a.seed * 2 + 1);
  raw.fc2 = random_matrix(s, Fc::fc2, threads, a.seed * 2 + 2);
  const double raw_bytes = double(raw.nbytes());
  const double expert_bytes = raw_bytes / double(s.num_experts);

  progress.phase("bench: prepack for " + backend->name());
  Stopwatch prepack_clock;
  std::unique_ptr<PackedExperts> packed = backend->prepack(s, std::move(raw));
  const double prepack_ms = prepack_clock.ms();

  progress.phase("bench: running", runs_total);
  int64_t runs_done = 0;
  std::vector<Case> cases;
  Rng r(a.seed * 7919 + 17);
  const double act_size = double(dtype_size(s.act_dtype));
  const double fc_weights = double(s.fc1_rows() * s.hidden + s.hidden * s.inter);  // per expert
  for (int64_t T : a.tokens) {
    constexpr int kSets = 8;
    const Tensor x = random_tensor(s.act_dtype, {T, s.hidden}, -1.f, 1.f, r);
    std::vector<Tensor> logits;
    std::vector<double> touched_per_set;
    for (int set = 0; set < kSets; ++set) {
      logits.push_back(random_tensor(s.act_dtype, {T, s.num_experts}, -3.f, 3.f, r));
      const MoeInputs in{x.view(), logits.back().view(), std::nullopt};
      validate_inputs(s, in);
      std::set<int32_t> used;
      for (const Route& rt : route_all(s, in)) used.insert(rt.expert);
      touched_per_set.push_back(double(used.size()));
    }
    Tensor out(s.act_dtype, {T, s.hidden});
    std::vector<double> times;
    double touched_sum = 0;
    for (int rep = 0; rep <= a.repeat; ++rep) {  // rep 0 warms up (page faults, thread start)
      const int set = rep % kSets;
      const MoeInputs in{x.view(), logits[size_t(set)].view(), std::nullopt};
      Stopwatch clock;
      backend->run(*packed, in, out);
      const double ms = clock.ms();
      if (rep > 0) times.push_back(ms), touched_sum += touched_per_set[size_t(set)];
      progress.update(++runs_done);
    }
    // Never time garbage: a layer of random weights still gives finite, not-all-zero output.
    double check = 0;
    for (int64_t i = 0; i < out.numel(); ++i) check += std::fabs(load_as_float(s.act_dtype, out.data(), i));
    if (!std::isfinite(check) || check == 0)
      throw Error("bench: backend '" + backend->name() + "' produced " + (check == 0 ? "all-zero" : "non-finite") +
                  " output at T=" + std::to_string(T));
    std::sort(times.begin(), times.end());
    Case c;
    c.tokens = T;
    c.median_us = times[times.size() / 2] * 1e3;
    c.min_us = times.front() * 1e3;
    c.touched = touched_sum / double(times.size());
    c.floor_bytes = c.touched * expert_bytes + 2.0 * double(T) * double(s.hidden) * act_size;
    c.flops = 2.0 * double(T) * double(s.k) * fc_weights;
    cases.push_back(c);
  }
  progress.finish();

  const LayoutTag& tag = packed->tag();
  if (a.json) {
    nlohmann::json j;
    j["shape"] = {{"name", shape.name}, {"note", shape.note}};
    j["spec"] = spec_json(s);
    j["backend"] = backend->name();
    j["layout"] = tag.to_string();
    j["threads"] = threads;
    j["cpu"] = cpu_model();
    j["read_bandwidth_gbs"] = bw / 1e9;
    j["bandwidth_probe_mib"] = a.bandwidth_mib;
    j["weight_bytes"] = raw_bytes;
    j["expert_bytes"] = expert_bytes;
    j["resident_bytes"] = packed->resident_bytes();
    j["prepack_ms"] = prepack_ms;
    j["prepack_gbs"] = prepack_ms > 0 ? raw_bytes / prepack_ms / 1e6 : 0.0;
    j["repeat"] = a.repeat;
    j["cases"] = nlohmann::json::array();
    for (const Case& c : cases) {
      const double gbs = c.floor_bytes / (c.median_us * 1e3);
      nlohmann::json cj = {{"tokens", c.tokens},         {"median_us", c.median_us},
                           {"min_us", c.min_us},         {"touched_experts", c.touched},
                           {"floor_bytes", c.floor_bytes}, {"gbs", gbs},
                           {"gflops", c.flops / (c.median_us * 1e3)}};
      if (bw > 0) {
        cj["floor_us"] = c.floor_bytes / bw * 1e6;
        cj["fraction_of_read_bandwidth"] = gbs * 1e9 / bw;
      }
      j["cases"].push_back(cj);
    }
    std::printf("%s\n", j.dump(2).c_str());
    return;
  }
  std::printf("qmoe bench: %s (%s), random weights (seed %llu)\n", shape.name, shape.note,
              static_cast<unsigned long long>(a.seed));
  std::printf("  spec     %s\n", s.to_string().c_str());
  std::printf("  backend  %s, layout %s, %d threads on %s\n", backend->name().c_str(), tag.to_string().c_str(), threads,
              cpu_model().c_str());
  if (bw > 0)
    std::printf("  memory   read bandwidth %.1f GB/s (%d MiB, %d threads, best of 5)\n", bw / 1e9, a.bandwidth_mib, threads);
  std::printf("  weights  %s raw (%s per expert), %s resident; prepack %.1f ms (%.2f GB/s)\n",
              human_bytes(raw_bytes).c_str(), human_bytes(expert_bytes).c_str(),
              human_bytes(double(packed->resident_bytes())).c_str(), prepack_ms,
              prepack_ms > 0 ? raw_bytes / prepack_ms / 1e6 : 0.0);
  std::printf("  %6s %12s %12s %8s %11s %8s %9s %9s\n", "T", "median_us", "min_us", "touched", "floor_MB", "GB/s",
              "%read_bw", "GFLOP/s");
  bool over = false;
  for (const Case& c : cases) {
    const double gbs = c.floor_bytes / (c.median_us * 1e3);
    char frac[16] = "-";
    if (bw > 0) std::snprintf(frac, sizeof frac, "%.1f%%", 100.0 * gbs * 1e9 / bw);
    over = over || (bw > 0 && gbs * 1e9 > bw);
    std::printf("  %6lld %12.1f %12.1f %8.2f %11.2f %8.1f %9s %9.1f\n", static_cast<long long>(c.tokens), c.median_us,
                c.min_us, c.touched, c.floor_bytes / 1e6, gbs, frac, c.flops / (c.median_us * 1e3));
  }
  std::printf("  (median of %d runs after a warm-up; floor = touched experts x expert bytes + activations in/out)\n",
              a.repeat);
  if (over)
    std::printf("  note: above 100%% of the read bandwidth the touched weights were served from cache (try a larger --shape)\n");
}

}  // namespace

Subcommand add_bench(CLI::App& root) {
  auto args = std::make_shared<BenchArgs>();
  CLI::App* app = root.add_subcommand(
      "bench", "Time a backend on a synthetic layer of a real model's shape: median us, GB/s over the bytes floor");
  app->footer(
      "Examples:\n"
      "  qmoe bench\n"
      "  qmoe bench --shape mixtral --tokens 1,8,64 --bits 4 --block-size 32 --backend cpu --json\n"
      "  qmoe bench --shape qwen3-30b-a3b --bits 8 --block-size 0 --repeat 20\n"
      "Shapes: small (Mixtral / 4), mixtral, qwen3-30b-a3b, gpt-oss-20b, deepseek-v3-like (docs/performance.md).\n");
  std::vector<std::string> shape_names;
  for (const ModelShape& s : kShapes) shape_names.push_back(s.name);
  app->add_option("--shape", args->shape, "Layer shape")->check(CLI::IsMember(shape_names))->capture_default_str();
  app->add_option("--tokens", args->tokens, "Token counts, comma-separated")
      ->delimiter(',')
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20))
      ->capture_default_str();
  app->add_option("--bits", args->bits, "Weight bits")->check(CLI::IsMember({2, 4, 8}))->capture_default_str();
  app->add_option("--block-size", args->block_size, "Quantization block: 0 = one scale per row, else a power of two >= 16")
      ->capture_default_str();
  app->add_option("--scale-dtype", args->scale_dtype, "Scale dtype T2")
      ->check(CLI::IsMember({"float32", "float16", "bfloat16"}))
      ->capture_default_str();
  app->add_option("--dtype", args->dtype, "Activation dtype T")
      ->check(CLI::IsMember({"float32", "float16", "bfloat16"}))
      ->capture_default_str();
  app->add_option("--repeat", args->repeat, "Timed runs per token count (after one warm-up); the median is reported")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  app->add_option("--bandwidth-mib", args->bandwidth_mib, "Buffer of the read-bandwidth probe in MiB; 0 = skip the probe")
      ->check(CLI::Range(0, 1 << 16))
      ->capture_default_str();
  app->add_option("--seed", args->seed, "Seed of the random weights and inputs")->capture_default_str();
  add_backend_flags(*app, args->backend);
  app->add_flag("--json", args->json, "Print a JSON report instead of text");
  add_quiet_flag(*app, args->quiet);
  return {app, [args] { bench_command(*args); }};
}

}  // namespace qmoe::cli
