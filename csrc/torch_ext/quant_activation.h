// torch_ext::QuantActivation: the LibTorch module of the quantizer, the C++
// twin of the Python torch_ext.QuantActivation.
#pragma once

#include "torch_ext/torch_ext.h"

#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <ostream>
#include <string>

namespace torch_ext {

struct QuantActivationOptions {
  QuantActivationOptions() = default;
  QuantActivationOptions(int64_t bit, double max_value) : bit_(bit), max_value_(max_value) {}

  // Bits of the activation code: 1..16, or 32 for clip only.
  TORCH_ARG(int64_t, bit) = 2;
  // The clip ceiling m; finite and > 0.
  TORCH_ARG(double, max_value) = 2.0;
  // Overwrite the input, like torch::nn::ReLU's inplace option.
  TORCH_ARG(bool, inplace) = false;
  // "" (max_value fixed), "pact" or "lsq": learn max_value (docs/quantizer.md,
  // "Learnable max_value"); it is then the module's parameter "max_value",
  // a 0-dim float32 tensor. Not with inplace.
  TORCH_ARG(std::string, learn_max_value) = "";
};

// y = linear_mid_tread_half_quantize(x, bit, max_value) (docs/quantizer.md). The options
// are checked when the module is built, so a bad bit or max_value fails at
// construction rather than at the first forward.
class QuantActivationImpl : public torch::nn::Cloneable<QuantActivationImpl> {
 public:
  explicit QuantActivationImpl(const QuantActivationOptions& options_ = {});

  at::Tensor forward(at::Tensor x);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  QuantActivationOptions options;
  // The learned max_value (learn_max_value "pact" or "lsq"); undefined otherwise.
  at::Tensor max_value;
};

TORCH_MODULE(QuantActivation);

}  // namespace torch_ext
