// The C++ autograd Function of linear_mid_tread_half_quantize_learnable,
// registered under the Autograd key: the forward calls the kernel ops below
// autograd, the backward is the registered backward op (grad_x and
// grad_max_value in one pass), so every device shares this file.
//
// Saved for backward, besides the 0-dim max_value itself:
//   pact: two packed masks (0 < x < m, x >= m): 2 bits, 1/4 byte an element;
//   lsq:  x itself (its element size: 4 bytes an element for float32), from
//         which the backward recomputes y with the forward's own formula.
#include "torch_ext/learnable.h"
#include "torch_ext/torch_ext.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace torch_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LinearMidTreadHalfQuantizeLearnable
    : public torch::autograd::Function<LinearMidTreadHalfQuantizeLearnable> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& x, const at::Tensor& max_value, int64_t bit, const std::string& mode,
      bool scale_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["bit"] = bit;
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["scale_grad"] = scale_grad;
    if (mode == "pact") {
      auto [y, masks] = linear_mid_tread_half_quantize_learnable_forward(x, max_value, bit);
      ctx->save_for_backward({masks, max_value});
      return {y};
    }
    at::Tensor y = linear_mid_tread_half_quantize_learnable(x, max_value, bit, mode, scale_grad);
    ctx->save_for_backward({x, max_value});
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const auto saved = ctx->get_saved_variables();
    auto [grad_x, grad_m] = linear_mid_tread_half_quantize_learnable_backward(
        grad_y, saved[0], saved[1], ctx->saved_data["bit"].toInt(), ctx->saved_data["mode"].toStringRef(),
        ctx->saved_data["scale_grad"].toBool());
    return {grad_x, grad_m, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor learnable_autograd(
    const at::Tensor& x, const at::Tensor& max_value, int64_t bit, c10::string_view mode_view, bool scale_grad) {
  const std::string mode(mode_view);
  check_learnable_arguments(x, max_value, bit, mode);
  const bool grad = at::GradMode::is_enabled() && (x.requires_grad() || max_value.requires_grad());
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_mid_tread_half_quantize_learnable(x, max_value, bit, mode, scale_grad);
  }
  return LinearMidTreadHalfQuantizeLearnable::apply(x, max_value, bit, mode, scale_grad)[0];
}

}  // namespace
}  // namespace torch_ext

TORCH_LIBRARY_IMPL(torch_ext, Autograd, m) {
  m.impl("linear_mid_tread_half_quantize_learnable", &torch_ext::learnable_autograd);
  m.impl("linear_mid_tread_half_quantize_learnable_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("linear_mid_tread_half_quantize_learnable_backward", torch::autograd::autogradNotImplementedFallback());
}
