// qmoe: the command-line program. Declares the subcommands, parses, runs the chosen one, and is the
// only place that turns failures into exit codes (see commands.h).
#include <cstdio>
#include <new>
#include <string>

#include "commands.h"
#include "qmoe/error.h"

namespace {

// Messages go out on exactly one line so scripts can grep them. A message may quote names read from
// a corrupt file, so control characters (newlines, terminal escapes) are replaced.
int fail(const std::string& prefix, const std::string& what) {
  std::string line = what;
  for (char& c : line)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = c == '\n' || c == '\r' || c == '\t' ? ' ' : '?';
  std::fprintf(stderr, "qmoe: %s%s\n", prefix.c_str(), line.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"qmoe: quantized Mixture-of-Experts layers (ONNX Runtime's com.microsoft::QMoE) on CPUs and GPUs.",
               "qmoe"};
  app.require_subcommand(1, 1);
  app.footer(
      "Examples:\n"
      "  qmoe demo\n"
      "  qmoe quantize path/to/Mixtral-8x7B --layer 3 --bits 4 --block-size 128 -o layer3.safetensors\n"
      "  qmoe export-onnx layer3.safetensors -o layer3.onnx\n"
      "  qmoe pack layer3.onnx --target cpu -o layer3.qmoe && qmoe inspect layer3.qmoe\n"
      "  qmoe run layer3.qmoe --input x.npy --router-probs logits.npy --output y.npy\n"
      "  qmoe bench --shape mixtral --tokens 1,8,64\n"
      "Run qmoe SUBCOMMAND --help for each one's options and examples.\n"
      "Exit codes: 0 success, 1 bad input (one line on stderr: qmoe: error: ...), 2 usage error.\n");
  namespace cli = qmoe::cli;
  const std::vector<cli::Subcommand> commands{cli::add_quantize(app), cli::add_export_onnx(app), cli::add_pack(app),
                                              cli::add_inspect(app),  cli::add_run(app),         cli::add_bench(app),
                                              cli::add_demo(app)};

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version arrive here too, with exit code 0.
    return app.exit(e) == 0 ? 0 : 2;
  }

  try {
    for (const auto& c : commands)
      if (c.app->parsed()) {
        c.action();
        return 0;
      }
    return fail("error: ", "no subcommand given");  // unreachable: require_subcommand(1)
  } catch (const qmoe::Error& e) {
    return fail("error: ", e.what());
  } catch (const std::bad_alloc&) {
    return fail("error: ", "out of memory");
  } catch (const std::exception& e) {
    // Anything else is a qmoe bug (a check that should have thrown qmoe::Error first); say so.
    return fail("error: internal error (please report): ", e.what());
  }
}
