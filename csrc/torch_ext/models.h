// Blueoil's classification networks in LibTorch, the C++ twins of
// torch_ext/models.py: LmnetV1 / LmnetV1Quantize (Blueoil's LMNet v1) and
// SampleNetwork / SampleNetworkQuantize (Blueoil's quantize example).
//
// Same constructor options, same layers, same parameter and buffer names as
// in Python (conv1.conv.weight, conv1.bn.running_mean, ..., conv7.weight,
// conv7.bias), so a state dict trained in Python loads here (read_state_dict,
// load_state_dict below) and gives the same outputs. Every convolution is a
// torch_ext::QuantConv2d; the ones Python builds as nn.Conv2d (float
// networks, unquantized first/last convolutions) have WeightQuantizer::kNone,
// which is the same convolution with the same parameter names.
#pragma once

#include "torch_ext/quant_activation.h"
#include "torch_ext/quant_conv.h"

#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/pimpl.h>

#include <string>
#include <unordered_map>

namespace torch_ext::models {

// Blueoil's batch norm: decay 0.99 (PyTorch momentum 0.01), epsilon 1e-3.
constexpr double kBatchNormMomentum = 0.01;
constexpr double kBatchNormEps = 1e-3;

// [N, C, H, W] -> [N, C*b*b, H/b, W/b] in TensorFlow's channel order: output
// channel (dy * b + dx) * C + c holds input (c, y*b + dy, x*b + dx), as
// torch_ext.models.SpaceToDepth (tf.nn.space_to_depth on NHWC data).
class SpaceToDepthImpl : public torch::nn::Cloneable<SpaceToDepthImpl> {
 public:
  explicit SpaceToDepthImpl(int64_t block_size = 2);
  at::Tensor forward(const at::Tensor& x);
  void reset() override {}
  void pretty_print(std::ostream& stream) const override;
  int64_t block_size;
};
TORCH_MODULE(SpaceToDepth);

// Mean over H and W: [N, C, H, W] -> [N, C] (Blueoil's pool7_reshape).
class GlobalAveragePoolImpl : public torch::nn::Cloneable<GlobalAveragePoolImpl> {
 public:
  at::Tensor forward(const at::Tensor& x);
  void reset() override {}
  void pretty_print(std::ostream& stream) const override;
};
TORCH_MODULE(GlobalAveragePool);

struct LmnetV1Options {
  TORCH_ARG(int64_t, num_classes) = 10;
  TORCH_ARG(int64_t, in_channels) = 3;
  // Dropout probability before conv7, in [0, 1).
  TORCH_ARG(double, dropout) = 0.5;
};

// Python's LmnetV1Quantize(num_classes, in_channels, activation_quantizer_kwargs
// = {bit, max_value}, weight_quantizer, quantize_first_convolution,
// quantize_last_convolution, dropout), with Python's defaults.
struct LmnetV1QuantizeOptions {
  TORCH_ARG(int64_t, num_classes) = 10;
  TORCH_ARG(int64_t, in_channels) = 3;
  // QuantActivation's bit and max_value (Blueoil's W1A2: 2 and 2.0).
  TORCH_ARG(int64_t, activation_bit) = 2;
  TORCH_ARG(double, activation_max_value) = 2.0;
  TORCH_ARG(WeightQuantizer, weight_quantizer) = WeightQuantizer::kBinaryMeanScaling;
  TORCH_ARG(bool, quantize_first_convolution) = true;
  // conv7 keeps float weights by default, as Blueoil.
  TORCH_ARG(bool, quantize_last_convolution) = false;
  TORCH_ARG(double, dropout) = 0.5;
};

struct SampleNetworkOptions {
  TORCH_ARG(int64_t, num_classes) = 10;
  TORCH_ARG(int64_t, in_channels) = 3;
};

struct SampleNetworkQuantizeOptions {
  TORCH_ARG(int64_t, num_classes) = 10;
  TORCH_ARG(int64_t, in_channels) = 3;
  TORCH_ARG(int64_t, activation_bit) = 2;
  TORCH_ARG(double, activation_max_value) = 2.0;
  TORCH_ARG(WeightQuantizer, weight_quantizer) = WeightQuantizer::kBinaryMeanScaling;
  TORCH_ARG(bool, quantize_first_convolution) = true;
  TORCH_ARG(bool, quantize_last_convolution) = true;
};

namespace detail {

// What the float and quantized twins differ in (Python's _QuantizerConfig and
// flags); quantized == false is the float network.
struct NetworkConfig {
  std::string name;
  int64_t num_classes = 10;
  int64_t in_channels = 3;
  double dropout = 0.5;
  bool quantized = false;
  int64_t activation_bit = 2;
  double activation_max_value = 2.0;
  WeightQuantizer weight_quantizer = WeightQuantizer::kNone;
  bool quantize_first = false;
  bool quantize_last = false;
};

// LMNet v1's layers; the float and quantized classes share them, built and
// run in the order of the table kLmnetV1 in models.cpp.
class LmnetV1Layers {
 public:
  at::Tensor forward_layers(const std::string& name, at::Tensor x);

  torch::nn::Sequential conv1{nullptr}, conv2{nullptr}, conv3{nullptr}, conv4{nullptr}, conv5{nullptr},
      conv6{nullptr};
  SpaceToDepth pool2{nullptr}, pool4{nullptr}, pool5{nullptr};
  torch::nn::Dropout dropout{nullptr};
  QuantConv2d conv7{nullptr};
  GlobalAveragePool pool7{nullptr};

 protected:
  void build(torch::nn::Module& self, const NetworkConfig& config);
};

// The same for the table kSampleNetwork.
class SampleNetworkLayers {
 public:
  at::Tensor forward_layers(at::Tensor x);

  torch::nn::Sequential block_1{nullptr};
  QuantConv2d block_last{nullptr};
  GlobalAveragePool pool{nullptr};

 protected:
  void build(torch::nn::Module& self, const NetworkConfig& config);
};

}  // namespace detail

// conv1 3x3/32 -> conv2 3x3/64 -> space-to-depth -> conv3 3x3/128 -> conv4
// 3x3/64 -> space-to-depth -> conv5 3x3/128 -> space-to-depth -> conv6
// 1x1/64 (each conv-bn-ReLU) -> dropout -> conv7 1x1/num_classes with bias
// -> global average pool. Input H and W divisible by 8.
class LmnetV1Impl : public torch::nn::Cloneable<LmnetV1Impl>, public detail::LmnetV1Layers {
 public:
  explicit LmnetV1Impl(const LmnetV1Options& options_ = {});
  at::Tensor forward(at::Tensor x);
  void reset() override;
  LmnetV1Options options;
};
TORCH_MODULE(LmnetV1);

// As LmnetV1 with QuantActivation in conv1..conv5 (conv6 keeps ReLU, as
// Blueoil) and quantized weights in conv1 (unless !quantize_first_convolution)
// .. conv6, and conv7 when quantize_last_convolution.
class LmnetV1QuantizeImpl : public torch::nn::Cloneable<LmnetV1QuantizeImpl>, public detail::LmnetV1Layers {
 public:
  explicit LmnetV1QuantizeImpl(const LmnetV1QuantizeOptions& options_ = {});
  at::Tensor forward(at::Tensor x);
  void reset() override;
  LmnetV1QuantizeOptions options;
};
TORCH_MODULE(LmnetV1Quantize);

// block_1: 3x3/32 conv-bn-LeakyReLU(0.1); block_last: 1x1 conv to
// num_classes with bias; pool: global average pool.
class SampleNetworkImpl : public torch::nn::Cloneable<SampleNetworkImpl>, public detail::SampleNetworkLayers {
 public:
  explicit SampleNetworkImpl(const SampleNetworkOptions& options_ = {});
  at::Tensor forward(at::Tensor x);
  void reset() override;
  SampleNetworkOptions options;
};
TORCH_MODULE(SampleNetwork);

// As SampleNetwork with QuantActivation in place of leaky ReLU and quantized
// weights in block_1 and block_last (each unless its flag is false).
class SampleNetworkQuantizeImpl : public torch::nn::Cloneable<SampleNetworkQuantizeImpl>,
                                  public detail::SampleNetworkLayers {
 public:
  explicit SampleNetworkQuantizeImpl(const SampleNetworkQuantizeOptions& options_ = {});
  at::Tensor forward(at::Tensor x);
  void reset() override;
  SampleNetworkQuantizeOptions options;
};
TORCH_MODULE(SampleNetworkQuantize);

// A dict of tensors by name that Python wrote with
// torch.save(dict(model.state_dict()), path) (a plain dict: C++ cannot
// unpickle an OrderedDict). Throws c10::ValueError naming the path when the
// file holds anything else.
std::unordered_map<std::string, at::Tensor> read_state_dict(const std::string& path);

// Copies every parameter and buffer of `module` from `state_dict` by name,
// as Python's load_state_dict(strict=True): throws c10::ValueError naming
// the missing and unexpected keys, or a key whose shape differs.
void load_state_dict(torch::nn::Module& module, const std::unordered_map<std::string, at::Tensor>& state_dict);

}  // namespace torch_ext::models
