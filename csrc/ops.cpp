// The operator schemas (the one TORCH_LIBRARY of the project), the argument
// checks of docs/quantizer.md, and the C++ entry points that call through the dispatcher.
#include "torch_ext/torch_ext.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

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

void check_backward_strides(const at::Tensor& grad_y, at::IntArrayRef x_strides) {
  TORCH_CHECK_VALUE(
      static_cast<int64_t>(x_strides.size()) == grad_y.dim(),
      "linear_mid_tread_half_quantize_backward: x_strides must have one stride a dim of grad_y (", grad_y.dim(),
      "), got x_strides=", x_strides);
  bool dense = true;
  if (grad_y.numel() > 0) {
    // The layout is dense when its strides, sorted, are the running products
    // of the sizes (dims of size 1 excepted): the test of
    // TensorImpl::is_non_overlapping_and_dense, made without allocating.
    std::vector<int64_t> perm(x_strides.size());
    for (size_t d = 0; d < perm.size(); ++d) {
      perm[d] = static_cast<int64_t>(d);
    }
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
      return x_strides[a] < x_strides[b];
    });
    int64_t expected = 1;
    for (int64_t d : perm) {
      const int64_t size = grad_y.size(d);
      if (size == 1) {
        continue;
      }
      if (x_strides[d] != expected) {
        dense = false;
        break;
      }
      expected *= size;
    }
  }
  TORCH_CHECK_VALUE(
      dense, "linear_mid_tread_half_quantize_backward: x_strides=", x_strides,
      " is not a dense layout of grad_y's sizes ", grad_y.sizes(),
      " (pass the strides of the y the forward returned)");
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

namespace {

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
  // x_strides: the strides of the dense layout whose memory order the mask
  // follows (y's, from the forward); None: row-major (docs/quantizer.md).
  m.def("linear_mid_tread_half_quantize_backward(Tensor grad_y, Tensor mask, SymInt[]? x_strides=None) -> Tensor");

  // Bit-packed low-bit inference (csrc/torch_ext/packed.h, docs/deploy.md).
  m.def("pack_codes(Tensor codes, int bit) -> Tensor");
  m.def("quantize_pack_codes(Tensor x, int bit, float max_value) -> Tensor");
  m.def("unpack_codes(Tensor packed, int channels) -> Tensor");
  m.def("pack_binary_weights(Tensor weight) -> Tensor");
  m.def("packed_space_to_depth(Tensor packed, int channels, int block) -> Tensor");
  m.def("packed_conv2d(Tensor x, Tensor w, int in_channels, int[2] stride, int[2] padding) -> Tensor");
  m.def(
      "packed_conv2d_affine(Tensor x, Tensor w, int in_channels, int[2] stride, int[2] padding, "
      "Tensor scale, Tensor bias) -> Tensor");
  m.def(
      "packed_conv2d_threshold(Tensor x, Tensor w, int in_channels, int[2] stride, int[2] padding, "
      "Tensor thresholds, Tensor direction, int out_bit) -> Tensor");

  // Learnable max_value (csrc/torch_ext/learnable.h): m is a 0-dim tensor on x's device.
  m.def(
      "linear_mid_tread_half_quantize_learnable(Tensor x, Tensor max_value, int bit=2, str mode=\"pact\", "
      "bool scale_grad=False) -> Tensor");
  m.def(
      "linear_mid_tread_half_quantize_learnable_forward(Tensor x, Tensor max_value, int bit) "
      "-> (Tensor y, Tensor masks)");
  m.def(
      "linear_mid_tread_half_quantize_learnable_backward(Tensor grad_y, Tensor saved, Tensor max_value, int bit, "
      "str mode, bool scale_grad) -> (Tensor grad_x, Tensor grad_max_value)");

  // ---- Blueoil's binary weight quantizers: kernels, C++ entry
  // points and straight-through autograd in csrc/weight_quantization.cpp,
  // fake kernels in torch_ext/_meta.py, contract in docs/quantizer.md.
  m.def("binary_mean_scaling_quantize(Tensor w) -> Tensor");
  m.def("binary_channel_wise_mean_scaling_quantize(Tensor w) -> Tensor");
}

// ---- Learnable max_value: argument checks and C++ entry points ----
#include "torch_ext/learnable.h"

namespace torch_ext {

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

}  // namespace

void check_learnable_arguments(const at::Tensor& x, const at::Tensor& max_value, int64_t bit, const std::string& mode) {
  constexpr const char* op = "linear_mid_tread_half_quantize_learnable";
  TORCH_CHECK_VALUE(
      (bit >= 1 && bit <= 16) || bit == 32, op, ": bit must be in 1..16 or 32, got bit=", bit);
  check_mode(mode, op);
  TORCH_CHECK_TYPE(
      is_floating(x.scalar_type()), op,
      ": x must be a floating-point tensor (float16, bfloat16, float32 or float64), got x of dtype ", x.scalar_type());
  check_learnable_max_value(max_value, x, op, "x");
}

void check_learnable_backward_arguments(
    const at::Tensor& grad_y, const at::Tensor& saved, const at::Tensor& max_value, int64_t bit,
    const std::string& mode) {
  constexpr const char* op = "linear_mid_tread_half_quantize_learnable_backward";
  TORCH_CHECK_VALUE(
      (bit >= 1 && bit <= 16) || bit == 32, op, ": bit must be in 1..16 or 32, got bit=", bit);
  check_mode(mode, op);
  TORCH_CHECK_TYPE(
      is_floating(grad_y.scalar_type()), op,
      ": grad_y must be a floating-point tensor (float16, bfloat16, float32 or float64), got grad_y of dtype ",
      grad_y.scalar_type());
  check_learnable_max_value(max_value, grad_y, op, "grad_y");
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

}  // namespace torch_ext
