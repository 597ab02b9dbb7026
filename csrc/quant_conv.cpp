#include "torch_ext/quant_conv.h"

#include <torch/nn/functional/conv.h>
#include <torch/nn/functional/padding.h>

#include <c10/util/Exception.h>
#include <c10/util/overloaded.h>

#include <sstream>
#include <variant>

namespace torch_ext {

std::string weight_quantizer_name(WeightQuantizer quantizer) {
  switch (quantizer) {
    case WeightQuantizer::kNone:
      return "none";
    case WeightQuantizer::kBinaryMeanScaling:
      return "binary_mean_scaling";
    case WeightQuantizer::kBinaryChannelWiseMeanScaling:
      return "binary_channel_wise_mean_scaling";
  }
  TORCH_CHECK_VALUE(false, "weight_quantizer: unknown WeightQuantizer value ", static_cast<int>(quantizer));
}

WeightQuantizer weight_quantizer_from_name(const std::string& name) {
  for (auto q : {WeightQuantizer::kNone, WeightQuantizer::kBinaryMeanScaling,
                 WeightQuantizer::kBinaryChannelWiseMeanScaling}) {
    if (weight_quantizer_name(q) == name) {
      return q;
    }
  }
  TORCH_CHECK_VALUE(
      false, "weight_quantizer='", name,
      "' is unknown; choose one of ['binary_channel_wise_mean_scaling', 'binary_mean_scaling', 'none']");
}

at::Tensor quantize_weight(const at::Tensor& w, WeightQuantizer quantizer) {
  switch (quantizer) {
    case WeightQuantizer::kNone:
      return w;
    case WeightQuantizer::kBinaryMeanScaling:
      return binary_mean_scaling_quantize(w);
    case WeightQuantizer::kBinaryChannelWiseMeanScaling:
      return binary_channel_wise_mean_scaling_quantize(w);
  }
  TORCH_CHECK_VALUE(false, "weight_quantizer: unknown WeightQuantizer value ", static_cast<int>(quantizer));
}

namespace {

// The options torch::nn::Conv2dImpl hands its ConvNdImpl base.
torch::nn::detail::ConvNdOptions<2> conv_nd_options(const torch::nn::Conv2dOptions& o) {
  return torch::nn::detail::ConvNdOptions<2>(o.in_channels(), o.out_channels(), o.kernel_size())
      .stride(o.stride())
      .padding(o.padding())
      .dilation(o.dilation())
      .transposed(false)
      .output_padding(0)
      .groups(o.groups())
      .bias(o.bias())
      .padding_mode(o.padding_mode());
}

}  // namespace

QuantConv2dImpl::QuantConv2dImpl(const QuantConv2dOptions& options_)
    : ConvNdImpl(conv_nd_options(options_.conv())), weight_quantizer(options_.weight_quantizer()) {
  // An out-of-range enum value is refused here rather than at the first forward.
  weight_quantizer_name(weight_quantizer);
}

at::Tensor QuantConv2dImpl::quantized_weight() const {
  return quantize_weight(weight, weight_quantizer);
}

at::Tensor QuantConv2dImpl::forward(const at::Tensor& input) {
  namespace F = torch::nn::functional;
  const at::Tensor w = quantized_weight();
  if (std::holds_alternative<torch::enumtype::kZeros>(options.padding_mode())) {
    return F::detail::conv2d(input, w, bias, options.stride(), options.padding(), options.dilation(),
                             options.groups());
  }
  // Other padding modes pad explicitly, then convolve unpadded (as Conv2d).
  F::PadFuncOptions::mode_t mode = std::visit(
      c10::overloaded(
          [](torch::enumtype::kReflect) -> F::PadFuncOptions::mode_t { return torch::kReflect; },
          [](torch::enumtype::kReplicate) -> F::PadFuncOptions::mode_t { return torch::kReplicate; },
          [](torch::enumtype::kCircular) -> F::PadFuncOptions::mode_t { return torch::kCircular; },
          [](torch::enumtype::kZeros) -> F::PadFuncOptions::mode_t { return torch::kConstant; }),
      options.padding_mode());
  return F::detail::conv2d(F::pad(input, F::PadFuncOptions(_reversed_padding_repeated_twice).mode(mode)), w, bias,
                           options.stride(), /*padding=*/0, options.dilation(), options.groups());
}

void QuantConv2dImpl::pretty_print(std::ostream& stream) const {
  // Conv2d's description ("torch::nn::Conv2d(3, 32, kernel_size=...)") with
  // this module's name and its weight quantizer.
  std::ostringstream conv;
  ConvNdImpl::pretty_print(conv);
  std::string text = conv.str();
  const std::string prefix = "torch::nn::Conv2d(";
  if (text.rfind(prefix, 0) == 0) {
    text = "torch_ext::QuantConv2d(" + text.substr(prefix.size());
  }
  text.pop_back();  // the closing parenthesis
  stream << text << ", weight_quantizer=" << weight_quantizer_name(weight_quantizer) << ")";
}

}  // namespace torch_ext
