// qmoe demo: the main job on a built-in layer. Builds a seeded synthetic MoE layer in a scaled
// Mixtral-8x7B shape (E=8, k=2, SwiGLU; H and I divided by 8 so it runs in seconds on 2 cores),
// quantizes the same float weights to int4 and int8, runs both on the chosen backend and reports
// bytes, times and the relative error against the unquantized fp32 layer.
//
// The demo doubles as a smoke test: it exits 1 when an error is far outside what the quantization
// alone explains (see max_error() below), so a broken backend cannot pass for a working one.
#include <algorithm>
#include <cstdio>
#include <memory>

#include "commands.h"
#include "qmoe/error.h"
#include "qmoe/layer.h"
#include "qmoe/synthetic.h"

namespace qmoe::cli {

namespace {

struct DemoArgs {
  uint64_t seed = 0;
  int64_t tokens = 16;
  int64_t experts = 8, k = 2, hidden = 512, inter = 1792;
  int64_t block_size = 32;
  int repeat = 3;
  bool json = false;
  BackendFlags backend;
};

struct Variant {
  int bits = 0;
  double weight_bytes = 0, resident_bytes = 0, prepack_ms = 0, run_ms = 0, rel_error = 0;
  std::string layout;
};

// Upper bounds on ||q - fp32|| / ||fp32|| for N(0, 1/K) weights. Measured at the default shape:
// int4 0.15 (block 32) to 0.22 (row-wise), int8 0.009 to 0.014 -- the 2^4 ratio of their step sizes.
// The bounds leave ~2x headroom for other shapes and seeds and still separate "quantized" from
// "wrong" (a wrong layer is off by ~1.0 or more).
double max_error(int bits) { return bits == 4 ? 0.4 : 0.03; }

void demo_command(const DemoArgs& a) {
  MoeSpec spec;
  spec.num_experts = a.experts;
  spec.k = a.k;
  spec.hidden = a.hidden;
  spec.inter = a.inter;
  spec.bits = 4;
  spec.block_size = a.block_size;
  spec.activation = Activation::swiglu;
  spec.swiglu_fusion = SwigluFusion::interleaved;  // what ORT's exporters write for Mixtral
  spec.normalize_routing_weights = true;           // Mixtral renormalizes its top-2
  spec.validate();

  SyntheticOptions sopt;
  sopt.seed = a.seed;
  sopt.tokens = a.tokens;
  Stopwatch build_clock;
  SyntheticLayer L = make_synthetic_layer(spec, sopt);
  const MoeInputs inputs = L.inputs();
  const Tensor fp32 = float_forward(spec, L.weights, inputs);
  const double build_ms = build_clock.ms();

  const LayerOptions lopt = layer_options(a.backend);
  std::string backend_name;
  std::vector<Variant> variants;
  for (int bits : {4, 8}) {
    MoeSpec s = spec;
    s.bits = bits;
    RawExperts raw = bits == 4 ? std::move(L.raw) : quantize_float_experts(s, L.weights);
    Variant v;
    v.bits = bits;
    v.weight_bytes = double(raw.nbytes());
    Stopwatch prepack_clock;
    MoeLayer layer(s, std::move(raw), lopt);
    v.prepack_ms = prepack_clock.ms();
    v.resident_bytes = double(layer.packed().resident_bytes());
    v.layout = layer.packed().tag().to_string();
    // The first run also pays for first-touch page faults and thread start-up; report the fastest
    // of --repeat runs (the output is the same every time).
    Tensor y;
    v.run_ms = 1e300;
    for (int r = 0; r < a.repeat; ++r) {
      Stopwatch run_clock;
      y = layer.run(inputs);
      v.run_ms = std::min(v.run_ms, run_clock.ms());
    }
    v.rel_error = relative_error(y.view(), fp32.view());
    backend_name = layer.backend().name();
    variants.push_back(v);
  }
  const double fp32_bytes = double(L.weights.weight_bytes());

  if (a.json) {
    nlohmann::json j;
    j["seed"] = a.seed;
    j["tokens"] = a.tokens;
    j["spec"] = spec_json(spec);
    j["backend"] = backend_name;
    j["fp32_weight_bytes"] = fp32_bytes;
    j["build_ms"] = build_ms;
    for (const Variant& v : variants)
      j["variants"].push_back({{"bits", v.bits},
                               {"block_size", a.block_size},
                               {"weight_bytes", v.weight_bytes},
                               {"resident_bytes", v.resident_bytes},
                               {"layout", v.layout},
                               {"prepack_ms", v.prepack_ms},
                               {"run_ms", v.run_ms},
                               {"repeat", a.repeat},
                               {"rel_error_vs_fp32", v.rel_error},
                               {"max_rel_error", max_error(v.bits)}});
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("qmoe demo: synthetic Mixtral-8x7B-like layer, H and I scaled 1/8 (seed %llu)\n",
                static_cast<unsigned long long>(a.seed));
    std::printf("  shape    %s\n", spec.to_string().c_str());
    std::printf("  tokens   %lld, backend %s; built and ran the fp32 layer in %.0f ms\n",
                static_cast<long long>(a.tokens), backend_name.c_str(), build_ms);
    std::printf("  fp32 weights %s\n", human_bytes(fp32_bytes).c_str());
    std::printf("  %-6s %-10s %-8s %-11s %-11s %s\n", "quant", "bytes", "vs fp32", "prepack", "run",
                "rel. error vs fp32");
    for (const Variant& v : variants)
      std::printf("  int%-3d %-10s %5.1fx   %8.1f ms %8.2f ms  %.2e\n", v.bits, human_bytes(v.weight_bytes).c_str(),
                  fp32_bytes / v.weight_bytes, v.prepack_ms, v.run_ms, v.rel_error);
    std::printf("  (block size %lld; bytes include the scales; run = fastest of %d)\n",
                static_cast<long long>(a.block_size), a.repeat);
  }
  for (const Variant& v : variants)
    if (!(v.rel_error <= max_error(v.bits)))  // also catches NaN
      throw Error("demo: int" + std::to_string(v.bits) + " relative error " + std::to_string(v.rel_error) +
                  " exceeds " + std::to_string(max_error(v.bits)) + ": backend '" + backend_name +
                  "' computes a wrong layer");
}

}  // namespace

Subcommand add_demo(CLI::App& root) {
  auto args = std::make_shared<DemoArgs>();
  CLI::App* app = root.add_subcommand(
      "demo", "Quantize a seeded synthetic Mixtral-like layer to int4 and int8, run it, report bytes, time and error");
  app->footer(
      "Example:\n"
      "  qmoe demo --seed 1 --tokens 64 --backend cpu\n");
  app->add_option("--seed", args->seed, "Seed of the weights and inputs")->capture_default_str();
  app->add_option("--tokens", args->tokens, "Token rows")->check(CLI::Range(int64_t(1), int64_t(1) << 20))->capture_default_str();
  app->add_option("--experts", args->experts, "Experts E")->check(CLI::Range(int64_t(1), int64_t(1024)))->capture_default_str();
  app->add_option("--k", args->k, "Experts per token")->check(CLI::Range(int64_t(1), int64_t(1024)))->capture_default_str();
  app->add_option("--hidden", args->hidden, "Hidden size H")->check(CLI::Range(int64_t(2), int64_t(1) << 16))->capture_default_str();
  app->add_option("--inter", args->inter, "Inter size I")->check(CLI::Range(int64_t(2), int64_t(1) << 16))->capture_default_str();
  app->add_option("--block-size", args->block_size, "Quantization block (0 = row-wise; else a power of two >= 16)")
      ->capture_default_str();
  app->add_option("--repeat", args->repeat, "Runs per variant; the fastest is reported")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  add_backend_flags(*app, args->backend);
  app->add_flag("--json", args->json, "Print a JSON report instead of text");
  return {app, [args] { demo_command(*args); }};
}

}  // namespace qmoe::cli
