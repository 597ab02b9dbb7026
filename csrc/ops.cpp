// The operator schemas (the one TORCH_LIBRARY of the project), the argument
// checks of docs/quantizer.md, and the C++ entry points that call through the dispatcher.
#include "torch_ext/torch_ext.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

namespace torch_ext {

void check_bit(int64_t bit) {
  TORCH_CHECK_VALUE(
      (bit >= 1 && bit <= 16) || bit == 32,
      "linear_mid_tread_half_quantize: bit must be in 1..16 or 32, got bit=", bit);
}

void check_max_value(double max_value) {
  TORCH_CHECK_VALUE(
      std::isfinite(max_value) && max_value > 0.0,
      "linear_mid_tread_half_quantize: max_value must be finite and > 0, got max_value=", max_value);
}

void check_max_value(double max_value, at::ScalarType dtype) {
  check_max_value(max_value);
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
      max_value > kRoundsToZero && max_value < kRoundsToInf,
      "linear_mid_tread_half_quantize: max_value=", max_value, " rounds to ",
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
  // Sizes are read as SymInts, so that the fake kernel (torch_ext/_meta.py)
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

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

}  // namespace

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

at::Tensor linear_mid_tread_half_quantize_backward(const at::Tensor& grad_y, const at::Tensor& mask) {
  static auto op = find_op("torch_ext::linear_mid_tread_half_quantize_backward")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_y, mask);
}

bool built_with_cuda() {
  return find_op("torch_ext::linear_mid_tread_half_quantize")
      .hasKernelForDispatchKey(c10::DispatchKey::CUDA);
}

}  // namespace torch_ext

TORCH_LIBRARY(torch_ext, m) {
  m.def("linear_mid_tread_half_quantize(Tensor x, int bit, float max_value) -> Tensor");
  // Returns nothing: torch.compile functionalizes custom ops with mutated
  // arguments but not with outputs that alias them (the C++ and Python entry
  // points return x themselves).
  m.def("linear_mid_tread_half_quantize_(Tensor(a!) x, int bit, float max_value) -> ()");
  m.def(
      "linear_mid_tread_half_quantize_forward(Tensor x, int bit, float max_value) "
      "-> (Tensor y, Tensor mask)");
  m.def("linear_mid_tread_half_quantize_forward_(Tensor(a!) x, int bit, float max_value) -> Tensor mask");
  m.def("linear_mid_tread_half_quantize_backward(Tensor grad_y, Tensor mask) -> Tensor");

  // ---- Blueoil's binary weight quantizers (issue 16): kernels, C++ entry
  // points and straight-through autograd in csrc/weight_quantization.cpp,
  // fake kernels in torch_ext/_meta.py, contract in docs/quantizer.md.
  m.def("binary_mean_scaling_quantize(Tensor w) -> Tensor");
  m.def("binary_channel_wise_mean_scaling_quantize(Tensor w) -> Tensor");
}
