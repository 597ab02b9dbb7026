#include "torch_ext/quant_activation.h"

#include "torch_ext/learnable.h"

#include <torch/torch.h>

namespace torch_ext {

QuantActivationImpl::QuantActivationImpl(const QuantActivationOptions& options_) : options(options_) {
  reset();
}

void QuantActivationImpl::reset() {
  check_bit(options.bit());
  check_max_value(options.max_value());
  const std::string& mode = options.learn_max_value();
  if (!mode.empty()) {
    TORCH_CHECK_VALUE(
        mode == "pact" || mode == "lsq", "QuantActivation: learn_max_value must be \"\", \"pact\" or \"lsq\", got \"",
        mode, "\"");
    TORCH_CHECK_VALUE(
        !options.inplace(), "QuantActivation: inplace=true cannot be combined with learn_max_value=\"", mode,
        "\" (the learnable max_value has no in-place path)");
    max_value = register_parameter("max_value", torch::tensor(options.max_value(), torch::kFloat32));
  }
}

at::Tensor QuantActivationImpl::forward(at::Tensor x) {
  if (!options.learn_max_value().empty()) {
    return linear_mid_tread_half_quantize_learnable(
        x, max_value, options.bit(), options.learn_max_value(), options.learn_max_value() == "lsq");
  }
  if (options.inplace()) {
    return linear_mid_tread_half_quantize_(x, options.bit(), options.max_value());
  }
  return linear_mid_tread_half_quantize(x, options.bit(), options.max_value());
}

void QuantActivationImpl::pretty_print(std::ostream& stream) const {
  stream << "torch_ext::QuantActivation(bit=" << options.bit() << ", max_value=";
  if (max_value.defined()) {
    stream << max_value.item<double>() << ", learn_max_value=" << options.learn_max_value();
  } else {
    stream << options.max_value();
  }
  if (options.inplace()) {
    stream << ", inplace=true";
  }
  stream << ")";
}

}  // namespace torch_ext
