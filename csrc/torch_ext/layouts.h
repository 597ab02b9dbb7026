// Device-independent host glue shared by the CPU and the CUDA kernels: it
// allocates the outputs with the layout PyTorch users expect (empty_like keeps
// contiguous and channels_last layouts) and hands the kernels flat, dense
// memory, so that the kernels themselves only ever walk one contiguous span.
//
// A flat kernel is called as kernel(src, dst, mask) where src and dst have the
// same dense layout and `numel` elements starting at data_ptr(), and mask is
// nullptr or points to mask_numel(numel) bytes. The packed mask follows the
// row-major element order, so the kernels that read or write it are always
// given row-major contiguous tensors.
#pragma once

#include "torch_ext/torch_ext.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

namespace torch_ext {
namespace layouts {

inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.is_non_overlapping_and_dense() && a.strides() == b.strides();
}

// Inference tensors carry no autograd keys, so in-place calls on them come
// straight to the kernels: refuse them here, outside inference mode, as
// torch.relu_ does. (Normal tensors are checked by the Autograd kernels,
// through check_inplace_allowed, which calls this too: the one message.)
inline void check_inference_tensor_writable(const at::Tensor& x) {
  TORCH_CHECK(
      !x.is_inference() || c10::InferenceMode::is_enabled(),
      "linear_mid_tread_half_quantize_: Inplace update to inference tensor outside InferenceMode is not "
      "allowed. You can make a clone to get a normal tensor before doing inplace update.");
}

// y = f(x), no mask: works in memory order whenever x is dense (contiguous,
// channels_last, any permutation), so no copy is made for those.
template <typename Kernel>
at::Tensor quantize(const at::Tensor& x, Kernel&& kernel) {
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) {
    return y;
  }
  if (same_dense_layout(x, y)) {
    kernel(x, y, nullptr);
    return y;
  }
  const at::Tensor xc = x.contiguous();
  if (y.is_contiguous()) {
    kernel(xc, y, nullptr);
  } else {
    at::Tensor yc = at::empty_like(xc);
    kernel(xc, yc, nullptr);
    y.copy_(yc);
  }
  return y;
}

// x = f(x), no mask.
template <typename Kernel>
void quantize_(at::Tensor& x, Kernel&& kernel) {
  check_inference_tensor_writable(x);
  if (x.numel() == 0) {
    return;
  }
  if (x.is_non_overlapping_and_dense()) {
    kernel(x, x, nullptr);
    return;
  }
  at::Tensor xc = x.contiguous();
  kernel(xc, xc, nullptr);
  x.copy_(xc);
}

inline at::Tensor empty_mask(const at::Tensor& x) {
  return at::empty({mask_numel(x.numel())}, x.options().dtype(at::kByte));
}

// (y, mask) = f(x): the mask needs row-major order.
template <typename Kernel>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, Kernel&& kernel) {
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = empty_mask(x);
  if (x.numel() == 0) {
    return {y, mask};
  }
  const at::Tensor xc = x.contiguous();
  if (y.is_contiguous()) {
    kernel(xc, y, mask.data_ptr<uint8_t>());
  } else {
    at::Tensor yc = at::empty_like(xc);
    kernel(xc, yc, mask.data_ptr<uint8_t>());
    y.copy_(yc);
  }
  return {y, mask};
}

// mask = f(x) with y written into x.
template <typename Kernel>
at::Tensor forward_(at::Tensor& x, Kernel&& kernel) {
  check_inference_tensor_writable(x);
  at::Tensor mask = empty_mask(x);
  if (x.numel() == 0) {
    return mask;
  }
  if (x.is_contiguous()) {
    kernel(x, x, mask.data_ptr<uint8_t>());
    return mask;
  }
  at::Tensor xc = x.contiguous();
  kernel(xc, xc, mask.data_ptr<uint8_t>());
  x.copy_(xc);
  return mask;
}

// grad_x = mask ? grad_y : 0, laid out like grad_y.
template <typename Kernel>
at::Tensor backward(const at::Tensor& grad_y, const at::Tensor& mask, Kernel&& kernel) {
  at::Tensor grad_x = at::empty_like(grad_y);
  if (grad_y.numel() == 0) {
    return grad_x;
  }
  const at::Tensor gc = grad_y.contiguous();
  const at::Tensor mc = mask.contiguous();
  if (grad_x.is_contiguous()) {
    kernel(gc, grad_x, mc.data_ptr<uint8_t>());
  } else {
    at::Tensor out = at::empty_like(gc);
    kernel(gc, out, mc.data_ptr<uint8_t>());
    grad_x.copy_(out);
  }
  return grad_x;
}

}  // namespace layouts
}  // namespace torch_ext
