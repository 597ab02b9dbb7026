// The learnable max_value family (csrc/torch_ext/learnable.h):
// linear_mid_tread_half_quantize_learnable and the forward / backward kernel
// ops it is made of. Here: the schemas, the argument checks, the C++ entry
// points and the autograd. The kernels are csrc/cpu/learnable_kernel.cpp and
// cuda/learnable_kernel.cu.
//
// Autograd: the forward calls the kernel ops below autograd, the backward is
// the registered backward op (grad_x and grad_max_value in one pass), so
// every device shares it. Saved for backward, besides the 0-dim max_value:
//   pact: two packed masks (0 < x < m, x >= m): 2 bits, 1/4 byte an element;
//   lsq:  x itself (its element size: 4 bytes an element for float32), from
//         which the backward recomputes y with the forward's own formula.
#include "ops/find_op.h"
#include "torch_ext/learnable.h"
#include "torch_ext/torch_ext.h"

#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>

// m is a 0-dim tensor on x's device.
TORCH_LIBRARY_FRAGMENT(torch_ext, m) {
  m.def(
      "linear_mid_tread_half_quantize_learnable(Tensor x, Tensor max_value, int bit=2, str mode=\"pact\", "
      "bool scale_grad=False) -> Tensor");
  m.def(
      "linear_mid_tread_half_quantize_learnable_forward(Tensor x, Tensor max_value, int bit) "
      "-> (Tensor y, Tensor masks)");
  m.def(
      "linear_mid_tread_half_quantize_learnable_backward(Tensor grad_y, Tensor saved, Tensor max_value, int bit, "
      "str mode, bool scale_grad) -> (Tensor grad_x, Tensor grad_max_value)");
}

namespace torch_ext {

// ---------------------------------------------------------------------------
// Argument checks (torch_ext/ops/learnable.py repeats them in Python for tracing).

namespace {

bool is_floating(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_learnable_max_value(const at::Tensor& max_value, const at::Tensor& like, const char* op, const char* like_name) {
  TORCH_CHECK_VALUE(
      max_value.dim() == 0, op, ": max_value must be a 0-dim tensor, got max_value of shape ", max_value.sym_sizes());
  TORCH_CHECK_TYPE(
      is_floating(max_value.scalar_type()), op,
      ": max_value must be a floating-point tensor (float16, bfloat16, float32 or float64), got max_value of dtype ",
      max_value.scalar_type());
  TORCH_CHECK_VALUE(
      max_value.device() == like.device(), op, ": max_value must be on the device of ", like_name,
      " (no host-device copy is made), got max_value on ", max_value.device(), " and ", like_name, " on ",
      like.device());
}

void check_mode(const std::string& mode, const char* op) {
  TORCH_CHECK_VALUE(mode == "pact" || mode == "lsq", op, ": mode must be \"pact\" or \"lsq\", got mode=\"", mode, "\"");
}

// What the backward saved: the two masks (pact) or x itself (lsq).
void check_saved(const at::Tensor& grad_y, const at::Tensor& saved, const std::string& mode, const char* op) {
  TORCH_CHECK_VALUE(
      saved.device() == grad_y.device(), op, ": saved and grad_y must be on the same device, got saved on ",
      saved.device(), " and grad_y on ", grad_y.device());
  const c10::SymInt numel = grad_y.sym_numel();
  if (mode == "pact") {
    const c10::SymInt bytes = (numel + 7) / 8;
    TORCH_CHECK_TYPE(
        saved.scalar_type() == at::kByte, op, ": saved must be the uint8 masks in pact mode, got saved of dtype ",
        saved.scalar_type());
    TORCH_CHECK_VALUE(
        saved.dim() == 2 && saved.sym_size(0).sym_eq(2).expect_true(__FILE__, __LINE__) &&
            saved.sym_size(1).sym_eq(bytes).expect_true(__FILE__, __LINE__),
        op, ": saved must have shape [2, ", bytes, "] in pact mode (two masks of grad_y's ", numel,
        " elements, 8 a byte), got saved of shape ", saved.sym_sizes());
  } else {
    TORCH_CHECK_TYPE(
        saved.scalar_type() == grad_y.scalar_type(), op, ": saved must be x (of grad_y's dtype ",
        grad_y.scalar_type(), ") in lsq mode, got saved of dtype ", saved.scalar_type());
    TORCH_CHECK_VALUE(
        saved.sym_sizes().equals(grad_y.sym_sizes()), op, ": saved must be x (of grad_y's shape ",
        grad_y.sym_sizes(), ") in lsq mode, got saved of shape ", saved.sym_sizes());
  }
}

// What the forward and the backward both check: bit, mode, the floating
// tensor t (x or grad_y) and max_value beside it.
void check_common(const char* op, int64_t bit, const std::string& mode, const at::Tensor& t, const char* name,
                  const at::Tensor& max_value) {
  TORCH_CHECK_VALUE(
      (bit >= 1 && bit <= 16) || bit == 32, op, ": bit must be in 1..16 or 32, got bit=", bit);
  check_mode(mode, op);
  TORCH_CHECK_TYPE(
      is_floating(t.scalar_type()), op, ": ", name,
      " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ", name, " of dtype ",
      t.scalar_type());
  check_learnable_max_value(max_value, t, op, name);
}

}  // namespace

void check_learnable_arguments(const at::Tensor& x, const at::Tensor& max_value, int64_t bit, const std::string& mode) {
  check_common("linear_mid_tread_half_quantize_learnable", bit, mode, x, "x", max_value);
}

void check_learnable_backward_arguments(
    const at::Tensor& grad_y, const at::Tensor& saved, const at::Tensor& max_value, int64_t bit,
    const std::string& mode) {
  constexpr const char* op = "linear_mid_tread_half_quantize_learnable_backward";
  check_common(op, bit, mode, grad_y, "grad_y", max_value);
  check_saved(grad_y, saved, mode, op);
}

// ---------------------------------------------------------------------------
// C++ entry points: each calls its operator through the dispatcher.

using ops::find_op;

at::Tensor linear_mid_tread_half_quantize_learnable(
    const at::Tensor& x, const at::Tensor& max_value, int64_t bit, const std::string& mode, bool scale_grad) {
  static auto op = find_op("torch_ext::linear_mid_tread_half_quantize_learnable")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, c10::string_view, bool)>();
  return op.call(x, max_value, bit, mode, scale_grad);
}

std::tuple<at::Tensor, at::Tensor> linear_mid_tread_half_quantize_learnable_forward(
    const at::Tensor& x, const at::Tensor& max_value, int64_t bit) {
  static auto op = find_op("torch_ext::linear_mid_tread_half_quantize_learnable_forward")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(x, max_value, bit);
}

std::tuple<at::Tensor, at::Tensor> linear_mid_tread_half_quantize_learnable_backward(
    const at::Tensor& grad_y, const at::Tensor& saved, const at::Tensor& max_value, int64_t bit,
    const std::string& mode, bool scale_grad) {
  static auto op =
      find_op("torch_ext::linear_mid_tread_half_quantize_learnable_backward")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, c10::string_view, bool)>();
  return op.call(grad_y, saved, max_value, bit, mode, scale_grad);
}

// ---------------------------------------------------------------------------
// Autograd.

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
  // The kernel ops are not differentiable themselves.
  m.impl("linear_mid_tread_half_quantize_learnable_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("linear_mid_tread_half_quantize_learnable_backward", torch::autograd::autogradNotImplementedFallback());
}
