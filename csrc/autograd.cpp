// The C++ autograd Functions of the differentiable operators, registered
// under the Autograd key (torchvision's csrc/ops/autograd pattern): the
// forward calls the kernel ops through the dispatcher below autograd, and the
// backward is a registered op of its own, so every device shares this file.
//
// Only the 1-bit packed mask `0 < x < m` is saved for backward: 1/8 byte an
// element, never a copy of x. The mask follows the memory order of the dense
// tensor the kernel ran on (x itself when dense), so the strides of that
// layout are saved with it, as non-tensor data (SymInts, so that tracing
// with dynamic shapes records them too).
#include "torch_ext/layouts.h"
#include "torch_ext/torch_ext.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace torch_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

variable_list quantize_backward(AutogradContext* ctx, const variable_list& grad_outputs) {
  const at::Tensor& grad_y = grad_outputs[0];
  if (!grad_y.defined()) {
    return {at::Tensor(), at::Tensor(), at::Tensor()};
  }
  const auto saved = ctx->get_saved_variables();
  const std::vector<c10::SymInt> x_strides = ctx->saved_data.at("x_strides").toSymIntVector();
  return {linear_mid_tread_half_quantize_backward_symint(grad_y, saved[0], x_strides), at::Tensor(), at::Tensor()};
}

class LinearMidTreadHalfQuantize : public torch::autograd::Function<LinearMidTreadHalfQuantize> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t bit, double max_value) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mask] = linear_mid_tread_half_quantize_forward(x, bit, max_value);
    ctx->save_for_backward({mask});
    // The mask is in y's memory order (x's layout when x is dense).
    ctx->saved_data["x_strides"] = c10::IValue(y.sym_strides());
    return {y};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return quantize_backward(ctx, grad_outputs);
  }
};

class LinearMidTreadHalfQuantizeInplace
    : public torch::autograd::Function<LinearMidTreadHalfQuantizeInplace> {
 public:
  static variable_list forward(AutogradContext* ctx, at::Tensor x, int64_t bit, double max_value) {
    // mark_dirty bumps x's version and rebases its history onto this node,
    // as for torch.relu_.
    ctx->mark_dirty({x});
    ctx->saved_data["x_strides"] = c10::IValue(c10::SymIntArrayRef(layouts::inplace_mask_strides(x)));
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor mask = linear_mid_tread_half_quantize_forward_(x, bit, max_value);
    ctx->save_for_backward({mask});
    return {x};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return quantize_backward(ctx, grad_outputs);
  }
};

}  // namespace

void check_inplace_allowed(const at::Tensor& x) {
  // Checked here, above the kernels: below autograd, InferenceMode::is_enabled()
  // is true whatever the user's mode, so the kernels cannot tell.
  layouts::check_inference_tensor_writable(x);
  // ATen's own check, as every in-place ATen op makes it (leaves, views of
  // leaves, views that cannot be rebased).
  torch::autograd::check_inplace(x, at::GradMode::is_enabled() && x.requires_grad());
}

namespace {

bool needs_grad(const at::Tensor& x) {
  return at::GradMode::is_enabled() && x.requires_grad();
}

at::Tensor quantize_autograd(const at::Tensor& x, int64_t bit, double max_value) {
  check_quantize_arguments(x.scalar_type(), bit, max_value);
  if (!needs_grad(x)) {
    // No graph to record: the kernel that writes no mask is enough.
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_mid_tread_half_quantize(x, bit, max_value);
  }
  return LinearMidTreadHalfQuantize::apply(x, bit, max_value)[0];
}

void quantize_autograd_(at::Tensor& x, int64_t bit, double max_value) {
  check_quantize_arguments(x.scalar_type(), bit, max_value);
  // Refuse before any work, so x is never left half-written (autograd itself
  // would only notice after the forward has overwritten x).
  check_inplace_allowed(x);
  if (!needs_grad(x)) {
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      linear_mid_tread_half_quantize_(x, bit, max_value);
    }
    // Skipping the ADInplaceOrView key skipped the version bump that lets
    // autograd detect that a tensor saved for backward was modified.
    torch::autograd::impl::bump_version(x);
    return;
  }
  LinearMidTreadHalfQuantizeInplace::apply(x, bit, max_value);
}

// The in-place kernel op is not differentiable (linear_mid_tread_half_quantize_
// is its differentiable form); it still refuses what any in-place op refuses
// and bumps x's version.
at::Tensor forward_autograd_(at::Tensor& x, int64_t bit, double max_value) {
  check_quantize_arguments(x.scalar_type(), bit, max_value);
  check_inplace_allowed(x);
  TORCH_CHECK(
      !needs_grad(x),
      "linear_mid_tread_half_quantize_forward_ is not differentiable: use linear_mid_tread_half_quantize_, "
      "which saves this mask for its backward");
  at::Tensor mask;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    mask = linear_mid_tread_half_quantize_forward_(x, bit, max_value);
  }
  torch::autograd::impl::bump_version(x);
  return mask;
}

}  // namespace
}  // namespace torch_ext

TORCH_LIBRARY_IMPL(torch_ext, Autograd, m) {
  m.impl("linear_mid_tread_half_quantize", &torch_ext::quantize_autograd);
  m.impl("linear_mid_tread_half_quantize_", &torch_ext::quantize_autograd_);
  // The kernel ops are not differentiable themselves (their gradient is what
  // the Functions above compute): refuse to record them in a graph.
  m.impl("linear_mid_tread_half_quantize_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("linear_mid_tread_half_quantize_forward_", &torch_ext::forward_autograd_);
  m.impl("linear_mid_tread_half_quantize_backward", torch::autograd::autogradNotImplementedFallback());
}

