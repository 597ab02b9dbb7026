// torch_ext::QuantConv2d: a torch::nn::Conv2d that convolves with a quantized
// weight, the C++ twin of the Python torch_ext.QuantConv2d. The float weight
// stays the trained parameter ("weight", and "bias" when enabled, as in
// Python); every forward convolves with weight_quantizer(weight), whose
// straight-through gradient reaches the float weight unchanged.
#pragma once

#include "torch_ext/weight_quantization.h"

#include <torch/nn/modules/conv.h>
#include <torch/nn/options/conv.h>
#include <torch/nn/pimpl.h>

#include <ostream>
#include <string>

namespace torch_ext {

// Blueoil's weight quantizers by the names torch_ext.models.WEIGHT_QUANTIZERS
// gives them in Python; kNone is a plain float convolution.
enum class WeightQuantizer { kNone, kBinaryMeanScaling, kBinaryChannelWiseMeanScaling };

// "none", "binary_mean_scaling", "binary_channel_wise_mean_scaling".
std::string weight_quantizer_name(WeightQuantizer quantizer);
// The inverse; throws c10::ValueError naming the unknown name.
WeightQuantizer weight_quantizer_from_name(const std::string& name);
// w quantized by `quantizer` (w itself for kNone).
at::Tensor quantize_weight(const at::Tensor& w, WeightQuantizer quantizer);

// torch::nn::Conv2dOptions plus the weight quantizer. The setters chain as
// Conv2dOptions' do: QuantConv2dOptions(3, 32, 3).padding(1).bias(false).
struct QuantConv2dOptions {
  QuantConv2dOptions(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<2> kernel_size)
      : conv_(in_channels, out_channels, kernel_size) {}

#define TORCH_EXT_CONV_ARG(type, name)          \
  QuantConv2dOptions& name(const type& value) { \
    conv_.name(value);                          \
    return *this;                               \
  }                                             \
  const type& name() const noexcept {           \
    return conv_.name();                        \
  }
  TORCH_EXT_CONV_ARG(int64_t, in_channels)
  TORCH_EXT_CONV_ARG(int64_t, out_channels)
  TORCH_EXT_CONV_ARG(torch::ExpandingArray<2>, kernel_size)
  TORCH_EXT_CONV_ARG(torch::ExpandingArray<2>, stride)
  TORCH_EXT_CONV_ARG(torch::nn::Conv2dOptions::padding_t, padding)
  TORCH_EXT_CONV_ARG(torch::ExpandingArray<2>, dilation)
  TORCH_EXT_CONV_ARG(int64_t, groups)
  TORCH_EXT_CONV_ARG(bool, bias)
  TORCH_EXT_CONV_ARG(torch::nn::Conv2dOptions::padding_mode_t, padding_mode)
#undef TORCH_EXT_CONV_ARG

  // The plain convolution's options.
  const torch::nn::Conv2dOptions& conv() const noexcept {
    return conv_;
  }

  // Python's default: binary mean scaling.
  TORCH_ARG(WeightQuantizer, weight_quantizer) = WeightQuantizer::kBinaryMeanScaling;

 private:
  torch::nn::Conv2dOptions conv_;
};

// forward(x) = conv2d(x, quantize_weight(weight, weight_quantizer), bias), with
// Conv2d's padding and padding modes. Built on ConvNdImpl, as
// torch::nn::Conv2dImpl is, so the parameters, their initialisation
// (kaiming_uniform, as Conv2d) and clone() are Conv2d's.
class QuantConv2dImpl : public torch::nn::ConvNdImpl<2, QuantConv2dImpl> {
 public:
  QuantConv2dImpl(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<2> kernel_size)
      : QuantConv2dImpl(QuantConv2dOptions(in_channels, out_channels, kernel_size)) {}
  explicit QuantConv2dImpl(const QuantConv2dOptions& options_);

  at::Tensor forward(const at::Tensor& input);
  // The weight this layer convolves with (differentiable w.r.t. weight).
  at::Tensor quantized_weight() const;
  void pretty_print(std::ostream& stream) const override;

  WeightQuantizer weight_quantizer;
};

TORCH_MODULE(QuantConv2d);

}  // namespace torch_ext
