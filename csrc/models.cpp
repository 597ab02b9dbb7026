// Blueoil's classification networks in LibTorch (csrc/torch_ext/models.h):
// the layer structure, names and initialisation of torch_ext/models.py. Each
// network is one table (kLmnetV1, kSampleNetwork) that its float and
// quantized classes are both built and run from.
#include "torch_ext/models.h"

#include <torch/nn/init.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/serialize.h>
#include <torch/utils.h>

#include <c10/util/Exception.h>
#include <c10/util/overloaded.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <variant>
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

// ---------------------------------------------------------------------------
// The networks as tables: one entry a layer, in forward order, which is also
// the order the layers are made in (so the random initialisation draws
// follow Python's) and registered in (so the state dict's order is Python's).
// The float and quantized twins of a network are built from the same table.

// A conv block's activation: QuantActivation in the quantized twin, ReLU or
// leaky ReLU(0.1) in the float one; or a plain ReLU in both.
enum class Act { kNone, kQuantizedOrReLU, kQuantizedOrLeakyReLU, kReLU };
// Whether the quantized twin quantizes a convolution's weights: always, or
// as its quantize_first_convolution / quantize_last_convolution option says.
enum class When { kAlways, kFirstOption, kLastOption };
// Widths that are the network's options rather than constants.
constexpr int64_t kInChannels = -1;
constexpr int64_t kNumClasses = -2;

// A stride-1 'SAME' convolution (padding kernel / 2).
struct ConvSpec {
  int64_t in = 0, out = 0, kernel = 1;
  Act activation = Act::kNone;
  When quantize = When::kAlways;
  Init init = Init::kGlorotUniform;
};

// One layer: its name (Python's, the state dict's prefix), the member of
// Layers that holds it, whose type says what it is (a conv block: conv
// without bias, batch norm, activation; a space-to-depth of block 2; the
// dropout; the classifier convolution, with bias; the global average pool),
// and for convolutions their ConvSpec.
template <class Layers>
struct LayerSpec {
  const char* name;
  std::variant<torch::nn::Sequential Layers::*, SpaceToDepth Layers::*, torch::nn::Dropout Layers::*,
               QuantConv2d Layers::*, GlobalAveragePool Layers::*>
      slot;
  ConvSpec conv = {};
};

using detail::LmnetV1Layers;
using detail::SampleNetworkLayers;

// LMNet v1 (Blueoil's lmnet_v1, models.py's LmnetV1 / LmnetV1Quantize).
constexpr LayerSpec<LmnetV1Layers> kLmnetV1[] = {
    {"conv1", &LmnetV1Layers::conv1, {kInChannels, 32, 3, Act::kQuantizedOrReLU, When::kFirstOption}},
    {"conv2", &LmnetV1Layers::conv2, {32, 64, 3, Act::kQuantizedOrReLU}},
    {"pool2", &LmnetV1Layers::pool2},
    {"conv3", &LmnetV1Layers::conv3, {256, 128, 3, Act::kQuantizedOrReLU}},
    {"conv4", &LmnetV1Layers::conv4, {128, 64, 3, Act::kQuantizedOrReLU}},
    {"pool4", &LmnetV1Layers::pool4},
    {"conv5", &LmnetV1Layers::conv5, {256, 128, 3, Act::kQuantizedOrReLU}},
    {"pool5", &LmnetV1Layers::pool5},
    // Blueoil gives conv6 a plain ReLU, in the quantized network too.
    {"conv6", &LmnetV1Layers::conv6, {512, 64, 1, Act::kReLU}},
    {"dropout", &LmnetV1Layers::dropout},
    {"conv7", &LmnetV1Layers::conv7, {64, kNumClasses, 1, Act::kNone, When::kLastOption, Init::kNormal}},
    {"pool7", &LmnetV1Layers::pool7},
};

// Blueoil's quantize example (models.py's SampleNetwork / SampleNetworkQuantize).
constexpr LayerSpec<SampleNetworkLayers> kSampleNetwork[] = {
    {"block_1", &SampleNetworkLayers::block_1,
     {kInChannels, 32, 3, Act::kQuantizedOrLeakyReLU, When::kFirstOption, Init::kHeTruncatedNormal}},
    {"block_last", &SampleNetworkLayers::block_last,
     {32, kNumClasses, 1, Act::kNone, When::kLastOption, Init::kNormal}},
    {"pool", &SampleNetworkLayers::pool},
};

int64_t resolve_width(int64_t width, const detail::NetworkConfig& config) {
  return width == kInChannels ? config.in_channels : (width == kNumClasses ? config.num_classes : width);
}

// Quantized weights when the network is quantized and `spec` says so, else a
// float convolution (Python's nn.Conv2d).
QuantConv2d make_conv(const detail::NetworkConfig& config, const ConvSpec& spec, bool bias) {
  const bool quantize = spec.quantize == When::kAlways ||
                        (spec.quantize == When::kFirstOption ? config.quantize_first : config.quantize_last);
  const WeightQuantizer wq = config.quantized && quantize ? config.weight_quantizer : WeightQuantizer::kNone;
  QuantConv2d conv(QuantConv2dOptions(resolve_width(spec.in, config), resolve_width(spec.out, config), spec.kernel)
                       .stride(1)
                       .padding(spec.kernel / 2)
                       .bias(bias)
                       .weight_quantizer(wq));
  init_conv(*conv, spec.init);
  return conv;
}

torch::nn::AnyModule make_activation(Act act, const detail::NetworkConfig& config) {
  if (config.quantized && act != Act::kReLU) {
    return torch::nn::AnyModule(
        QuantActivation(QuantActivationOptions(config.activation_bit, config.activation_max_value)));
  }
  if (act == Act::kQuantizedOrLeakyReLU) {
    return torch::nn::AnyModule(torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(0.1)));
  }
  return torch::nn::AnyModule(torch::nn::ReLU());
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

// Makes the layers of `table`, registers them in `self` and keeps each in
// its member of `layers`.
template <class Layers, size_t N>
void build_layers(Layers& layers, torch::nn::Module& self, const detail::NetworkConfig& config,
                  const LayerSpec<Layers> (&table)[N]) {
  for (const LayerSpec<Layers>& spec : table) {
    std::visit(c10::overloaded(
                   [&](torch::nn::Sequential Layers::*member) {
                     layers.*member = self.register_module(
                         spec.name, conv_block(make_conv(config, spec.conv, /*bias=*/false),
                                               make_activation(spec.conv.activation, config)));
                   },
                   [&](SpaceToDepth Layers::*member) {
                     layers.*member = self.register_module(spec.name, SpaceToDepth(2));
                   },
                   [&](torch::nn::Dropout Layers::*member) {
                     layers.*member = self.register_module(spec.name, torch::nn::Dropout(config.dropout));
                   },
                   [&](QuantConv2d Layers::*member) {
                     layers.*member = self.register_module(spec.name, make_conv(config, spec.conv, /*bias=*/true));
                   },
                   [&](GlobalAveragePool Layers::*member) {
                     layers.*member = self.register_module(spec.name, GlobalAveragePool());
                   }),
               spec.slot);
  }
}

// The forward: each layer of `table` in turn.
template <class Layers, size_t N>
at::Tensor run_layers(Layers& layers, const LayerSpec<Layers> (&table)[N], at::Tensor x) {
  for (const LayerSpec<Layers>& spec : table) {
    x = std::visit([&](auto member) -> at::Tensor { return (layers.*member)->forward(x); }, spec.slot);
  }
  return x;
}

// What H and W must be divisible by: each space-to-depth halves them.
template <class Layers, size_t N>
constexpr int64_t input_multiple(const LayerSpec<Layers> (&table)[N]) {
  int64_t multiple = 1;
  for (const LayerSpec<Layers>& spec : table) {
    multiple *= std::holds_alternative<SpaceToDepth Layers::*>(spec.slot) ? 2 : 1;
  }
  return multiple;
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

// The NetworkConfig of any of the four option structs: what an option struct
// has (dropout; the quantizer's options) it sets, the rest keeps its default.
template <class Options>
detail::NetworkConfig make_config(const char* name, const Options& options) {
  detail::NetworkConfig config;
  config.name = name;
  config.num_classes = options.num_classes();
  config.in_channels = options.in_channels();
  if constexpr (requires { options.dropout(); }) {
    config.dropout = options.dropout();
  }
  if constexpr (requires { options.weight_quantizer(); }) {
    config.quantized = true;
    config.activation_bit = options.activation_bit();
    config.activation_max_value = options.activation_max_value();
    config.weight_quantizer = options.weight_quantizer();
    config.quantize_first = options.quantize_first_convolution();
    config.quantize_last = options.quantize_last_convolution();
  }
  return config;
}

}  // namespace

namespace detail {

void LmnetV1Layers::build(torch::nn::Module& self, const NetworkConfig& config) {
  check_common(config);
  TORCH_CHECK_VALUE(config.dropout >= 0.0 && config.dropout < 1.0, config.name, ": dropout must be in [0, 1), got ",
                    config.dropout);
  build_layers(*this, self, config, kLmnetV1);
}

at::Tensor LmnetV1Layers::forward_layers(const std::string& name, at::Tensor x) {
  constexpr int64_t multiple = input_multiple(kLmnetV1);
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(2) % multiple == 0 && x.size(3) % multiple == 0, name,
                    ": expected input [N, C, H, W] with H and W divisible by ", multiple, ", got shape ", x.sizes());
  return run_layers(*this, kLmnetV1, std::move(x));
}

void SampleNetworkLayers::build(torch::nn::Module& self, const NetworkConfig& config) {
  check_common(config);
  build_layers(*this, self, config, kSampleNetwork);
}

at::Tensor SampleNetworkLayers::forward_layers(at::Tensor x) {
  return run_layers(*this, kSampleNetwork, std::move(x));
}

}  // namespace detail

LmnetV1Impl::LmnetV1Impl(const LmnetV1Options& options_) : options(options_) {
  reset();
}

void LmnetV1Impl::reset() {
  build(*this, make_config("LmnetV1", options));
}

at::Tensor LmnetV1Impl::forward(at::Tensor x) {
  return forward_layers("LmnetV1", std::move(x));
}

LmnetV1QuantizeImpl::LmnetV1QuantizeImpl(const LmnetV1QuantizeOptions& options_) : options(options_) {
  reset();
}

void LmnetV1QuantizeImpl::reset() {
  build(*this, make_config("LmnetV1Quantize", options));
}

at::Tensor LmnetV1QuantizeImpl::forward(at::Tensor x) {
  return forward_layers("LmnetV1Quantize", std::move(x));
}

SampleNetworkImpl::SampleNetworkImpl(const SampleNetworkOptions& options_) : options(options_) {
  reset();
}

void SampleNetworkImpl::reset() {
  build(*this, make_config("SampleNetwork", options));
}

at::Tensor SampleNetworkImpl::forward(at::Tensor x) {
  return forward_layers(std::move(x));
}

SampleNetworkQuantizeImpl::SampleNetworkQuantizeImpl(const SampleNetworkQuantizeOptions& options_)
    : options(options_) {
  reset();
}

void SampleNetworkQuantizeImpl::reset() {
  build(*this, make_config("SampleNetworkQuantize", options));
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
