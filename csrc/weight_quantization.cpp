// The kernels, C++ entry points and autograd of Blueoil's binary weight
// quantizers (schemas at the end of csrc/ops.cpp).
//
// The kernels are composites of ATen ops registered as
// CompositeExplicitAutograd, so one definition serves CPU, CUDA and every
// other backend. A fused C++ kernel does not pay here: a weight is a few
// thousand to a few hundred thousand elements and the quantizer runs once a
// forward, next to a convolution that costs orders of magnitude more.
// They compute exactly what torch_ext/weight_quantization.py computes, op for
// op, so the results are bit-identical to it:
//   scale = |w|.contiguous().mean()          (per channel: mean over dims 1..)
//   y     = where(w >= 0, scale, -scale)
// The reduction runs over a contiguous copy so that a channels_last or
// strided weight gets exactly the scale of its contiguous twin (a float sum
// depends on the order of its terms).
#include "torch_ext/weight_quantization.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

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

namespace {

constexpr const char* kMeanScaling = "binary_mean_scaling_quantize";
constexpr const char* kChannelWise = "binary_channel_wise_mean_scaling_quantize";

// y = where(w >= 0, scale, -scale) written into a tensor laid out like w
// (empty_like keeps a dense layout such as channels_last), which is the
// layout the fake kernel in torch_ext/_meta.py promises.
at::Tensor signed_scale(const at::Tensor& w, const at::Tensor& scale) {
  at::Tensor y = at::empty_like(w);
  at::where_out(y, w.ge(0), scale, scale.neg());
  return y;
}

at::Tensor mean_scaling_kernel(const at::Tensor& w) {
  check_weight(kMeanScaling, w.scalar_type());
  return signed_scale(w, w.abs().contiguous().mean());
}

at::Tensor channel_wise_kernel(const at::Tensor& w) {
  check_weight(kChannelWise, w.scalar_type());
  check_channel_wise_weight_dim(w.dim());
  if (w.dim() == 1) {
    // One weight per output channel: the mean over no dims is the element
    // itself (mean with an empty dim list would reduce over all dims).
    return signed_scale(w, w.abs());
  }
  std::vector<int64_t> dims(w.dim() - 1);
  std::iota(dims.begin(), dims.end(), 1);
  return signed_scale(w, w.abs().contiguous().mean(dims, /*keepdim=*/true));
}

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

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
  check_weight(kMeanScaling, w.scalar_type());
  return StraightThrough<&binary_mean_scaling_quantize>::apply(w);
}

at::Tensor channel_wise_autograd(const at::Tensor& w) {
  check_weight(kChannelWise, w.scalar_type());
  check_channel_wise_weight_dim(w.dim());
  return StraightThrough<&binary_channel_wise_mean_scaling_quantize>::apply(w);
}

}  // namespace

at::Tensor binary_mean_scaling_quantize(const at::Tensor& w) {
  static auto op = find_op("torch_ext::binary_mean_scaling_quantize").typed<at::Tensor(const at::Tensor&)>();
  return op.call(w);
}

at::Tensor binary_channel_wise_mean_scaling_quantize(const at::Tensor& w) {
  static auto op =
      find_op("torch_ext::binary_channel_wise_mean_scaling_quantize").typed<at::Tensor(const at::Tensor&)>();
  return op.call(w);
}

}  // namespace torch_ext

TORCH_LIBRARY_IMPL(torch_ext, CompositeExplicitAutograd, m) {
  m.impl("binary_mean_scaling_quantize", &torch_ext::mean_scaling_kernel);
  m.impl("binary_channel_wise_mean_scaling_quantize", &torch_ext::channel_wise_kernel);
}

TORCH_LIBRARY_IMPL(torch_ext, Autograd, m) {
  m.impl("binary_mean_scaling_quantize", &torch_ext::mean_scaling_autograd);
  m.impl("binary_channel_wise_mean_scaling_quantize", &torch_ext::channel_wise_autograd);
}
