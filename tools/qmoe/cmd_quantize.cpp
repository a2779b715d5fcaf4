// qmoe quantize: one MoE layer of a Hugging Face checkpoint -> raw QMoE tensors in a .safetensors file
// with every spec fact in its metadata (issue 6 item 2), ready for `qmoe export-onnx` or `qmoe pack`.
//
// The library does the work expert by expert (peak memory: the raw result plus one expert in fp32)
// and reports each finished expert to the progress line. Routing facts the checkpoint cannot supply
// (no config.json) must be stated with --k / --normalize-routing-weights; qmoe never guesses them.
// The output is written atomically once every expert is done.
#include <cstdio>
#include <memory>
#include <optional>

#include "commands.h"
#include "progress.h"
#include "qmoe/checkpoint.h"
#include "qmoe/error.h"

namespace qmoe::cli {

namespace {

struct QuantizeArgs {
  std::string checkpoint, output;
  int64_t layer = -1;
  int bits = 4;
  int64_t block_size = 0;
  bool asym = false;
  std::string scale_dtype = "float32";
  std::string dtype = "float32";
  int swiglu_fusion = 1;
  std::optional<int64_t> k;
  std::optional<bool> normalize;
  bool json = false, quiet = false;
};

void quantize_command(const QuantizeArgs& a) {
  require_input_path("CHECKPOINT", a.checkpoint);
  require_writable_output("-o", a.output);
  const FileKind kind = detect_file_kind(a.checkpoint);
  if (kind != FileKind::checkpoint)
    throw Error("CHECKPOINT " + a.checkpoint + ": is " + std::string(file_kind_name(kind)) +
                ", not a Hugging Face checkpoint (a folder, model.safetensors.index.json or .safetensors file)");
  require_distinct(a.checkpoint, "-o", a.output);

  CheckpointQuantizeOptions opt;
  opt.quant.bits = a.bits;
  opt.quant.block_size = a.block_size;
  opt.quant.symmetric = !a.asym;
  opt.quant.scale_dtype = parse_dtype(a.scale_dtype);
  opt.act_dtype = parse_dtype(a.dtype);
  opt.fusion = static_cast<SwigluFusion>(a.swiglu_fusion);
  opt.k = a.k;
  opt.normalize_routing_weights = a.normalize;

  Stopwatch clock;
  const CheckpointLayer L = open_checkpoint_layer(a.checkpoint, a.layer);
  // The library would refuse these too; here the message can name the flag to pass.
  if (!opt.k && !L.k)
    throw Error(a.checkpoint + ": experts per token (k) unknown for family '" + L.family +
                "' (no config.json with num_experts_per_tok); pass --k N");
  if (!opt.normalize_routing_weights && !L.normalize_routing_weights)
    throw Error(a.checkpoint + ": whether routing weights are renormalised over the top-k is unknown for family '" +
                L.family + "' (no config.json with norm_topk_prob); pass --normalize-routing-weights 0|1");
  const MoeSpec spec = checkpoint_spec(L, opt);  // validates bits, block size and the rest up front

  Progress progress("quantize: layer " + std::to_string(a.layer) + " experts", L.num_experts, !a.quiet);
  opt.progress = [&progress](int64_t done, int64_t) { progress.update(done); };
  RawLayer raw = quantize_checkpoint_layer(L, opt);
  const double quantize_ms = clock.ms();
  progress.phase("quantize: writing " + a.output);
  Stopwatch write_clock;
  write_raw_safetensors(a.output, raw);
  const double write_ms = write_clock.ms();
  progress.finish();

  const double raw_bytes = double(raw.raw.nbytes());
  if (a.json) {
    nlohmann::json j;
    j["checkpoint"] = a.checkpoint;
    j["layer"] = a.layer;
    j["family"] = L.family;
    j["source"] = L.summary();
    j["source_dtype"] = L.source_dtype;
    j["notes"] = L.notes;
    j["spec"] = spec_json(spec);
    j["symmetric"] = !a.asym;
    j["output"] = a.output;
    j["raw_bytes"] = raw_bytes;
    j["time_ms"] = {{"quantize", quantize_ms}, {"write", write_ms}};
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("%s\n", L.summary().c_str());
    for (const std::string& n : L.notes) std::printf("note: %s\n", n.c_str());
    std::printf("quantized to %s, %s\n", spec.to_string().c_str(), a.asym ? "asymmetric" : "symmetric");
    std::printf("%lld experts in %.1f s; wrote %s (%s of weights) in %.1f ms\n", static_cast<long long>(L.num_experts),
                quantize_ms / 1e3, a.output.c_str(), human_bytes(raw_bytes).c_str(), write_ms);
  }
}

}  // namespace

Subcommand add_quantize(CLI::App& root) {
  auto args = std::make_shared<QuantizeArgs>();
  CLI::App* app = root.add_subcommand(
      "quantize", "Quantize the experts of one layer of a Hugging Face checkpoint to a raw QMoE .safetensors file");
  app->footer(
      "Examples:\n"
      "  qmoe quantize path/to/Mixtral-8x7B --layer 3 --bits 4 --block-size 128 -o layer3.safetensors\n"
      "  qmoe quantize model.safetensors.index.json --layer 0 --bits 8 --asym -o raw.safetensors\n"
      "  qmoe export-onnx layer3.safetensors -o layer3.onnx\n"
      "Families: Mixtral, Phi-3.5-MoE, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, gpt-oss (docs/CHECKPOINTS.md).\n"
      "qmoe inspect CHECKPOINT lists the layers that have experts.\n");
  app->add_option("CHECKPOINT", args->checkpoint, "Checkpoint folder, model.safetensors.index.json or .safetensors file")
      ->required();
  app->add_option("--layer", args->layer, "Decoder layer index")->required()->check(CLI::Range(int64_t(0), int64_t(1) << 20));
  app->add_option("-o,--output", args->output, "Raw .safetensors file to write (atomically)")->required();
  app->add_option("--bits", args->bits, "Weight bits")->check(CLI::IsMember({2, 4, 8}))->capture_default_str();
  app->add_option("--block-size", args->block_size, "Quantization block: 0 = one scale per row, else a power of two >= 16")
      ->capture_default_str();
  app->add_flag("--asym", args->asym, "Asymmetric: write zero points (default symmetric)");
  app->add_option("--scale-dtype", args->scale_dtype, "Scale dtype T2")
      ->check(CLI::IsMember({"float32", "float16", "bfloat16"}))
      ->capture_default_str();
  app->add_option("--dtype", args->dtype, "Activation dtype T of the layer (biases are stored in it)")
      ->check(CLI::IsMember({"float32", "float16", "bfloat16"}))
      ->capture_default_str();
  app->add_option("--swiglu-fusion", args->swiglu_fusion,
                  "How fc1 holds SwiGLU's halves: 1 interleaved (ORT's CPU kernel), 2 concatenated, 0 separate fc3")
      ->check(CLI::IsMember({0, 1, 2}))
      ->capture_default_str();
  app->add_option("--k", args->k, "Experts per token (default: from config.json)")->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app->add_option("--normalize-routing-weights", args->normalize,
                  "Renormalise the top-k routing weights, 0 or 1 (default: from config.json)");
  app->add_flag("--json", args->json, "Print a JSON summary instead of text");
  add_quiet_flag(*app, args->quiet);
  return {app, [args] { quantize_command(*args); }};
}

}  // namespace qmoe::cli
