// Weights trained in Python load into the C++ models and give the same
// outputs. The state dicts and the Python outputs are written by
// tests/cpp/make_python_weights.py, which ctest runs first (a fixture) and
// whose output folder it passes in TORCH_EXT_PYTHON_WEIGHTS. Without it the
// test fails: it never passes by not comparing.
#include <torch_ext/models.h>

#include <torch/torch.h>

// torch's headers come first: c10/util/Logging.h defines a glog-style
// CHECK(condition) that aborts, which would shadow Catch2's CHECK (no report,
// no count) if it came after catch_compat.h.
#undef CHECK
#include "catch_compat.h"

#include <cstdlib>
#include <string>

namespace {

std::string fixture_dir() {
  const char* dir = std::getenv("TORCH_EXT_PYTHON_WEIGHTS");
  REQUIRE(dir != nullptr);  // set by ctest: run this test through ctest
  return dir;
}

// Loads CASE's state dict into `model` and compares its eval-mode output
// with the Python model's. Exact: the C++ model runs the same ATen ops on
// the same float32 data in the same order (the weight quantizers are the
// same ops the Python ones call, QuantActivation the same operator), and
// CPU convolution is deterministic for a given input, so any difference is
// a bug (a misplaced weight would also flip quantized activations).
void check_case(torch::nn::Module& model, const std::string& name) {
  const std::string dir = fixture_dir();
  INFO("case " << name);
  torch_ext::models::load_state_dict(model, torch_ext::models::read_state_dict(dir + "/" + name + ".state_dict.pt"));
  const auto io = torch_ext::models::read_state_dict(dir + "/" + name + ".io.pt");
  model.eval();
  torch::NoGradGuard no_grad;
  at::Tensor y;
  if (auto* lmnet = dynamic_cast<torch_ext::models::LmnetV1QuantizeImpl*>(&model)) {
    y = lmnet->forward(io.at("input"));
  } else if (auto* lmnet_float = dynamic_cast<torch_ext::models::LmnetV1Impl*>(&model)) {
    y = lmnet_float->forward(io.at("input"));
  } else if (auto* sample = dynamic_cast<torch_ext::models::SampleNetworkQuantizeImpl*>(&model)) {
    y = sample->forward(io.at("input"));
  } else if (auto* sample_float = dynamic_cast<torch_ext::models::SampleNetworkImpl*>(&model)) {
    y = sample_float->forward(io.at("input"));
  }
  REQUIRE(y.defined());
  const at::Tensor& expected = io.at("output");
  INFO("max |difference| " << (y - expected).abs().max().item<double>());
  CHECK(y.sizes() == expected.sizes());
  CHECK(torch::equal(y, expected));
}

}  // namespace

TEST_CASE("LmnetV1Quantize with Python's weights gives Python's outputs", "[python]") {
  torch_ext::models::LmnetV1Quantize model;
  check_case(*model, "lmnet_v1_quantize");
}

TEST_CASE("LmnetV1Quantize, channel-wise and all options, gives Python's outputs", "[python]") {
  torch_ext::models::LmnetV1Quantize model(
      torch_ext::models::LmnetV1QuantizeOptions()
          .num_classes(5)
          .in_channels(1)
          .weight_quantizer(torch_ext::WeightQuantizer::kBinaryChannelWiseMeanScaling)
          .quantize_last_convolution(true)
          .activation_bit(3)
          .activation_max_value(1.5));
  check_case(*model, "lmnet_v1_quantize_channel_wise");
}

TEST_CASE("LmnetV1 with Python's weights gives Python's outputs", "[python]") {
  torch_ext::models::LmnetV1 model;
  check_case(*model, "lmnet_v1");
}

TEST_CASE("SampleNetworkQuantize with Python's weights gives Python's outputs", "[python]") {
  torch_ext::models::SampleNetworkQuantize model;
  check_case(*model, "sample_network_quantize");
  torch_ext::models::SampleNetworkQuantize float_edges(torch_ext::models::SampleNetworkQuantizeOptions()
                                                           .num_classes(4)
                                                           .quantize_first_convolution(false)
                                                           .quantize_last_convolution(false));
  check_case(*float_edges, "sample_network_quantize_float_edges");
}

TEST_CASE("SampleNetwork with Python's weights gives Python's outputs", "[python]") {
  torch_ext::models::SampleNetwork model;
  check_case(*model, "sample_network");
}

TEST_CASE("A state dict of another model is refused, naming the keys", "[python][refused]") {
  // LmnetV1's state dict lacks nothing SampleNetwork needs by chance: its
  // keys are all different, and every one is named.
  torch_ext::models::SampleNetwork model;
  const auto state = torch_ext::models::read_state_dict(fixture_dir() + "/lmnet_v1.state_dict.pt");
  try {
    torch_ext::models::load_state_dict(*model, state);
    FAIL("load_state_dict accepted another model's state dict");
  } catch (const c10::ValueError& error) {
    const std::string text = error.what();
    CHECK(text.find("missing keys [block_1.bn.bias") != std::string::npos);
    CHECK(text.find("conv7.weight") != std::string::npos);
  }
}
