#include "torch_ext/quant_activation.h"

namespace torch_ext {

QuantActivationImpl::QuantActivationImpl(const QuantActivationOptions& options_) : options(options_) {
  reset();
}

void QuantActivationImpl::reset() {
  check_bit(options.bit());
  check_max_value(options.max_value());
}

at::Tensor QuantActivationImpl::forward(at::Tensor x) {
  if (options.inplace()) {
    return linear_mid_tread_half_quantize_(x, options.bit(), options.max_value());
  }
  return linear_mid_tread_half_quantize(x, options.bit(), options.max_value());
}

void QuantActivationImpl::pretty_print(std::ostream& stream) const {
  stream << "torch_ext::QuantActivation(bit=" << options.bit() << ", max_value=" << options.max_value();
  if (options.inplace()) {
    stream << ", inplace=true";
  }
  stream << ")";
}

}  // namespace torch_ext
