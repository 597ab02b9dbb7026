// Blueoil's classification networks in LibTorch (csrc/torch_ext/models.h):
// the layer structure, names and initialisation of torch_ext/models.py.
#include "torch_ext/models.h"

#include <torch/nn/init.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/serialize.h>
#include <torch/utils.h>

#include <c10/util/Exception.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <vector>

namespace torch_ext::models {

SpaceToDepthImpl::SpaceToDepthImpl(int64_t block_size_) : block_size(block_size_) {
  TORCH_CHECK_VALUE(block_size >= 1, "SpaceToDepth: block_size must be a positive int, got ", block_size);
}

at::Tensor SpaceToDepthImpl::forward(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "SpaceToDepth: expected a 4-D [N, C, H, W] input, got shape ", x.sizes());
  const int64_t b = block_size;
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK_VALUE(
      h % b == 0 && w % b == 0, "SpaceToDepth: height and width must be divisible by block_size=", b,
      ", got input shape ", x.sizes());
  // -> [n, dy, dx, c, h/b, w/b]: TensorFlow's order puts the block offset
  // outermost (the same reshapes and permute as Python, so the same copy).
  return x.reshape({n, c, h / b, b, w / b, b}).permute({0, 3, 5, 1, 2, 4}).reshape({n, b * b * c, h / b, w / b});
}

void SpaceToDepthImpl::pretty_print(std::ostream& stream) const {
  stream << "torch_ext::models::SpaceToDepth(block_size=" << block_size << ", order=tensorflow)";
}

at::Tensor GlobalAveragePoolImpl::forward(const at::Tensor& x) {
  return x.mean({2, 3});
}

void GlobalAveragePoolImpl::pretty_print(std::ostream& stream) const {
  stream << "torch_ext::models::GlobalAveragePool()";
}

namespace {

// tf.keras VarianceScaling(distribution="truncated_normal") divides the
// standard deviation by the std of a unit normal truncated to [-2, 2].
constexpr double kTruncatedNormalStd = 0.87962566103423978;

enum class Init { kGlorotUniform, kHeTruncatedNormal, kNormal };

// TensorFlow's conv initialisers (as _init_conv in models.py), biases zero.
void init_conv(QuantConv2dImpl& conv, Init init) {
  torch::NoGradGuard no_grad;
  switch (init) {
    case Init::kGlorotUniform:
      torch::nn::init::xavier_uniform_(conv.weight);
      break;
    case Init::kHeTruncatedNormal: {
      const double fan_in = static_cast<double>(conv.weight[0].numel());
      const double std = std::sqrt(2.0 / fan_in) / kTruncatedNormalStd;
      // Truncated at two standard deviations: redraw what falls outside.
      // init::normal_ rather than Tensor::normal_: GCC 12 warns (falsely) about
      // the inlined default generator argument of the latter.
      torch::nn::init::normal_(conv.weight, 0.0, std);
      for (auto outside = conv.weight.abs() > 2.0 * std; outside.any().item<bool>();
           outside = conv.weight.abs() > 2.0 * std) {
        conv.weight.masked_scatter_(outside, torch::randn_like(conv.weight).mul_(std));
      }
      break;
    }
    case Init::kNormal:
      torch::nn::init::normal_(conv.weight, 0.0, 0.01);
      break;
  }
  if (conv.bias.defined()) {
    torch::nn::init::zeros_(conv.bias);
  }
}

// A stride-1 'SAME' convolution (padding k / 2), quantized when `quantize`
// and the network is quantized, else a float convolution (Python's nn.Conv2d).
QuantConv2d make_conv(const detail::NetworkConfig& config, int64_t in, int64_t out, int64_t k, bool bias,
                      bool quantize, Init init) {
  const WeightQuantizer wq = config.quantized && quantize ? config.weight_quantizer : WeightQuantizer::kNone;
  QuantConv2d conv(QuantConv2dOptions(in, out, k).stride(1).padding(k / 2).bias(bias).weight_quantizer(wq));
  init_conv(*conv, init);
  return conv;
}

// Blueoil's lmnet_block: Sequential(conv, bn, act), named as in Python.
torch::nn::Sequential conv_block(QuantConv2d conv, torch::nn::AnyModule activation) {
  const int64_t channels = conv->options.out_channels();
  torch::nn::BatchNorm2d bn(torch::nn::BatchNorm2dOptions(channels).eps(kBatchNormEps).momentum(kBatchNormMomentum));
  torch::nn::Sequential block;
  block->push_back("conv", conv);
  block->push_back("bn", bn);
  block->push_back("act", std::move(activation));
  return block;
}

void check_common(const detail::NetworkConfig& config) {
  TORCH_CHECK_VALUE(config.num_classes >= 1, config.name, ": num_classes must be a positive int, got ",
                    config.num_classes);
  TORCH_CHECK_VALUE(config.in_channels >= 1, config.name, ": in_channels must be a positive int, got ",
                    config.in_channels);
  if (config.quantized) {
    // The activation quantizer's own checks, with its wording.
    check_bit(config.activation_bit);
    check_max_value(config.activation_max_value);
    weight_quantizer_name(config.weight_quantizer);
  }
}

}  // namespace

namespace detail {

void LmnetV1Layers::build(torch::nn::Module& self, const NetworkConfig& config) {
  check_common(config);
  TORCH_CHECK_VALUE(config.dropout >= 0.0 && config.dropout < 1.0, config.name, ": dropout must be in [0, 1), got ",
                    config.dropout);
  auto activation = [&]() -> torch::nn::AnyModule {
    if (config.quantized) {
      return torch::nn::AnyModule(
          QuantActivation(QuantActivationOptions(config.activation_bit, config.activation_max_value)));
    }
    return torch::nn::AnyModule(torch::nn::ReLU());
  };
  auto conv = [&](int64_t in, int64_t out, int64_t k, bool quantize = true) {
    return make_conv(config, in, out, k, /*bias=*/false, quantize, Init::kGlorotUniform);
  };
  conv1 = self.register_module("conv1", conv_block(conv(config.in_channels, 32, 3, config.quantize_first), activation()));
  conv2 = self.register_module("conv2", conv_block(conv(32, 64, 3), activation()));
  pool2 = self.register_module("pool2", SpaceToDepth(2));
  conv3 = self.register_module("conv3", conv_block(conv(256, 128, 3), activation()));
  conv4 = self.register_module("conv4", conv_block(conv(128, 64, 3), activation()));
  pool4 = self.register_module("pool4", SpaceToDepth(2));
  conv5 = self.register_module("conv5", conv_block(conv(256, 128, 3), activation()));
  pool5 = self.register_module("pool5", SpaceToDepth(2));
  // Blueoil gives conv6 a plain ReLU, in the quantized network too.
  conv6 = self.register_module("conv6", conv_block(conv(512, 64, 1), torch::nn::AnyModule(torch::nn::ReLU())));
  dropout = self.register_module("dropout", torch::nn::Dropout(config.dropout));
  conv7 = self.register_module(
      "conv7", make_conv(config, 64, config.num_classes, 1, /*bias=*/true, config.quantize_last, Init::kNormal));
  pool7 = self.register_module("pool7", GlobalAveragePool());
}

at::Tensor LmnetV1Layers::forward_layers(const std::string& name, at::Tensor x) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(2) % 8 == 0 && x.size(3) % 8 == 0, name,
                    ": expected input [N, C, H, W] with H and W divisible by 8, got shape ", x.sizes());
  x = conv1->forward(x);
  x = pool2(conv2->forward(x));
  x = conv3->forward(x);
  x = pool4(conv4->forward(x));
  x = pool5(conv5->forward(x));
  x = dropout(conv6->forward(x));
  return pool7(conv7(x));
}

void SampleNetworkLayers::build(torch::nn::Module& self, const NetworkConfig& config) {
  check_common(config);
  torch::nn::AnyModule activation =
      config.quantized
          ? torch::nn::AnyModule(
                QuantActivation(QuantActivationOptions(config.activation_bit, config.activation_max_value)))
          : torch::nn::AnyModule(torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(0.1)));
  block_1 = self.register_module(
      "block_1", conv_block(make_conv(config, config.in_channels, 32, 3, /*bias=*/false, config.quantize_first,
                                      Init::kHeTruncatedNormal),
                            std::move(activation)));
  block_last = self.register_module(
      "block_last",
      make_conv(config, 32, config.num_classes, 1, /*bias=*/true, config.quantize_last, Init::kNormal));
  pool = self.register_module("pool", GlobalAveragePool());
}

at::Tensor SampleNetworkLayers::forward_layers(at::Tensor x) {
  return pool(block_last(block_1->forward(x)));
}

}  // namespace detail

LmnetV1Impl::LmnetV1Impl(const LmnetV1Options& options_) : options(options_) {
  reset();
}

void LmnetV1Impl::reset() {
  detail::NetworkConfig config;
  config.name = "LmnetV1";
  config.num_classes = options.num_classes();
  config.in_channels = options.in_channels();
  config.dropout = options.dropout();
  build(*this, config);
}

at::Tensor LmnetV1Impl::forward(at::Tensor x) {
  return forward_layers("LmnetV1", std::move(x));
}

LmnetV1QuantizeImpl::LmnetV1QuantizeImpl(const LmnetV1QuantizeOptions& options_) : options(options_) {
  reset();
}

void LmnetV1QuantizeImpl::reset() {
  detail::NetworkConfig config;
  config.name = "LmnetV1Quantize";
  config.num_classes = options.num_classes();
  config.in_channels = options.in_channels();
  config.dropout = options.dropout();
  config.quantized = true;
  config.activation_bit = options.activation_bit();
  config.activation_max_value = options.activation_max_value();
  config.weight_quantizer = options.weight_quantizer();
  config.quantize_first = options.quantize_first_convolution();
  config.quantize_last = options.quantize_last_convolution();
  build(*this, config);
}

at::Tensor LmnetV1QuantizeImpl::forward(at::Tensor x) {
  return forward_layers("LmnetV1Quantize", std::move(x));
}

SampleNetworkImpl::SampleNetworkImpl(const SampleNetworkOptions& options_) : options(options_) {
  reset();
}

void SampleNetworkImpl::reset() {
  detail::NetworkConfig config;
  config.name = "SampleNetwork";
  config.num_classes = options.num_classes();
  config.in_channels = options.in_channels();
  build(*this, config);
}

at::Tensor SampleNetworkImpl::forward(at::Tensor x) {
  return forward_layers(std::move(x));
}

SampleNetworkQuantizeImpl::SampleNetworkQuantizeImpl(const SampleNetworkQuantizeOptions& options_)
    : options(options_) {
  reset();
}

void SampleNetworkQuantizeImpl::reset() {
  detail::NetworkConfig config;
  config.name = "SampleNetworkQuantize";
  config.num_classes = options.num_classes();
  config.in_channels = options.in_channels();
  config.quantized = true;
  config.activation_bit = options.activation_bit();
  config.activation_max_value = options.activation_max_value();
  config.weight_quantizer = options.weight_quantizer();
  config.quantize_first = options.quantize_first_convolution();
  config.quantize_last = options.quantize_last_convolution();
  build(*this, config);
}

at::Tensor SampleNetworkQuantizeImpl::forward(at::Tensor x) {
  return forward_layers(std::move(x));
}

std::unordered_map<std::string, at::Tensor> read_state_dict(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK_VALUE(file, "read_state_dict: cannot open path='", path, "'");
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const c10::IValue value = torch::pickle_load(bytes);
  TORCH_CHECK_VALUE(value.isGenericDict(), "read_state_dict: path='", path,
                    "' must hold a dict of tensors (torch.save(dict(model.state_dict()), path)), got ",
                    value.tagKind());
  std::unordered_map<std::string, at::Tensor> state_dict;
  for (const auto& item : value.toGenericDict()) {
    TORCH_CHECK_VALUE(item.key().isString(), "read_state_dict: path='", path, "' has a key that is not a string: ",
                      item.key().tagKind());
    TORCH_CHECK_VALUE(item.value().isTensor(), "read_state_dict: path='", path, "' key '",
                      item.key().toStringRef(), "' holds a ", item.value().tagKind(), ", not a tensor");
    state_dict.emplace(item.key().toStringRef(), item.value().toTensor());
  }
  return state_dict;
}

void load_state_dict(torch::nn::Module& module, const std::unordered_map<std::string, at::Tensor>& state_dict) {
  // Parameters and buffers, by their dotted names; an undefined tensor (a
  // bias that is off) is no entry, as in Python.
  std::vector<std::pair<std::string, at::Tensor>> targets;
  for (const auto& item : module.named_parameters()) {
    targets.emplace_back(item.key(), item.value());
  }
  for (const auto& item : module.named_buffers()) {
    targets.emplace_back(item.key(), item.value());
  }
  std::set<std::string> expected, missing, unexpected;
  for (const auto& [name, tensor] : targets) {
    expected.insert(name);
    if (!state_dict.count(name)) {
      missing.insert(name);
    }
  }
  for (const auto& [name, tensor] : state_dict) {
    if (!expected.count(name)) {
      unexpected.insert(name);
    }
  }
  auto join = [](const std::set<std::string>& names) {
    std::ostringstream text;
    for (const auto& name : names) {
      text << (text.tellp() > 0 ? ", " : "") << name;
    }
    return text.str();
  };
  TORCH_CHECK_VALUE(missing.empty() && unexpected.empty(), "load_state_dict: missing keys [", join(missing),
                    "], unexpected keys [", join(unexpected), "]");
  torch::NoGradGuard no_grad;
  for (auto& [name, tensor] : targets) {
    const at::Tensor& source = state_dict.at(name);
    TORCH_CHECK_VALUE(source.sizes() == tensor.sizes(), "load_state_dict: key '", name, "' has shape ",
                      source.sizes(), " in the state dict and ", tensor.sizes(), " in the module");
    tensor.copy_(source);
  }
}

}  // namespace torch_ext::models
