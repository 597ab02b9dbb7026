// The weight quantizer family (csrc/torch_ext/weight_quantization.h):
// Blueoil's binary weight quantizers. Here: the schemas, the argument checks,
// the C++ entry points and the straight-through autograd. The kernels are
// composites of ATen ops, one for every device:
// csrc/composite/weight_quantization_kernel.cpp; the fake kernels are in
// torch_ext/ops/weight_quantization.py, the contract in docs/quantizer.md.
#include "ops/find_op.h"
#include "torch_ext/weight_quantization.h"

#include <c10/core/ScalarType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(torch_ext, m) {
  m.def("binary_mean_scaling_quantize(Tensor w) -> Tensor");
  m.def("binary_channel_wise_mean_scaling_quantize(Tensor w) -> Tensor");
}

namespace torch_ext {

void check_weight(const char* op, at::ScalarType dtype) {
  // Python's wording (dtype=torch.float16, ...): getDtypeNames gives the
  // name torch.<name> is spelled with.
  TORCH_CHECK_TYPE(
      at::isFloatingType(dtype), op, ": w must have a floating dtype, got dtype=torch.",
      c10::getDtypeNames(dtype).first);
}

void check_channel_wise_weight_dim(int64_t dim) {
  TORCH_CHECK_VALUE(
      dim >= 1,
      "binary_channel_wise_mean_scaling_quantize: w must have an output-channel dim (dim >= 1), "
      "got a 0-dim tensor of shape ()");
}

using ops::find_op;

at::Tensor binary_mean_scaling_quantize(const at::Tensor& w) {
  static auto op = find_op("torch_ext::binary_mean_scaling_quantize").typed<at::Tensor(const at::Tensor&)>();
  return op.call(w);
}

at::Tensor binary_channel_wise_mean_scaling_quantize(const at::Tensor& w) {
  static auto op =
      find_op("torch_ext::binary_channel_wise_mean_scaling_quantize").typed<at::Tensor(const at::Tensor&)>();
  return op.call(w);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Straight-through estimator: grad_w = grad_y, nothing saved for backward.
// Forward runs the kernel below autograd; the checks run first so that a bad
// w is refused before a graph node is made.
template <at::Tensor (*Call)(const at::Tensor&)>
class StraightThrough : public torch::autograd::Function<StraightThrough<Call>> {
 public:
  static at::Tensor forward(AutogradContext* /*ctx*/, const at::Tensor& w) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return Call(w);
  }
  static variable_list backward(AutogradContext* /*ctx*/, variable_list grad_outputs) {
    return {grad_outputs[0]};
  }
};

at::Tensor mean_scaling_autograd(const at::Tensor& w) {
  check_weight("binary_mean_scaling_quantize", w.scalar_type());
  return StraightThrough<&binary_mean_scaling_quantize>::apply(w);
}

at::Tensor channel_wise_autograd(const at::Tensor& w) {
  check_weight("binary_channel_wise_mean_scaling_quantize", w.scalar_type());
  check_channel_wise_weight_dim(w.dim());
  return StraightThrough<&binary_channel_wise_mean_scaling_quantize>::apply(w);
}

}  // namespace
}  // namespace torch_ext

TORCH_LIBRARY_IMPL(torch_ext, Autograd, m) {
  m.impl("binary_mean_scaling_quantize", &torch_ext::mean_scaling_autograd);
  m.impl("binary_channel_wise_mean_scaling_quantize", &torch_ext::channel_wise_autograd);
}
