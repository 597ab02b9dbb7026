// The kernels of Blueoil's binary weight quantizers (schemas, checks and
// autograd: csrc/ops/weight_quantization.cpp).
//
// They are composites of ATen ops registered as CompositeExplicitAutograd,
// so one definition serves CPU, CUDA and every other backend. A fused C++
// kernel does not pay here: a weight is a few thousand to a few hundred
// thousand elements and the quantizer runs once a forward, next to a
// convolution that costs orders of magnitude more.
// They compute exactly what torch_ext/weight_quantization.py computes, op for
// op, so the results are bit-identical to it:
//   scale = |w|.contiguous().mean()          (per channel: mean over dims 1..)
//   y     = where(w >= 0, scale, -scale)
// The reduction runs over a contiguous copy so that a channels_last or
// strided weight gets exactly the scale of its contiguous twin (a float sum
// depends on the order of its terms).
#include "torch_ext/weight_quantization.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

namespace torch_ext::composite {
namespace {

// y = where(w >= 0, scale, -scale) written into a tensor laid out like w
// (empty_like keeps a dense layout such as channels_last), which is the
// layout the fake kernel in torch_ext/ops/weight_quantization.py promises.
at::Tensor signed_scale(const at::Tensor& w, const at::Tensor& scale) {
  at::Tensor y = at::empty_like(w);
  at::where_out(y, w.ge(0), scale, scale.neg());
  return y;
}

at::Tensor mean_scaling_kernel(const at::Tensor& w) {
  check_weight("binary_mean_scaling_quantize", w.scalar_type());
  return signed_scale(w, w.abs().contiguous().mean());
}

at::Tensor channel_wise_kernel(const at::Tensor& w) {
  check_weight("binary_channel_wise_mean_scaling_quantize", w.scalar_type());
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

}  // namespace
}  // namespace torch_ext::composite

TORCH_LIBRARY_IMPL(torch_ext, CompositeExplicitAutograd, m) {
  m.impl("binary_mean_scaling_quantize", &torch_ext::composite::mean_scaling_kernel);
  m.impl("binary_channel_wise_mean_scaling_quantize", &torch_ext::composite::channel_wise_kernel);
}
