// The binary weight quantizers, torch_ext::QuantConv2d and the models of
// torch_ext::models (csrc/torch_ext/weight_quantization.h, quant_conv.h,
// models.h).
#include <torch_ext/models.h>

#include <torch/torch.h>

// torch's headers come first: c10/util/Logging.h defines a glog-style
// CHECK(condition) that aborts, which would shadow Catch2's CHECK (no report,
// no count) if it came after catch_compat.h.
#undef CHECK
#include "catch_compat.h"

#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

// The formula of docs/quantizer.md written with ATen ops, as the Python
// reference computes it: where(w >= 0, 1, -1) * mean(|w|).
at::Tensor reference_mean_scaling(const at::Tensor& w) {
  return at::where(w >= 0, 1.0, -1.0).to(w.scalar_type()) * w.abs().contiguous().mean();
}

at::Tensor reference_channel_wise(const at::Tensor& w) {
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < w.dim(); ++d) {
    dims.push_back(d);
  }
  const at::Tensor scale = w.dim() == 1 ? w.abs() : w.abs().contiguous().mean(dims, true);
  return at::where(w >= 0, 1.0, -1.0).to(w.scalar_type()) * scale;
}

std::set<std::string> names_of(const torch::nn::Module& module) {
  std::set<std::string> names;
  for (const auto& item : module.named_parameters()) {
    names.insert(item.key());
  }
  for (const auto& item : module.named_buffers()) {
    names.insert(item.key());
  }
  return names;
}

// Python's state dict keys of a conv-bn-act block named `block`.
void add_block(std::set<std::string>& names, const std::string& block) {
  for (const char* key : {".conv.weight", ".bn.weight", ".bn.bias", ".bn.running_mean", ".bn.running_var",
                          ".bn.num_batches_tracked"}) {
    names.insert(block + key);
  }
}

}  // namespace

// The message `f` throws (empty when it throws nothing): Catch2 v2 and v3
// spell their string matchers differently.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& error) {
    return error.what();
  }
  return "";
}

#define CHECK_THROWS_CONTAINING(expr, text) \
  do { \
    const std::string message_ = error_of([&] { (void)(expr); }); \
    INFO("message: " << message_); \
    CHECK(message_.find(text) != std::string::npos); \
  } while (false)

TEST_CASE("binary_mean_scaling_quantize is the formula, bit for bit", "[weight]") {
  torch::manual_seed(1);
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
    auto w = torch::randn({16, 8, 3, 3}).to(dtype);
    w.index_put_({0, 0, 0, 0}, 0.0);  // a zero maps to +scale
    const auto y = torch_ext::binary_mean_scaling_quantize(w);
    CHECK(y.scalar_type() == dtype);
    CHECK(torch::equal(y, reference_mean_scaling(w)));
    CHECK(y.index({0, 0, 0, 0}).item<double>() > 0.0);
    CHECK(y.abs().min().item<double>() == y.abs().max().item<double>());
  }
}

TEST_CASE("binary_channel_wise_mean_scaling_quantize scales each output channel", "[weight]") {
  torch::manual_seed(2);
  const auto w = torch::randn({6, 4, 3, 3});
  const auto y = torch_ext::binary_channel_wise_mean_scaling_quantize(w);
  CHECK(torch::equal(y, reference_channel_wise(w)));
  // Each channel has its own scale: the mean of its |w|.
  CHECK(torch::allclose(y.abs().amax({1, 2, 3}), w.abs().mean({1, 2, 3})));
  const auto v = torch::randn({5});  // one weight a channel: its own |w|
  CHECK(torch::equal(torch_ext::binary_channel_wise_mean_scaling_quantize(v), torch::where(v >= 0, torch::ones_like(v), -torch::ones_like(v)) * v.abs()));
}

TEST_CASE("the weight quantizers keep the layout and the scale of a channels_last weight", "[weight][layout]") {
  torch::manual_seed(3);
  const auto w = torch::randn({32, 16, 3, 3});
  const auto w_cl = w.contiguous(at::MemoryFormat::ChannelsLast);
  for (auto q : {&torch_ext::binary_mean_scaling_quantize, &torch_ext::binary_channel_wise_mean_scaling_quantize}) {
    const auto y = q(w_cl);
    CHECK(y.is_contiguous(at::MemoryFormat::ChannelsLast));
    CHECK(torch::equal(y, q(w)));
  }
}

TEST_CASE("the weight quantizers pass the gradient straight through", "[weight][autograd]") {
  torch::manual_seed(4);
  for (auto q : {&torch_ext::binary_mean_scaling_quantize, &torch_ext::binary_channel_wise_mean_scaling_quantize}) {
    auto w = torch::randn({4, 3, 3, 3}, torch::requires_grad());
    const auto g = torch::randn({4, 3, 3, 3});
    q(w).backward(g);
    CHECK(torch::equal(w.grad(), g));
  }
}

TEST_CASE("the weight quantizers refuse bad w, naming it", "[weight][refused]") {
  const auto ints = torch::ones({2, 2}, torch::kLong);
  CHECK_THROWS_CONTAINING(torch_ext::binary_mean_scaling_quantize(ints), "binary_mean_scaling_quantize: w must have a floating dtype, got dtype=torch.int64");
  CHECK_THROWS_AS(torch_ext::binary_channel_wise_mean_scaling_quantize(ints), c10::TypeError);
  CHECK_THROWS_CONTAINING(torch_ext::binary_channel_wise_mean_scaling_quantize(torch::tensor(1.0)), "w must have an output-channel dim (dim >= 1), got a 0-dim tensor");
  CHECK_THROWS_AS(torch_ext::binary_channel_wise_mean_scaling_quantize(torch::tensor(1.0)), c10::ValueError);
}

TEST_CASE("QuantConv2d convolves with the quantized weight, named weight and bias", "[quant_conv]") {
  torch::manual_seed(5);
  torch_ext::QuantConv2d conv(torch_ext::QuantConv2dOptions(3, 8, 3).padding(1));
  CHECK(names_of(*conv) == (std::set<std::string>{"weight", "bias"}));
  const auto x = torch::randn({2, 3, 10, 10});
  const auto expected =
      torch::conv2d(x, torch_ext::binary_mean_scaling_quantize(conv->weight), conv->bias, 1, 1);
  CHECK(torch::equal(conv(x), expected));
  // The straight-through gradient reaches the float weight.
  conv(x).sum().backward();
  auto w = conv->weight.detach().clone().requires_grad_();
  torch::conv2d(x, w, conv->bias.detach(), 1, 1).sum().backward();
  CHECK(torch::allclose(conv->weight.grad(), w.grad()));

  torch_ext::QuantConv2d plain(
      torch_ext::QuantConv2dOptions(3, 4, 3).bias(false).weight_quantizer(torch_ext::WeightQuantizer::kNone));
  CHECK(names_of(*plain) == (std::set<std::string>{"weight"}));
  CHECK(torch::equal(plain(x), torch::conv2d(x, plain->weight)));

  torch_ext::QuantConv2d reflect(torch_ext::QuantConv2dOptions(3, 4, 3).padding(1).padding_mode(torch::kReflect));
  const auto padded = torch::nn::functional::pad(x, torch::nn::functional::PadFuncOptions({1, 1, 1, 1}).mode(torch::kReflect));
  CHECK(torch::equal(reflect(x), torch::conv2d(padded, torch_ext::binary_mean_scaling_quantize(reflect->weight),
                                               reflect->bias)));
}

TEST_CASE("QuantConv2d prints its quantizer and clones with it", "[quant_conv]") {
  torch_ext::QuantConv2d conv(torch_ext::QuantConv2dOptions(3, 8, 3).padding(1).weight_quantizer(
      torch_ext::WeightQuantizer::kBinaryChannelWiseMeanScaling));
  std::ostringstream text;
  text << *conv;
  CHECK(text.str() == "torch_ext::QuantConv2d(3, 8, kernel_size=[3, 3], stride=[1, 1], padding=[1, 1], "
                      "weight_quantizer=binary_channel_wise_mean_scaling)");
  auto copy = std::dynamic_pointer_cast<torch_ext::QuantConv2dImpl>(conv->clone());
  REQUIRE(copy);
  CHECK(copy->weight_quantizer == torch_ext::WeightQuantizer::kBinaryChannelWiseMeanScaling);
  CHECK(torch::equal(copy->weight, conv->weight));
  CHECK(copy->weight.data_ptr() != conv->weight.data_ptr());
  CHECK(torch_ext::weight_quantizer_from_name("binary_mean_scaling") == torch_ext::WeightQuantizer::kBinaryMeanScaling);
  CHECK_THROWS_CONTAINING(torch_ext::weight_quantizer_from_name("ternary"), "weight_quantizer='ternary' is unknown");
}

TEST_CASE("SpaceToDepth uses TensorFlow's channel order", "[models]") {
  const auto x = torch::arange(2 * 3 * 4 * 6, torch::kFloat).reshape({2, 3, 4, 6});
  const auto y = torch_ext::models::SpaceToDepth(2)(x);
  REQUIRE(y.sizes() == torch::IntArrayRef({2, 12, 2, 3}));
  // Output channel (dy * b + dx) * C + c holds input (c, y*b + dy, x*b + dx).
  for (int64_t dy = 0; dy < 2; ++dy) {
    for (int64_t dx = 0; dx < 2; ++dx) {
      for (int64_t c = 0; c < 3; ++c) {
        for (int64_t i = 0; i < 2; ++i) {
          for (int64_t j = 0; j < 3; ++j) {
            CHECK(y[1][(dy * 2 + dx) * 3 + c][i][j].item<float>() == x[1][c][i * 2 + dy][j * 2 + dx].item<float>());
          }
        }
      }
    }
  }
  CHECK_THROWS_AS(torch_ext::models::SpaceToDepth(2)(torch::zeros({1, 1, 3, 4})), c10::ValueError);
}

TEST_CASE("LmnetV1Quantize has Python's parameter and buffer names and quantizers", "[models]") {
  torch_ext::models::LmnetV1Quantize model;
  std::set<std::string> expected;
  for (const char* block : {"conv1", "conv2", "conv3", "conv4", "conv5", "conv6"}) {
    add_block(expected, block);
  }
  expected.insert("conv7.weight");
  expected.insert("conv7.bias");
  CHECK(names_of(*model) == expected);
  // Binary weights in conv1..conv6, a float conv7 (Blueoil's default).
  for (auto* block : {&model->conv1, &model->conv2, &model->conv3, &model->conv4, &model->conv5, &model->conv6}) {
    auto conv = (*block)->ptr(0)->as<torch_ext::QuantConv2dImpl>();
    REQUIRE(conv != nullptr);
    CHECK(conv->weight_quantizer == torch_ext::WeightQuantizer::kBinaryMeanScaling);
    auto bn = (*block)->ptr(1)->as<torch::nn::BatchNorm2dImpl>();
    REQUIRE(bn != nullptr);
    CHECK(bn->options.eps() == 1e-3);
    CHECK(bn->options.momentum().value() == 0.01);
  }
  CHECK(model->conv7->weight_quantizer == torch_ext::WeightQuantizer::kNone);
  CHECK(model->conv1->ptr(2)->as<torch_ext::QuantActivationImpl>() != nullptr);
  CHECK(model->conv6->ptr(2)->as<torch::nn::ReLUImpl>() != nullptr);
  CHECK(model->dropout->options.p() == 0.5);
  CHECK(model->forward(torch::randn({2, 3, 16, 24})).sizes() == torch::IntArrayRef({2, 10}));

  torch_ext::models::LmnetV1Quantize options(torch_ext::models::LmnetV1QuantizeOptions()
                                                 .quantize_first_convolution(false)
                                                 .quantize_last_convolution(true)
                                                 .in_channels(1)
                                                 .num_classes(4));
  CHECK(options->conv1->ptr(0)->as<torch_ext::QuantConv2dImpl>()->weight_quantizer == torch_ext::WeightQuantizer::kNone);
  CHECK(options->conv7->weight_quantizer == torch_ext::WeightQuantizer::kBinaryMeanScaling);
  CHECK(options->conv1->ptr(0)->as<torch_ext::QuantConv2dImpl>()->weight.size(1) == 1);
}

TEST_CASE("the float twins and SampleNetworkQuantize have Python's names", "[models]") {
  torch_ext::models::LmnetV1 lmnet;
  CHECK(lmnet->conv1->ptr(0)->as<torch_ext::QuantConv2dImpl>()->weight_quantizer == torch_ext::WeightQuantizer::kNone);
  CHECK(lmnet->conv1->ptr(2)->as<torch::nn::ReLUImpl>() != nullptr);
  std::set<std::string> expected;
  add_block(expected, "block_1");
  expected.insert("block_last.weight");
  expected.insert("block_last.bias");
  torch_ext::models::SampleNetworkQuantize sample;
  CHECK(names_of(*sample) == expected);
  CHECK(sample->block_last->weight_quantizer == torch_ext::WeightQuantizer::kBinaryMeanScaling);
  torch_ext::models::SampleNetwork sample_float;
  CHECK(names_of(*sample_float) == expected);
  CHECK(sample_float->block_1->ptr(2)->as<torch::nn::LeakyReLUImpl>() != nullptr);
  CHECK(sample->forward(torch::randn({2, 3, 9, 7})).sizes() == torch::IntArrayRef({2, 10}));
}

TEST_CASE("the models refuse bad options and inputs, naming them", "[models][refused]") {
  using torch_ext::models::LmnetV1Quantize;
  using torch_ext::models::LmnetV1QuantizeOptions;
  CHECK_THROWS_CONTAINING(LmnetV1Quantize(LmnetV1QuantizeOptions().num_classes(0)), "LmnetV1Quantize: num_classes must be a positive int, got 0");
  CHECK_THROWS_CONTAINING(LmnetV1Quantize(LmnetV1QuantizeOptions().in_channels(-1)), "in_channels must be a positive int, got -1");
  CHECK_THROWS_CONTAINING(LmnetV1Quantize(LmnetV1QuantizeOptions().dropout(1.0)), "dropout must be in [0, 1), got 1");
  CHECK_THROWS_AS(LmnetV1Quantize(LmnetV1QuantizeOptions().activation_bit(0)), c10::ValueError);
  LmnetV1Quantize model;
  CHECK_THROWS_CONTAINING(model->forward(torch::zeros({1, 3, 12, 16})), "H and W divisible by 8, got shape [1, 3, 12, 16]");
}

TEST_CASE("LmnetV1Quantize trains, clones and saves", "[models][train]") {
  torch::manual_seed(6);
  torch_ext::models::LmnetV1Quantize model(torch_ext::models::LmnetV1QuantizeOptions().num_classes(2).dropout(0.0));
  // Two classes a bright top half or a bright bottom half: learnable in a
  // few steps.
  auto x = torch::randn({16, 3, 16, 16}) * 0.1;
  auto target = torch::arange(16) % 2;
  x.index_put_({target == 0, torch::indexing::Slice(), torch::indexing::Slice(0, 8)}, 1.0);
  x.index_put_({target == 1, torch::indexing::Slice(), torch::indexing::Slice(8, 16)}, 1.0);
  torch::optim::Adam opt(model->parameters(), 0.01);
  float first = 0.0f, last = 0.0f;
  for (int step = 0; step < 15; ++step) {
    opt.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), target);
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<float>();
  }
  CHECK(last < first);
  model->eval();
  auto copy = std::dynamic_pointer_cast<torch_ext::models::LmnetV1QuantizeImpl>(model->clone());
  REQUIRE(copy);
  copy->eval();
  CHECK(torch::equal(copy->forward(x), model->forward(x)));
  CHECK(copy->conv1->ptr(0)->as<torch_ext::QuantConv2dImpl>()->weight.data_ptr() !=
        model->conv1->ptr(0)->as<torch_ext::QuantConv2dImpl>()->weight.data_ptr());
}
