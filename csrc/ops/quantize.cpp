// The fixed quantizer family (csrc/torch_ext/torch_ext.h): linear_mid_tread_half_quantize,
// its in-place form, and the forward / backward kernel ops they are made of.
// Here: the schemas, the argument checks of docs/quantizer.md, the C++ entry
// points that call through the dispatcher, and the autograd. The kernels are
// csrc/cpu/quantize_kernel.cpp and cuda/quantize_kernel.cu.
//
// Autograd (torchvision's csrc/ops/autograd pattern): the forward calls the
// kernel ops through the dispatcher below autograd, and the backward is a
// registered op of its own, so every device shares it. Only the 1-bit packed
// mask `0 < x < m` is saved for backward: 1/8 byte an element, never a copy
// of x. The mask follows the memory order of the dense tensor the kernel ran
// on (x itself when dense), so the strides of that layout are saved with it,
// as non-tensor data (SymInts, so that tracing with dynamic shapes records
// them too).
#include "ops/find_op.h"
#include "torch_ext/layouts.h"
#include "torch_ext/torch_ext.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

TORCH_LIBRARY_FRAGMENT(torch_ext, m) {
  m.def("linear_mid_tread_half_quantize(Tensor x, int bit, float max_value) -> Tensor");
  // Returns nothing: torch.compile functionalizes custom ops with mutated
  // arguments but not with outputs that alias them (the C++ and Python entry
  // points return x themselves).
  m.def("linear_mid_tread_half_quantize_(Tensor(a!) x, int bit, float max_value) -> ()");
  m.def(
      "linear_mid_tread_half_quantize_forward(Tensor x, int bit, float max_value) "
      "-> (Tensor y, Tensor mask)");
  m.def("linear_mid_tread_half_quantize_forward_(Tensor(a!) x, int bit, float max_value) -> Tensor mask");
  // x_strides: the strides of the dense layout whose memory order the mask
  // follows (y's, from the forward); None: row-major (docs/quantizer.md).
  m.def("linear_mid_tread_half_quantize_backward(Tensor grad_y, Tensor mask, SymInt[]? x_strides=None) -> Tensor");
}

namespace torch_ext {

// ---------------------------------------------------------------------------
// Argument checks (the fake kernels of torch_ext/ops/quantize.py call them too,
// through csrc/python_module.cpp, so tracing refuses what the kernels refuse).

void check_bit(int64_t bit) {
  TORCH_CHECK_VALUE(
      (bit >= 1 && bit <= 16) || bit == 32,
      "linear_mid_tread_half_quantize: bit must be in 1..16 or 32, got bit=", bit);
}

void check_max_value(double max_value, const char* op) {
  TORCH_CHECK_VALUE(
      std::isfinite(max_value) && max_value > 0.0, op, ": max_value must be finite and > 0, got max_value=", max_value);
}

void check_max_value(double max_value, at::ScalarType dtype, const char* op) {
  check_max_value(max_value, op);
  if (dtype == at::kDouble) {
    return;  // the compute type is float64 itself: every finite max_value > 0 is exact
  }
  // The compute type is float32 (docs/quantizer.md: m = T(max_value)). Decided
  // on the double itself, with no out-of-range conversion: float32 rounds to
  // nearest even, so max_value rounds to 0 up to and including half the
  // smallest subnormal (2^-150), and to infinity from half an ulp above
  // FLT_MAX (2^128 - 2^103) on.
  constexpr double kRoundsToZero = 0x1p-150;
  constexpr double kRoundsToInf = 0x1.ffffffp+127;
  TORCH_CHECK_VALUE(
      max_value > kRoundsToZero && max_value < kRoundsToInf, op, ": max_value=", max_value, " rounds to ",
      max_value <= kRoundsToZero ? "0" : "infinity", " in float32, the compute type of x of dtype ", dtype,
      " (max_value must round to a finite float32 > 0: from about 1.4e-45 to 3.4028235e+38)");
}

void check_quantize_arguments(at::ScalarType dtype, int64_t bit, double max_value) {
  check_bit(bit);
  check_max_value(max_value);
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "linear_mid_tread_half_quantize: x must be a floating-point tensor "
      "(float16, bfloat16, float32 or float64), got x of dtype ", dtype);
  check_max_value(max_value, dtype);
}

void check_backward_arguments(const at::Tensor& grad_y, const at::Tensor& mask) {
  // Sizes are read as SymInts, so that the fake kernel (torch_ext/ops/quantize.py)
  // can run this very check while tracing with dynamic shapes.
  const auto dtype = grad_y.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "linear_mid_tread_half_quantize_backward: grad_y must be a floating-point tensor "
      "(float16, bfloat16, float32 or float64), got grad_y of dtype ", dtype);
  TORCH_CHECK_TYPE(
      mask.scalar_type() == at::kByte,
      "linear_mid_tread_half_quantize_backward: mask must be a uint8 tensor, got mask of dtype ",
      mask.scalar_type());
  const c10::SymInt numel = grad_y.sym_numel();
  const c10::SymInt bytes = (numel + 7) / 8;  // mask_numel
  TORCH_CHECK_VALUE(
      mask.dim() == 1 && mask.sym_numel().sym_eq(bytes).expect_true(__FILE__, __LINE__),
      "linear_mid_tread_half_quantize_backward: mask must have shape [", bytes,
      "] (8 elements of grad_y of ", numel, " elements a byte), got mask of shape ", mask.sym_sizes());
  TORCH_CHECK_VALUE(
      mask.device() == grad_y.device(),
      "linear_mid_tread_half_quantize_backward: mask and grad_y must be on the same device, got mask on ",
      mask.device(), " and grad_y on ", grad_y.device());
}

namespace {

// Whether x_strides describe a dense layout of `sizes`: sorted, the strides
// are the running products of the sizes (dims of size 1 excepted), the test
// of TensorImpl::is_non_overlapping_and_dense, made without allocating.
bool is_dense_layout(at::IntArrayRef sizes, at::IntArrayRef x_strides) {
  std::vector<int64_t> perm(x_strides.size());
  for (size_t d = 0; d < perm.size(); ++d) {
    perm[d] = static_cast<int64_t>(d);
  }
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
    return x_strides[a] < x_strides[b];
  });
  int64_t expected = 1;
  for (int64_t d : perm) {
    const int64_t size = sizes[d];
    if (size == 1) {
      continue;
    }
    if (x_strides[d] != expected) {
      return false;
    }
    expected *= size;
  }
  return true;
}

}  // namespace

void check_backward_strides(const at::Tensor& grad_y, at::IntArrayRef x_strides) {
  TORCH_CHECK_VALUE(
      static_cast<int64_t>(x_strides.size()) == grad_y.dim(),
      "linear_mid_tread_half_quantize_backward: x_strides must have one stride a dim of grad_y (", grad_y.dim(),
      "), got x_strides=", x_strides);
  // An empty grad_y has every layout.
  const bool dense = grad_y.numel() == 0 || is_dense_layout(grad_y.sizes(), x_strides);
  TORCH_CHECK_VALUE(
      dense, "linear_mid_tread_half_quantize_backward: x_strides=", x_strides,
      " is not a dense layout of grad_y's sizes ", grad_y.sizes(),
      " (pass the strides of the y the forward returned)");
}

void check_inplace_allowed(const at::Tensor& x) {
  // Checked here, above the kernels: below autograd, InferenceMode::is_enabled()
  // is true whatever the user's mode, so the kernels cannot tell.
  layouts::check_inference_tensor_writable(x);
  // ATen's own check, as every in-place ATen op makes it (leaves, views of
  // leaves, views that cannot be rebased).
  torch::autograd::check_inplace(x, at::GradMode::is_enabled() && x.requires_grad());
}

// ---------------------------------------------------------------------------
// C++ entry points: each calls its operator through the dispatcher.

using ops::find_op;

at::Tensor linear_mid_tread_half_quantize(const at::Tensor& x, int64_t bit, double max_value) {
  static auto op = find_op("torch_ext::linear_mid_tread_half_quantize")
                       .typed<at::Tensor(const at::Tensor&, int64_t, double)>();
  return op.call(x, bit, max_value);
}

at::Tensor& linear_mid_tread_half_quantize_(at::Tensor& x, int64_t bit, double max_value) {
  static auto op = find_op("torch_ext::linear_mid_tread_half_quantize_")
                       .typed<void(at::Tensor&, int64_t, double)>();
  op.call(x, bit, max_value);
  return x;
}

std::tuple<at::Tensor, at::Tensor> linear_mid_tread_half_quantize_forward(
    const at::Tensor& x, int64_t bit, double max_value) {
  static auto op = find_op("torch_ext::linear_mid_tread_half_quantize_forward")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, double)>();
  return op.call(x, bit, max_value);
}

at::Tensor linear_mid_tread_half_quantize_forward_(at::Tensor& x, int64_t bit, double max_value) {
  static auto op = find_op("torch_ext::linear_mid_tread_half_quantize_forward_")
                       .typed<at::Tensor(at::Tensor&, int64_t, double)>();
  return op.call(x, bit, max_value);
}

namespace {

// The three backward entry points share one typed handle.
auto backward_op() {
  static auto op = find_op("torch_ext::linear_mid_tread_half_quantize_backward")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::OptionalSymIntArrayRef)>();
  return op;
}

}  // namespace

at::Tensor linear_mid_tread_half_quantize_backward(const at::Tensor& grad_y, const at::Tensor& mask) {
  return backward_op().call(grad_y, mask, std::nullopt);
}

at::Tensor linear_mid_tread_half_quantize_backward(
    const at::Tensor& grad_y, const at::Tensor& mask, at::IntArrayRef x_strides) {
  return backward_op().call(grad_y, mask, c10::fromIntArrayRefSlow(x_strides));
}

at::Tensor linear_mid_tread_half_quantize_backward_symint(
    const at::Tensor& grad_y, const at::Tensor& mask, c10::SymIntArrayRef x_strides) {
  return backward_op().call(grad_y, mask, x_strides);
}

// The library's one question about its build; the fixed quantizer is the
// operator every CUDA build has a kernel of.
bool built_with_cuda() {
  return find_op("torch_ext::linear_mid_tread_half_quantize")
      .hasKernelForDispatchKey(c10::DispatchKey::CUDA);
}

// ---------------------------------------------------------------------------
// Autograd.

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
