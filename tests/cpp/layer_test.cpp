// MoeLayer: backend selection, adopting packed weights, and the layout check on adoption.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "qmoe/error.h"
#include "qmoe/layer.h"
#include "qmoe/packed_file.h"
#include "qmoe/synthetic.h"

using namespace qmoe;

namespace {

MoeSpec layer_spec() {
  MoeSpec s;
  s.num_experts = 4, s.k = 2, s.hidden = 64, s.inter = 48, s.bits = 4, s.block_size = 32;
  s.activation = Activation::swiglu;
  s.swiglu_fusion = SwigluFusion::interleaved;
  return s;
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

}  // namespace

TEST(Layer, UnknownBackendListsTheAvailableOnes) {
  try {
    make_backend("tpu");
    FAIL() << "unknown backend accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("got 'tpu'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("reference"), std::string::npos) << e.what();
  }
}

TEST(Layer, AdoptsPackedWeightsFromAFile) {
  const SyntheticLayer l = make_synthetic_layer(layer_spec(), {.seed = 11, .tokens = 7});
  MoeLayer direct(l.spec, l.raw, {.backend = "cpu"});
  const Tensor expected = direct.run(l.inputs());

  const std::string path = (std::filesystem::temp_directory_path() / "qmoe_layer_test.qmoe").string();
  save_packed(path, direct.packed());
  auto backend = make_backend("cpu");
  auto packed = load_packed(path, *backend, l.spec);
  MoeLayer adopted(std::move(backend), std::move(packed));
  EXPECT_TRUE(bitwise_equal(adopted.run(l.inputs()), expected));

  // Weights packed for the CPU backend cannot be handed to the reference backend.
  auto cpu_packed = load_packed(path, *make_backend("cpu"), l.spec);
  std::filesystem::remove(path);
  try {
    MoeLayer wrong(make_backend("reference"), std::move(cpu_packed));
    FAIL() << "a CPU layout was adopted by the reference backend";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected raw v1"), std::string::npos) << e.what();
  }
}
